"""Tests of the Chinese BLEU-4 / METEOR metric module and per-task scoring.

Runs offline: the metric is loaded from its file path with `evaluate.load`.
sacrebleu, nltk (no data needed) and jieba are test-only dependencies.
"""

import math
import os
import random
import re
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from qilin_med_vl.evaluation import (  # noqa: E402
    CAPTION_METRICS_PATH,
    format_markdown_table,
    load_caption_metrics,
    score_by_task,
    tokenize_zh,
)

# --------------------------------------------------------------------------------------------------------------
# Fixtures and data
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric():
    return load_caption_metrics()


_PHRASES = [
    "双肺纹理清晰",
    "双肺纹理增多、增粗",
    "右肺下叶见小结节影",
    "左肺上叶见斑片状高密度影",
    "心影大小、形态正常",
    "纵隔居中",
    "双侧肋膈角锐利",
    "未见明显异常",
    "T2WI呈稍高信号",
    "直径约3.5cm",
    "大小约1.2×0.8cm",
    "边界清楚",
    "考虑炎性病变",
    "建议随访复查",
    "主动脉弓钙化",
]
_NOISE_CHARS = "的见影肺叶结节左右上下未及高低密度"


def _sentence(rng, n_phrases):
    return "".join(rng.choice(_PHRASES) + rng.choice(["，", "。", ","]) for _ in range(n_phrases))


def _perturb(rng, text):
    chars = list(text)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randrange(len(chars))
        if op < 0.4:
            chars[pos] = rng.choice(_NOISE_CHARS)
        elif op < 0.7:
            del chars[pos]
        else:
            chars.insert(pos, rng.choice(_NOISE_CHARS))
    return "".join(chars)


def _pairs(seed=1234, n=12, n_refs=1):
    """A dozen random-ish (prediction, [references]) pairs of Chinese report sentences."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        refs = [_sentence(rng, rng.randint(2, 4)) for _ in range(n_refs)]
        prediction = _perturb(rng, rng.choice(refs)) if rng.random() < 0.8 else _sentence(rng, rng.randint(1, 3))
        pairs.append((prediction, refs))
    # Hand-written pairs, including mixed case ASCII (METEOR is case-insensitive) and an unrelated prediction.
    pairs.append(("右肺上叶见3.5cm结节，T2WI呈高信号。", ["右肺上叶见约3.5cm结节影，t2wi呈高信号。"] * n_refs))
    pairs.append(("心脏未见异常。", ["左肺下叶炎症。"] * n_refs))
    return pairs


class _IdentityStemmer:
    def stem(self, word):
        return word


class _NoSynonyms:
    """WordNet stand-in without synonyms (NLTK's WordNet data is not available offline)."""

    def synsets(self, *args, **kwargs):
        return []


def _nltk_meteor(ref_tokens_list, hyp_tokens):
    import nltk.translate.meteor_score as meteor_score
    return 100 * meteor_score.meteor_score(
        ref_tokens_list, hyp_tokens, stemmer=_IdentityStemmer(), wordnet=_NoSynonyms()
    )


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def test_char_tokenizer_rules():
    assert tokenize_zh("右肺上叶见3.5cm×2cm结节，T2WI呈高信号。") == [
        "右", "肺", "上", "叶", "见", "3.5cm", "×", "2cm", "结", "节", ",", "T2WI", "呈", "高", "信", "号", "。",
    ]  # fmt: skip
    # Full-width letters/digits/punctuation are NFKC-normalised; ideographic space and other whitespace dropped.
    assert tokenize_zh("ＣＴ示：双肺（轻度）\u3000约５．０ｍｍ\n") == [
        "CT", "示", ":", "双", "肺", "(", "轻", "度", ")", "约", "5.0mm",
    ]  # fmt: skip
    # CJK punctuation without a half-width form stays one token each; other punctuation one token each.
    assert tokenize_zh("《报告》、“正常”") == ["《", "报", "告", "》", "、", "“", "正", "常", "”"]
    assert tokenize_zh("C3-4/T2WI, 12%") == ["C3", "-", "4", "/", "T2WI", ",", "12", "%"]
    # A dot is kept only between two digits.
    assert tokenize_zh("1.5T MRI 5. Next v1.2.3") == ["1.5T", "MRI", "5", ".", "Next", "v1.2.3"]
    # Case is preserved; zero-width characters are removed; empty input gives no tokens.
    assert tokenize_zh("Ab\u200bC d") == ["AbC", "d"]
    assert tokenize_zh("") == []
    assert tokenize_zh(" \t\u3000") == []
    with pytest.raises(ValueError):
        tokenize_zh("肺", mode="words")


def test_jieba_tokenizer():
    import jieba  # noqa: F401
    text = "右肺上叶见结节，Ｔ２ＷＩ呈高信号。"
    tokens = tokenize_zh(text, mode="jieba")
    assert "".join(tokens) == "右肺上叶见结节,T2WI呈高信号。"
    assert "结节" in tokens and "信号" in tokens and "T2WI" in tokens
    assert all(tok and not tok.isspace() for tok in tokenize_zh("双肺 纹理 清晰", mode="jieba"))
    assert tokenize_zh("  ", mode="jieba") == []


# --------------------------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------------------------


def test_loaded_offline_from_path(metric):
    assert type(metric).__name__ == "CaptionMetrics"
    assert CAPTION_METRICS_PATH.is_file()


def test_identical_strings(metric):
    out = metric.compute(predictions=["双肺纹理清晰"], references=[["双肺纹理清晰"]])
    assert out["bleu_4"] == pytest.approx(100.0)
    assert out["bleu_precisions"] == pytest.approx([100.0] * 4)
    assert out["brevity_penalty"] == 1.0 and out["length_ratio"] == 1.0
    # 6 tokens, all matched in 1 chunk: P = R = Fmean = 1, penalty = 0.5 * (1/6)^3.
    assert out["meteor"] == pytest.approx(100 * (1 - 0.5 / 6**3))
    # 11 tokens ("，" is NFKC-normalised to ","): penalty 0.5 / 11^3.
    out = metric.compute(predictions=["双肺纹理清晰，心影正常"], references=[["双肺纹理清晰，心影正常"]])
    assert out["meteor"] == pytest.approx(100 * (1 - 0.5 / 11**3))


def test_identical_ten_tokens(metric):
    out = metric.compute(predictions=["双肺纹理清晰心影正常"], references=["双肺纹理清晰心影正常"])
    assert out["bleu_4"] == pytest.approx(100.0)
    assert out["meteor"] == pytest.approx(99.95)  # 100 * (1 - 0.5 / 10^3)


def test_partial_match_hand_worked(metric):
    # hyp: 右 肺 下 叶 小 结 节 (7), ref: 右 肺 下 叶 见 小 结 节 (8)
    # 1-grams 7/7; 2-grams 5/6 (叶小 missing); 3-grams 3/5 (右肺下 肺下叶 小结节); 4-grams 1/4 (右肺下叶)
    # geometric mean = (1 * 5/6 * 3/5 * 1/4) ** (1/4) = (1/8) ** (1/4); BP = exp(1 - 8/7)
    out = metric.compute(predictions=["右肺下叶小结节"], references=[["右肺下叶见小结节"]])
    assert out["bleu_precisions"] == pytest.approx([100.0, 500 / 6, 60.0, 25.0])
    assert out["brevity_penalty"] == pytest.approx(math.exp(-1 / 7))
    assert out["length_ratio"] == pytest.approx(7 / 8)
    assert out["translation_length"] == 7 and out["reference_length"] == 8
    assert out["bleu_4"] == pytest.approx(100 * 2**-0.75 * math.exp(-1 / 7))
    assert out["bleu_4"] == pytest.approx(51.5449, abs=1e-4)
    # METEOR: 7 matches, P = 1, R = 7/8, Fmean = PR / (0.9P + 0.1R) = 70/79;
    # chunks: 右肺下叶 | 小结节 -> 2, penalty = 0.5 * (2/7)^3 = 4/343.
    assert out["meteor"] == pytest.approx(100 * (339 / 343) * (70 / 79))


def test_brevity_penalty_only(metric):
    # All n-gram precisions are 1, c = 5, r = 7 -> BLEU = exp(1 - 7/5).
    out = metric.compute(predictions=["肺纹理增多"], references=[["双肺纹理增多。"]])
    assert out["bleu_4"] == pytest.approx(100 * math.exp(-0.4))
    # P = 1, R = 5/7, Fmean = 25/34, one chunk of 5: penalty 0.5 / 125 -> 249/340.
    assert out["meteor"] == pytest.approx(100 * 249 / 340)


def test_clipping_and_max_order(metric):
    out = metric.compute(predictions=["的的的的"], references=[["的病的"]], max_order=1)
    assert out["bleu_1"] == out["bleu"] == pytest.approx(50.0)  # 的 clipped to 2 of 4, c = 4 > r = 3
    assert out["brevity_penalty"] == 1.0


def test_multi_reference(metric):
    # hyp 结节结节 (4); refs 结节 (2) and 见结节影结节 (6): equally close -> the shorter, r = 2, BP = 1.
    # 1-grams: 结, 节 clipped by the max count over references (2 each) -> 4/4; 2-grams: 结节 x2 ok, 节结 no -> 2/3.
    out = metric.compute(predictions=["结节结节"], references=[["结节", "见结节影结节"]], max_order=2)
    assert out["reference_length"] == 2 and out["brevity_penalty"] == 1.0
    assert out["bleu_precisions"] == pytest.approx([100.0, 200 / 3])
    assert out["bleu_2"] == pytest.approx(100 * math.sqrt(2 / 3))
    # METEOR vs 结节: P = 1/2, R = 1, Fmean = 10/11, 1 chunk of 2 matches -> (1 - 1/16) * 10/11 = 75/88;
    # vs 见结节影结节: P = 1, R = 2/3, Fmean = 20/29, 2 chunks of 4 -> 75/116. The maximum is taken.
    assert out["meteor"] == pytest.approx(100 * 75 / 88)
    # Order of references does not matter.
    again = metric.compute(predictions=["结节结节"], references=[["见结节影结节", "结节"]], max_order=2)
    assert again == out


def test_plain_string_references(metric):
    preds = ["右肺下叶小结节", "肺纹理增多"]
    as_lists = metric.compute(predictions=preds, references=[["右肺下叶见小结节"], ["双肺纹理增多。"]])
    as_strings = metric.compute(predictions=preds, references=["右肺下叶见小结节", "双肺纹理增多。"])
    assert as_strings == as_lists


def test_empty_prediction(metric):
    out = metric.compute(predictions=[""], references=[["未见明显异常"]])
    assert out["bleu_4"] == 0.0 and out["meteor"] == 0.0
    assert out["brevity_penalty"] == 0.0 and out["translation_length"] == 0
    # In a corpus, an empty prediction scores METEOR 0 and lowers BLEU through the brevity penalty.
    out = metric.compute(predictions=["", "右肺下叶小结节"], references=[["未见明显异常"], ["右肺下叶见小结节"]])
    assert out["meteor"] == pytest.approx(100 * (339 / 343) * (70 / 79) / 2)
    assert out["brevity_penalty"] == pytest.approx(math.exp(1 - 14 / 7))
    # Empty reference: no crash, METEOR 0.
    out = metric.compute(predictions=["肺"], references=[[""]])
    assert out["meteor"] == 0.0 and out["bleu_4"] == 0.0


def test_lowercase_and_callable_tokenizer(metric):
    out = metric.compute(predictions=["T2WI高信号"], references=[["t2wi高信号"]], max_order=1)
    assert out["bleu_1"] == pytest.approx(75.0)  # "T2WI" != "t2wi" for BLEU by default
    assert out["meteor"] > 99  # METEOR is case-insensitive
    out = metric.compute(predictions=["T2WI高信号"], references=[["t2wi高信号"]], max_order=1, lowercase=True)
    assert out["bleu_1"] == pytest.approx(100.0)
    out = metric.compute(predictions=["a b c d"], references=[["a b c d"]], tokenizer=str.split)
    assert out["translation_length"] == 4 and out["bleu_4"] == pytest.approx(100.0)


def test_jieba_mode_through_metric(metric):
    import jieba  # noqa: F401
    pred, ref = "右肺上叶见结节，T2WI呈高信号。", "右肺上叶见小结节，T2WI呈稍高信号。"
    out = metric.compute(predictions=[pred], references=[[ref]], tokenizer="jieba")
    hyp_tokens = tokenize_zh(pred, mode="jieba")
    assert out["translation_length"] == len(hyp_tokens)
    assert out["meteor"] == pytest.approx(_nltk_meteor([tokenize_zh(ref, mode="jieba")], hyp_tokens))
    char_out = metric.compute(predictions=[pred], references=[[ref]])
    assert char_out["translation_length"] == len(tokenize_zh(pred)) > len(hyp_tokens)


# --------------------------------------------------------------------------------------------------------------
# Equality with sacrebleu and NLTK
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_refs", [1, 3])
@pytest.mark.parametrize("tokenizer", ["char", "jieba"])
def test_bleu_equals_sacrebleu_and_nltk(metric, n_refs, tokenizer):
    import nltk.translate.bleu_score as nltk_bleu
    import sacrebleu
    if tokenizer == "jieba":
        import jieba  # noqa: F401
    pairs = _pairs(seed=7 + n_refs, n_refs=n_refs)
    checked_nltk = False
    for end in (1, 3, len(pairs)):  # a single sentence, a small and the full corpus
        preds = [p for p, _ in pairs[:end]]
        refs = [r for _, r in pairs[:end]]
        out = metric.compute(predictions=preds, references=refs, tokenizer=tokenizer)

        hyp_tok = [tokenize_zh(p, mode=tokenizer) for p in preds]
        ref_tok = [[tokenize_zh(r, mode=tokenizer) for r in rs] for rs in refs]
        ref_streams = [[" ".join(ref_tok[i][k]) for i in range(end)] for k in range(n_refs)]
        sb = sacrebleu.corpus_bleu(
            [" ".join(h) for h in hyp_tok], ref_streams, tokenize="none", smooth_method="none"
        )
        assert out["bleu_4"] == pytest.approx(sb.score, abs=1e-9)
        assert out["brevity_penalty"] == pytest.approx(sb.bp)
        assert out["translation_length"] == sb.sys_len and out["reference_length"] == sb.ref_len
        if sb.score > 0:
            assert out["bleu_precisions"] == pytest.approx(sb.precisions)
        # NLTK counts a hypothesis shorter than n as 1 n-gram (denominator max(1, count)), unlike sacrebleu and
        # Papineni et al.; the two agree whenever every hypothesis has at least 4 tokens.
        if all(len(h) >= 4 for h in hyp_tok):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nl = nltk_bleu.corpus_bleu(ref_tok, hyp_tok)
            assert out["bleu_4"] == pytest.approx(100 * nl, abs=1e-9)
            checked_nltk = True

        smoothed = metric.compute(predictions=preds, references=refs, tokenizer=tokenizer, smooth=True)
        sb_smooth = sacrebleu.corpus_bleu(
            [" ".join(h) for h in hyp_tok], ref_streams, tokenize="none", smooth_method="add-k", smooth_value=1
        )
        assert smoothed["bleu_4"] == pytest.approx(sb_smooth.score, abs=1e-9)
    assert out["bleu_4"] > 0  # the full corpus has matches at every order
    assert checked_nltk


@pytest.mark.parametrize("n_refs", [1, 3])
@pytest.mark.parametrize("tokenizer", ["char", "jieba"])
def test_meteor_equals_nltk(metric, n_refs, tokenizer):
    import nltk  # noqa: F401
    if tokenizer == "jieba":
        import jieba  # noqa: F401
    pairs = _pairs(seed=11 + n_refs, n_refs=n_refs)
    expected = []
    for pred, refs in pairs:
        hyp_tok = tokenize_zh(pred, mode=tokenizer)
        ref_tok = [tokenize_zh(r, mode=tokenizer) for r in refs]
        sentence = metric.compute(predictions=[pred], references=[refs], tokenizer=tokenizer)["meteor"]
        expected.append(_nltk_meteor(ref_tok, hyp_tok))
        assert sentence == pytest.approx(expected[-1], abs=1e-9)
    out = metric.compute(predictions=[p for p, _ in pairs], references=[r for _, r in pairs], tokenizer=tokenizer)
    assert out["meteor"] == pytest.approx(sum(expected) / len(expected), abs=1e-9)
    assert 0 < out["meteor"] < 100


def test_meteor_repeated_tokens_equal_nltk(metric):
    # Repeated characters exercise NLTK's alignment order (last hypothesis token to last free reference token).
    cases = [
        ("结节结节结节", ["结节影结节"]),
        ("肺肺肺见影", ["见肺影肺"]),
        ("左肺右肺左肺", ["右肺左肺", "左肺左肺右肺"]),
        ("的的的的", ["的病的"]),
    ]
    for pred, refs in cases:
        out = metric.compute(predictions=[pred], references=[refs])
        assert out["meteor"] == pytest.approx(_nltk_meteor([tokenize_zh(r) for r in refs], tokenize_zh(pred)))


# --------------------------------------------------------------------------------------------------------------
# Per-task scoring and the table
# --------------------------------------------------------------------------------------------------------------

_RECORDS = [
    {"task": "CT", "prediction": "右肺下叶小结节", "references": ["右肺下叶见小结节"]},
    {"task": "X-ray", "prediction": "双肺纹理清晰", "references": ["双肺纹理清晰", "双肺纹理清"]},
    {"task": "CT", "prediction": "肺纹理增多", "references": ["双肺纹理增多。"]},
    {"task": "MRI", "prediction": "", "references": "未见明显异常"},
]


def test_score_by_task(metric):
    result = score_by_task(_RECORDS, metric=metric)
    assert list(result["per_task"]) == ["CT", "X-ray", "MRI"]  # order of first appearance
    assert [s["count"] for s in result["per_task"].values()] == [2, 1, 1]

    ct = metric.compute(
        predictions=["右肺下叶小结节", "肺纹理增多"], references=[["右肺下叶见小结节"], ["双肺纹理增多。"]]
    )
    assert result["per_task"]["CT"]["bleu_4"] == pytest.approx(ct["bleu_4"])
    assert result["per_task"]["CT"]["meteor"] == pytest.approx((100 * 339 / 343 * 70 / 79 + 100 * 249 / 340) / 2)
    assert result["per_task"]["X-ray"]["bleu_4"] == pytest.approx(100.0)
    assert result["per_task"]["X-ray"]["meteor"] == pytest.approx(100 * (1 - 0.5 / 216))
    assert result["per_task"]["MRI"] == {"bleu_4": 0.0, "meteor": 0.0, "count": 1}

    per_task = result["per_task"].values()
    assert result["average"]["bleu_4"] == pytest.approx(sum(s["bleu_4"] for s in per_task) / 3)
    assert result["average"]["meteor"] == pytest.approx(sum(s["meteor"] for s in per_task) / 3)

    overall = metric.compute(
        predictions=[r["prediction"] for r in _RECORDS],
        references=[[r["references"]] if isinstance(r["references"], str) else r["references"] for r in _RECORDS],
    )
    assert result["overall"] == pytest.approx({"bleu_4": overall["bleu_4"], "meteor": overall["meteor"], "count": 4})

    with pytest.raises(ValueError):
        score_by_task([], metric=metric)
    with pytest.raises(KeyError):
        score_by_task([{"task": "CT", "prediction": "肺"}], metric=metric)


def test_score_by_task_loads_metric_and_jieba():
    import jieba  # noqa: F401
    records = [
        {"task": "CT", "prediction": "右肺上叶见结节，T2WI呈高信号。",
         "references": ["右肺上叶见小结节，T2WI呈稍高信号。"]},
        {"task": "X-ray", "prediction": "双肺纹理清晰，心影大小正常。",
         "references": ["双肺纹理清晰，心影大小正常。"]},
    ]
    result = score_by_task(records, tokenizer="jieba")  # loads the metric itself
    assert list(result["per_task"]) == ["CT", "X-ray"]
    assert result["per_task"]["X-ray"]["bleu_4"] == pytest.approx(100.0)
    metric = load_caption_metrics()
    ct = metric.compute(
        predictions=[records[0]["prediction"]], references=[records[0]["references"]], tokenizer="jieba"
    )
    assert result["per_task"]["CT"]["bleu_4"] == pytest.approx(ct["bleu_4"])
    assert result["per_task"]["CT"]["meteor"] == pytest.approx(ct["meteor"])


def test_markdown_table(metric):
    result = score_by_task(_RECORDS, metric=metric)
    table = format_markdown_table(result)
    lines = table.strip().split("\n")
    assert len(lines) == 3
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["CT B4", "CT M", "X-ray B4", "X-ray M", "MRI B4", "MRI M", "AVG"]
    assert all(set(c.strip()) <= set("-:") for c in lines[1].strip("|").split("|"))
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(cells) == len(header)
    assert all(re.fullmatch(r"\d+\.\d", c) for c in cells)
    numbers = [v for s in result["per_task"].values() for v in (s["bleu_4"], s["meteor"])]
    assert cells[-1] == f"{sum(numbers) / len(numbers):.1f}"
    assert cells[0] == f"{result['per_task']['CT']['bleu_4']:.1f}"
    assert cells[2:4] == ["100.0", f"{100 * (1 - 0.5 / 216):.1f}"]


def test_markdown_table_order_and_rows(metric):
    result = score_by_task(_RECORDS, metric=metric)
    table = format_markdown_table(result, task_order=["X-ray", "CT"], name="Qilin-Med-VL")
    lines = table.strip().split("\n")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Model", "X-ray B4", "X-ray M", "CT B4", "CT M", "AVG"]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "Qilin-Med-VL" and cells[1] == "100.0"
    shown = [result["per_task"][t][k] for t in ("X-ray", "CT") for k in ("bleu_4", "meteor")]
    assert cells[-1] == f"{sum(shown) / 4:.1f}"

    other = score_by_task(_RECORDS[:2], metric=metric)  # no MRI
    lines = format_markdown_table({"A": result, "B": other}).strip().split("\n")
    assert len(lines) == 4
    row_b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row_b[0] == "B" and row_b[5:7] == ["-", "-"]
