# Copyright the Qilin-Med-VL authors. Licensed under the Apache License, Version 2.0.
"""Corpus BLEU-n and METEOR (exact matching) for Chinese medical reports.

This file is an ``evaluate`` metric module: load it by path, e.g.
``evaluate.load(".../caption_metrics/caption_metrics.py")`` (or use
``qilin_med_vl.evaluation.scoring.load_caption_metrics()``).  It imports only
``evaluate``, ``datasets``, the standard library and the tokenizer from the
installed ``qilin_med_vl`` package; it needs no network and no NLTK data.
"""

from collections import defaultdict

import datasets
import evaluate

from qilin_med_vl.evaluation.tokenization import get_tokenizer

_CITATION = """\
@inproceedings{papineni-etal-2002-bleu,
  title = {{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {Proceedings of ACL},
  year = {2002},
  pages = {311--318},
}
@inproceedings{banerjee-lavie-2005-meteor,
  title = {{METEOR}: An Automatic Metric for {MT} Evaluation with Improved Correlation with Human Judgments},
  author = {Banerjee, Satanjeev and Lavie, Alon},
  booktitle = {Proceedings of the ACL Workshop on Intrinsic and Extrinsic Evaluation Measures
               for Machine Translation and/or Summarization},
  year = {2005},
  pages = {65--72},
}
"""

_DESCRIPTION = """\
Corpus-level BLEU (Papineni et al., 2002) and METEOR (Banerjee & Lavie, 2005)
for Chinese medical report generation. Texts are tokenised with
`qilin_med_vl.evaluation.tokenization.tokenize_zh` (one token per Chinese
character by default, or jieba words).

BLEU: clipped n-gram precisions for n = 1..max_order summed over the corpus,
geometric mean, brevity penalty exp(1 - r/c) when c < r, where c is the total
prediction length and r the sum over sentences of the reference length closest
to the prediction length (ties -> shorter reference). Computed by sacrebleu
(tokenize="none") on our tokens; equal to NLTK's corpus_bleu on the same tokens.
METEOR stays written here: NLTK's needs the WordNet corpus, which is a download
and contributes nothing for Chinese characters.

METEOR: sentence-level METEOR with exact unigram matching only (for Chinese
characters the stemming and WordNet synonym stages are no-ops), parameters
alpha=0.9, beta=3, gamma=0.5 as in NLTK's meteor_score, case-insensitive,
maximum over the references of a prediction, averaged over the corpus.
Identical to nltk.translate.meteor_score.meteor_score with an identity stemmer
and a WordNet stand-in without synonyms.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted reports (str).
    references: list with, per prediction, either one reference (str) or a
        list of one or more references (list of str).
    tokenizer: "char" (default), "jieba", or a callable str -> list[str].
    max_order: highest n-gram order of BLEU (default 4).
    smooth: if True, BLEU uses Lin & Och (2004) add-one smoothing for n > 1
        (= sacrebleu smooth_method="add-k", smooth_value=1; NLTK method2).
    lowercase: if True, tokens are lowercased before BLEU (METEOR is always
        case-insensitive, like NLTK and METEOR 1.x).
    alpha, beta, gamma: METEOR parameters (defaults 0.9, 3.0, 0.5).
Returns:
    bleu_4: corpus BLEU in [0, 100] (the key is f"bleu_{max_order}"; "bleu" holds
        the same number whatever max_order is),
    meteor: mean sentence METEOR in [0, 100],
    bleu_precisions: the max_order modified n-gram precisions in [0, 100],
    brevity_penalty: in [0, 1],
    length_ratio: prediction length / effective reference length,
    translation_length, reference_length: token counts c and r.
Examples:
    >>> metric = evaluate.load("path/to/caption_metrics.py")
    >>> out = metric.compute(predictions=["右肺下叶小结节"], references=[["右肺下叶见小结节"]])
    >>> round(out["bleu_4"], 2), round(out["meteor"], 2)
    (51.54, 87.57)
"""


def corpus_bleu(hypotheses, references, max_order=4, smooth=False):
    """Corpus BLEU on token lists, computed by sacrebleu on the tokens joined by spaces (``tokenize="none"``: the
    Chinese tokenization is ours, sacrebleu only counts).

    Args:
        hypotheses: list of token lists (no token contains whitespace).
        references: list (parallel to ``hypotheses``) of lists of token lists; samples may have different numbers.
        smooth: add-one smoothing of the 2..4-gram precisions (sacrebleu ``add-k``, k = 1; NLTK method2).
    Returns:
        dict with "bleu" (in [0, 100]), "precisions" (in [0, 100]), "brevity_penalty", "length_ratio",
        "translation_length", "reference_length".
    """
    from sacrebleu.metrics import BLEU

    if max_order < 1:
        raise ValueError("max_order must be >= 1")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    # sacrebleu takes one stream per reference position; a sample with fewer references has None there.
    streams = [
        [" ".join(refs[k]) if k < len(refs) else None for refs in references]
        for k in range(max(len(refs) for refs in references))
    ] if references else [[]]
    bleu = BLEU(tokenize="none", max_ngram_order=max_order, smooth_method="add-k" if smooth else "none",
                smooth_value=1, effective_order=False)
    score = bleu.corpus_score([" ".join(hypothesis) for hypothesis in hypotheses], streams)
    return {
        "bleu": score.score,
        "precisions": list(score.precisions),
        "brevity_penalty": score.bp,
        "length_ratio": score.ratio,
        "translation_length": score.sys_len,
        "reference_length": score.ref_len,
    }


def _exact_alignment(hypothesis, reference):
    """Exact unigram alignment as in NLTK's METEOR.

    Hypothesis positions are visited from last to first; each is aligned to the
    last still-unaligned reference position holding the same token.  Returns
    (hyp_index, ref_index) pairs sorted by hypothesis index.
    """
    positions = defaultdict(list)
    for j, token in enumerate(reference):
        positions[token].append(j)
    alignment = []
    for i in range(len(hypothesis) - 1, -1, -1):
        free = positions.get(hypothesis[i])
        if free:
            alignment.append((i, free.pop()))
    alignment.sort()
    return alignment


def _count_chunks(alignment):
    # Fewest chunks of matches that are contiguous in both hypothesis and reference.
    chunks = 1
    for (h0, r0), (h1, r1) in zip(alignment, alignment[1:]):
        if not (h1 == h0 + 1 and r1 == r0 + 1):
            chunks += 1
    return chunks


def single_meteor(reference, hypothesis, alpha=0.9, beta=3.0, gamma=0.5):
    """METEOR (exact matches only, case-insensitive) of one hypothesis vs one reference, in [0, 1]."""
    hypothesis = [token.lower() for token in hypothesis]
    reference = [token.lower() for token in reference]
    alignment = _exact_alignment(hypothesis, reference)
    matches_count = len(alignment)
    if matches_count == 0 or not hypothesis or not reference:
        return 0.0
    # Same arithmetic, in the same order, as nltk.translate.meteor_score.single_meteor_score.
    precision = float(matches_count) / len(hypothesis)
    recall = float(matches_count) / len(reference)
    fmean = (precision * recall) / (alpha * precision + (1 - alpha) * recall)
    frag_frac = float(_count_chunks(alignment)) / matches_count
    penalty = gamma * frag_frac**beta
    return (1 - penalty) * fmean


def meteor(references, hypothesis, alpha=0.9, beta=3.0, gamma=0.5):
    """Best METEOR of ``hypothesis`` over several ``references`` (token lists), in [0, 1]."""
    return max(single_meteor(ref, hypothesis, alpha=alpha, beta=beta, gamma=gamma) for ref in references)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    """BLEU-n and METEOR for Chinese medical reports."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            reference_urls=[
                "https://aclanthology.org/P02-1040/",
                "https://aclanthology.org/W05-0909/",
                "https://www.nltk.org/api/nltk.translate.meteor_score.html",
            ],
        )

    def _compute(
        self,
        predictions,
        references,
        tokenizer="char",
        max_order=4,
        smooth=False,
        lowercase=False,
        alpha=0.9,
        beta=3.0,
        gamma=0.5,
    ):
        tokenize = get_tokenizer(tokenizer)
        references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
        if any(len(refs) == 0 for refs in references):
            raise ValueError("every prediction needs at least one reference")

        hyp_tokens = [tokenize(pred or "") for pred in predictions]
        ref_tokens = [[tokenize(ref or "") for ref in refs] for refs in references]

        if lowercase:
            bleu_hyps = [[t.lower() for t in hyp] for hyp in hyp_tokens]
            bleu_refs = [[[t.lower() for t in ref] for ref in refs] for refs in ref_tokens]
        else:
            bleu_hyps, bleu_refs = hyp_tokens, ref_tokens
        bleu = corpus_bleu(bleu_hyps, bleu_refs, max_order=max_order, smooth=smooth)

        meteor_scores = [
            meteor(refs, hyp, alpha=alpha, beta=beta, gamma=gamma) for hyp, refs in zip(hyp_tokens, ref_tokens)
        ]
        meteor_mean = 100.0 * sum(meteor_scores) / len(meteor_scores) if meteor_scores else 0.0

        return {
            f"bleu_{max_order}": bleu["bleu"],
            "meteor": meteor_mean,
            "bleu": bleu["bleu"],
            "bleu_precisions": bleu["precisions"],
            "brevity_penalty": bleu["brevity_penalty"],
            "length_ratio": bleu["length_ratio"],
            "translation_length": bleu["translation_length"],
            "reference_length": bleu["reference_length"],
        }
