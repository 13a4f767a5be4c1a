"""Converters: the original LLaVA-fork release, llava-hf checkpoints, and the export to transformers' Llava.

Every test builds its checkpoints here, in the source layouts, with a real (tiny) SentencePiece tokenizer, and
checks the converted model's logits against the same weights run independently (transformers' own LLaMA, CLIP
and Llava classes). Nothing touches the network.
"""

import json
import os
import subprocess
import sys
import textwrap

import google.protobuf  # noqa: F401  (transformers reads tokenizer.model through protobuf)
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from qilin_med_vl import QilinMedVLForConditionalGeneration, QilinProcessor
from qilin_med_vl.conversion import (
    ConversionError,
    convert_llava_hf,
    convert_original,
    export_llava_hf,
    llava_config_from_qilin,
)
from qilin_med_vl.conversion.checkpoint_io import PendingTensor, ShardWriter, load_lazily, write_safetensors
from qilin_med_vl.conversion.staging import staged_output
from qilin_med_vl.testing import random_image, tiny_model

PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "USER: <image>\n请描述这张图片。 ASSISTANT:"
)
CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful answers.\n"
    "USER: 请描述这张图片。 ASSISTANT: 左侧股骨下段可见片状低密度影，膝关节间隙变窄。</s>\n"
    "The chest X-ray shows no abnormality. 请对比两张图片的变化。 Describe the image, please.\n"
)
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 28, "patch_size": 14, "projection_dim": 16, "hidden_act": "quick_gelu"}


def train_sentencepiece(folder):
    """A tiny LLaMA-style SentencePiece BPE model (byte fallback, no normalisation) and the slow-tokenizer files of
    a LLaVA-era release. Returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS * 30)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048,
        "padding_side": "right", "clean_up_tokenization_spaces": False}))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return folder / "tokenizer.model"


def build_clip(folder, seed=1, vision_only=False):
    """A CLIP checkpoint as transformers 4.x saved openai/clip-vit-large-patch14-336: a full CLIPModel in
    `pytorch_model.bin`, `vision_model.*` keys and the old `position_ids` buffers."""
    torch.manual_seed(seed)
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=16))
    folder.mkdir(parents=True)
    if vision_only:  # a vision tower saved by transformers 5: no `vision_model.` level
        vision = CLIPVisionModel(model.config.vision_config)
        vision.load_state_dict(model.vision_model.state_dict())
        vision.save_pretrained(folder)
        return folder
    model.config.save_pretrained(folder)
    state = dict(model.state_dict())
    state["vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 28, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "CLIPImageProcessor"}))
    return folder


def build_original_release(folder, clip_folder, *, seed=0, shards=3, projector_file=True, embedded_clip=True,
                           projector_in_shards=True, llm=True):
    """A tiny Qilin-Med-VL release in the original LLaVA-fork layout: bf16 `pytorch_model-*.bin` shards with LLaMA
    under `model.*`, `model.mm_projector.{0,2}.*`, rotary `inv_freq` buffers, the embedded CLIP copy, a
    `mm_projector.bin`, the slow tokenizer, a config with `mm_*` fields, and DeepSpeed leftovers."""
    torch.manual_seed(seed)
    train_sentencepiece(folder)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, **TEXT))
    state = {key: value.to(torch.bfloat16) for key, value in llama.state_dict().items()}
    for layer in range(TEXT["num_hidden_layers"]):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    projector = {
        "model.mm_projector.0.weight": torch.randn(64, 32) * 0.2, "model.mm_projector.0.bias": torch.randn(64) * 0.1,
        "model.mm_projector.2.weight": torch.randn(64, 64) * 0.2, "model.mm_projector.2.bias": torch.randn(64) * 0.1,
    }
    projector = {key: value.to(torch.bfloat16) for key, value in projector.items()}
    if projector_in_shards:
        state.update(projector)
    if embedded_clip:
        clip_state = torch.load(clip_folder / "pytorch_model.bin", weights_only=True)
        state.update({f"model.vision_tower.vision_tower.{key}": value.to(torch.bfloat16)
                      for key, value in clip_state.items() if key.startswith("vision_model.")})
    if llm:
        keys = list(state)
        weight_map = {}
        for number in range(shards):
            name = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
            part = {key: state[key] for key in keys[number::shards]}
            torch.save(part, folder / name)
            weight_map.update({key: name for key in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if projector_file:
        torch.save(projector, folder / "mm_projector.bin")
    config = {
        "_name_or_path": "/private/ckpt/chinese-llama-2-13b-chat", "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava", "hidden_act": "silu", "initializer_range": 0.02, "vocab_size": 400, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0", "use_cache": True, "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "/private/ckpt/clip-vit-large-patch14-336", "tune_mm_mlp_adapter": False, **TEXT,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    )
    torch.save({"not": "weights"}, folder / "training_args.bin")
    (folder / "global_step100").mkdir()
    (folder / "global_step100" / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed leftovers")
    return {**state, **projector}


def original_input_ids(sp_model, prompt):
    """What the original `tokenizer_image_token` produced: each text chunk tokenized by SentencePiece on its own,
    BOS once, index -200 where the image goes."""
    processor = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = [1]
    for index, chunk in enumerate(prompt.split("<image>")):
        if index:
            ids.append(-200)
        ids.extend(processor.encode(chunk))
    return ids


def reference_logits(state, clip_folder, input_ids, pixel_values):
    """The original LLaVA forward, rebuilt from transformers' own LlamaForCausalLM and CLIPVisionModel and the
    source tensors: CLIP penultimate layer without CLS -> Linear, GELU, Linear -> spliced in at index -200."""
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, **TEXT)).eval()
    llama.load_state_dict({k: v.float() for k, v in state.items() if k.startswith(("model.layers", "model.embed",
                           "model.norm", "lm_head")) and "inv_freq" not in k})
    clip = CLIPVisionModel.from_pretrained(clip_folder).eval()
    clip.to(torch.bfloat16).float()  # the converted tower is stored in the release's bf16
    with torch.no_grad():
        features = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = features @ state["model.mm_projector.0.weight"].float().T + state["model.mm_projector.0.bias"].float()
        hidden = torch.nn.functional.gelu(hidden)
        image = hidden @ state["model.mm_projector.2.weight"].float().T + state["model.mm_projector.2.bias"].float()
        pieces, image_index = [], 0
        ids = torch.tensor(input_ids)
        boundaries = (ids == -200).nonzero().flatten().tolist()
        start = 0
        for boundary in boundaries + [len(ids)]:
            pieces.append(llama.model.embed_tokens(ids[start:boundary]))
            if boundary < len(ids):
                pieces.append(image[image_index])
                image_index += 1
            start = boundary + 1
        return llama(inputs_embeds=torch.cat(pieces).unsqueeze(0)).logits


def collapse_image_tokens(ids, image_token_id):
    out = []
    for token in ids:
        if token == image_token_id:
            if not out or out[-1] != -200:
                out.append(-200)
        else:
            out.append(token)
    return out


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return build_clip(tmp_path_factory.mktemp("clip") / "clip-vit")


@pytest.fixture(scope="module")
def release(tmp_path_factory, clip_folder):
    folder = tmp_path_factory.mktemp("original") / "Qilin-Med-VL"
    state = build_original_release(folder, clip_folder)
    return folder, state


@pytest.fixture(scope="module")
def converted(release, clip_folder, tmp_path_factory):
    folder, _ = release
    output = tmp_path_factory.mktemp("converted") / "Qilin-Med-VL-hf"
    report = convert_original(folder, output, clip=clip_folder, max_shard_size="40KB", progress=False)
    return output, report


def test_converted_model_matches_the_original_forward(converted, release, clip_folder):
    output, _ = converted
    folder, state = release
    processor = QilinProcessor.from_pretrained(output)
    model = QilinMedVLForConditionalGeneration.from_pretrained(output, dtype=torch.float32).eval()
    inputs = processor(images=[random_image(0)], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    ids = collapse_image_tokens(inputs["input_ids"][0].tolist(), processor.image_token_id)
    assert ids == original_input_ids(folder / "tokenizer.model", PROMPT)  # the original's tokenization
    expected = reference_logits(state, clip_folder, ids, inputs["pixel_values"])
    # The first 400 rows are the release's; rows for <image> and padding to a multiple of 64 follow.
    torch.testing.assert_close(logits[0, :, :400], expected[0], atol=1e-4, rtol=1e-4)


def test_converted_folder_layout_config_and_dtype(converted):
    output, _ = converted
    files = set(os.listdir(output))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "processor_config.json",
            "chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "configuration_qilin_med_vl.py",
            "modeling_qilin_med_vl.py", "modeling_hia.py", "processing_qilin.py", "image_processing_qilin.py",
            "image_loading_qilin.py", "dicom_qilin.py", "image_checks_qilin.py"} <= files
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    assert len(shards) > 1 and all(name.startswith("model-") and "-of-" in name for name in shards)
    assert not any(name.startswith(".") or "partial" in name for name in os.listdir(output.parent))
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0o700
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "qilin_med_vl" and config["dtype"] == "bfloat16"
    assert (
        config["auto_map"]["AutoModelForImageTextToText"] == "modeling_qilin_med_vl.QilinMedVLForConditionalGeneration"
    )
    assert config["text_config"]["vocab_size"] == 448 and config["image_token_id"] == 400
    assert config["text_config"]["pad_token_id"] == 0 and config["vision_feature_layer"] == -2
    assert config["image_seq_length"] == 4 and config["projector_type"] == "mlp2x_gelu"
    for shard in shards:
        with safe_open(output / shard, framework="pt") as handle:
            assert all(handle.get_tensor(key).dtype == torch.bfloat16 for key in handle.keys())
    generation = json.loads((output / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_vocabulary_grows_with_image_token_and_mean_rows(converted, release):
    output, _ = converted
    _, state = release
    processor = QilinProcessor.from_pretrained(output)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == 400 and "<image>" in tokenizer.all_special_tokens
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0
    assert tokenizer.decode(tokenizer("左侧股骨下段")["input_ids"], skip_special_tokens=True) == "左侧股骨下段"
    assert processor.image_processor.crop_size["height"] == 28 and processor.image_processor.do_pad
    assert processor.image_processor.high_res_size == 56
    model = QilinMedVLForConditionalGeneration.from_pretrained(output)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape == (448, 64) and model.lm_head.weight.shape == (448, 64)
    assert torch.equal(embeddings[:400], state["model.embed_tokens.weight"])
    mean = state["model.embed_tokens.weight"].float().mean(0).to(torch.bfloat16)
    assert torch.equal(embeddings[400:], mean.expand(48, -1))


def test_report_accounts_for_every_source_tensor(converted, release, clip_folder):
    _, report = converted
    _, state = release
    clip_keys = torch.load(clip_folder / "pytorch_model.bin", weights_only=True).keys()
    sources = {f"model:{key}" for key in state if key.startswith(("model.", "lm_head"))}
    sources |= {f"projector:{key}" for key in state if key.startswith("model.mm_projector")}
    sources |= {f"clip:{key}" for key in clip_keys}
    assert set(report.mapped) | set(report.dropped) == sources
    assert not set(report.mapped) & set(report.dropped) and report.missing == []
    assert report.dropped["model:model.layers.0.self_attn.rotary_emb.inv_freq"].startswith("rotary inv_freq")
    assert "identical" in report.dropped["projector:model.mm_projector.0.weight"]
    embedded = report.dropped["model:model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert "embedded CLIP copy" in embedded and "(identical)" in embedded  # compared in the output's bf16
    assert "embedded CLIP copy, which the original loader ignored" in report.summary()  # grouped, no details
    assert "text tower" in report.dropped["clip:text_model.encoder.layers.0.mlp.fc1.weight"]
    assert report.mapped["clip:vision_model.post_layernorm.weight"] == "model.vision_tower.post_layernorm.weight"
    assert (
        report.mapped["model:model.layers.2.mlp.down_proj.weight"]
        == "model.language_model.layers.2.mlp.down_proj.weight"
    )
    assert "training_args.bin" in report.ignored_files
    assert "embed_tokens" in report.summary() or "rows 400 -> 448" in report.summary()


def test_unexpected_key_is_an_error_and_writes_nothing(release, clip_folder, tmp_path):
    folder, _ = release
    source = tmp_path / "release"
    source.mkdir()
    for path in folder.iterdir():
        if path.is_file():
            (source / path.name).symlink_to(path)
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32), "model.mystery.weight": torch.zeros(2)},
               source / "mm_projector.bin.tmp")
    (source / "mm_projector.bin").unlink()
    (source / "mm_projector.bin.tmp").rename(source / "mm_projector.bin")
    with pytest.raises(ConversionError, match="model.mystery.weight"):
        convert_original(source, tmp_path / "out", clip=clip_folder, progress=False)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["release"]


def test_missing_tensor_is_an_error(clip_folder, tmp_path):
    source = tmp_path / "release"
    build_original_release(source, clip_folder, shards=1, projector_in_shards=False, projector_file=False)
    with pytest.raises(ConversionError, match="have no source") as error:
        convert_original(source, tmp_path / "out", clip=clip_folder, progress=False)
    assert "model.multi_modal_projector.linear_1.weight" in error.value.report.missing
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_without_force(release, clip_folder, tmp_path):
    folder, _ = release
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert_original(folder, output, clip=clip_folder, progress=False)
    assert (output / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="not a saved model"):  # --force replaces model folders only
        convert_original(folder, output, clip=clip_folder, progress=False, force=True)
    assert (output / "keep.txt").read_text() == "mine"
    (output / "config.json").write_text("{}")  # an earlier conversion
    convert_original(folder, output, clip=clip_folder, progress=False, force=True)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired folders left


def test_interrupted_write_leaves_no_output(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged_output(tmp_path / "model") as staging:
            (staging / "model-partial-00001.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_projector_only_release_with_base_llama(clip_folder, tmp_path):
    """A stage-1 style release: config + mm_projector.bin + tokenizer; the LLaMA comes from its base checkpoint."""
    full = tmp_path / "full"
    state = build_original_release(full, clip_folder, embedded_clip=False)
    base = tmp_path / "llama"
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=400, **TEXT)).to(torch.bfloat16)
    llama.load_state_dict({k: v for k, v in state.items() if k.startswith(("model.layers", "model.embed", "model.norm",
                           "lm_head")) and "inv_freq" not in k})
    llama.save_pretrained(base)
    projector_only = tmp_path / "projector"
    build_original_release(projector_only, clip_folder, llm=False)
    torch.save(
        {k: v for k, v in state.items() if k.startswith("model.mm_projector")}, projector_only / "mm_projector.bin"
    )
    with pytest.raises(ConversionError, match="base_model"):
        convert_original(projector_only, tmp_path / "out", clip=clip_folder, progress=False)
    report = convert_original(projector_only, tmp_path / "out", clip=clip_folder, base_model=base, progress=False)
    assert report.mapped["projector:model.mm_projector.2.bias"] == "model.multi_modal_projector.linear_2.bias"
    assert report.mapped["base:model.norm.weight"] == "model.language_model.norm.weight"
    processor = QilinProcessor.from_pretrained(tmp_path / "out")
    model = QilinMedVLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    inputs = processor(images=[random_image(1)], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    ids = collapse_image_tokens(inputs["input_ids"][0].tolist(), processor.image_token_id)
    expected = reference_logits(state, clip_folder, ids, inputs["pixel_values"])
    torch.testing.assert_close(logits[0, :, :400], expected[0], atol=1e-4, rtol=1e-4)


def test_clip_by_repo_id_from_the_local_cache_and_vision_only_layout(release, tmp_path, monkeypatch):
    """`--clip openai/clip-vit-large-patch14-336` resolves through huggingface_hub (here a local offline cache);
    a CLIPVisionModel saved by transformers 5 (no `vision_model.` level) works too."""
    folder, _ = release
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14-336" / "snapshots" / commit
    build_clip(snapshot, vision_only=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    report = convert_original(folder, tmp_path / "out", progress=False)  # default clip = the repo id
    assert report.mapped["clip:encoder.layers.1.mlp.fc2.bias"] == "model.vision_tower.encoder.layers.1.mlp.fc2.bias"
    model = QilinMedVLForConditionalGeneration.from_pretrained(tmp_path / "out")
    reference = CLIPVisionModel.from_pretrained(snapshot).to(torch.bfloat16)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[key], value), key


def test_llava_hf_checkpoint_converts_with_identical_logits(tmp_path, processor):
    """A llava-hf checkpoint (transformers' Llava, saved in the Hub's 4.x key layout) -> Qilin-Med-VL; same logits
    as transformers' LlavaForConditionalGeneration on the same inputs."""
    source = tmp_path / "llava-1.5-tiny-hf"
    llava = LlavaForConditionalGeneration(llava_config_from_qilin(tiny_model(seed=3).config))
    llava.load_state_dict(tiny_model(seed=3).state_dict())
    llava.to(torch.float16).save_pretrained(source)
    processor.tokenizer.save_pretrained(source)
    report = convert_llava_hf(source, tmp_path / "qilin", progress=False)
    assert report.missing == [] and all(key.startswith("llava:") for key in report.mapped)
    model = QilinMedVLForConditionalGeneration.from_pretrained(tmp_path / "qilin").eval()
    converted_processor = QilinProcessor.from_pretrained(tmp_path / "qilin")
    assert model.dtype == torch.float16 and converted_processor.image_seq_length == 4
    inputs = converted_processor(images=[random_image(2)], text="USER: <image>\n描述 ASSISTANT:", return_tensors="pt")
    reference = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
        logits = model.float()(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_legacy_llava_hf_keys_map(tmp_path, processor):
    from safetensors.torch import save_file

    model = tiny_model(seed=4)
    source = tmp_path / "legacy"
    source.mkdir()
    llava_config = llava_config_from_qilin(model.config)
    llava_config.save_pretrained(source)
    legacy = {}
    for key, value in model.state_dict().items():
        key = key.replace("model.language_model.", "language_model.model.")
        key = key.replace("lm_head.", "language_model.lm_head.")
        key = key.replace("model.vision_tower.", "vision_tower.vision_model.")
        key = key.replace("model.multi_modal_projector.", "multi_modal_projector.")
        legacy[key] = value.clone()
    legacy["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(legacy, source / "model.safetensors", metadata={"format": "pt"})
    processor.tokenizer.save_pretrained(source)
    report = convert_llava_hf(source, tmp_path / "qilin", progress=False)
    assert "rotary" in report.dropped["llava:language_model.model.layers.0.self_attn.rotary_emb.inv_freq"]
    converted = QilinMedVLForConditionalGeneration.from_pretrained(tmp_path / "qilin")
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


EXPORT_CHECK = textwrap.dedent(
    """
    import sys, torch
    from PIL import Image
    sys.modules["qilin_med_vl"] = None  # transformers alone, as vLLM / SGLang would see the folder
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    folder = sys.argv[1]
    expected = torch.load(folder + "/../expected.pt")
    assert AutoConfig.from_pretrained(folder).architectures == ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "LlavaProcessor", type(processor)
    inputs = processor(images=[Image.open(folder + "/../image.png")], text=expected["text"], return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert image_tokens == expected["image_tokens"], image_tokens
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\\n描述 ASSISTANT:"), prompt
    print("EXPORT-OK")
    """
)


def test_export_to_transformers_llava_for_vllm(tmp_path, processor):
    model = tiny_model(seed=5)
    source = tmp_path / "qilin"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    (source / "hia").mkdir()
    report = export_llava_hf(source, tmp_path / "llava", progress=False)
    assert report.mapped["qilin:lm_head.weight"] == "language_model.lm_head.weight"
    assert (
        report.mapped["qilin:model.vision_tower.pre_layrnorm.weight"]
        == "vision_tower.vision_model.pre_layrnorm.weight"
    )
    assert any(name.startswith("hia/") for name in report.ignored_files)
    # Files transformers 4.x (pinned by the vLLM / SGLang releases of its time) reads as well as 5.x.
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] and config["text_config"]["rope_theta"] == 10000.0
    tokenizer_config = json.loads((tmp_path / "llava" / "tokenizer_config.json").read_text())
    assert "<image>" in tokenizer_config["additional_special_tokens"]
    assert not isinstance(tokenizer_config.get("extra_special_tokens", {}), list)
    assert "auto_map" not in tokenizer_config
    image_processor = json.loads((tmp_path / "llava" / "preprocessor_config.json").read_text())
    assert image_processor["image_processor_type"] == "LlavaImageProcessor" and image_processor["do_pad"] is True
    assert not any(name.endswith(".py") for name in os.listdir(tmp_path / "llava"))
    with safe_open(tmp_path / "llava" / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == {report.mapped[f"qilin:{key}"] for key in model.state_dict()}
    assert all(key.startswith(("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                               "multi_modal_projector.")) for key in keys)
    image = random_image(3)
    image.save(tmp_path / "image.png")
    inputs = processor(images=[image], text="USER: <image>\n描述 ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"logits": logits, "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
                "text": "USER: <image>\n描述 ASSISTANT:",
                "image_tokens": int((inputs["input_ids"] == processor.image_token_id).sum())},
               tmp_path / "expected.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(tmp_path / "llava")], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EXPORT-OK" in result.stdout


def test_export_refuses_linear_projector(tmp_path, processor):
    source = tmp_path / "linear"
    tiny_model(projector_type="linear").save_pretrained(source)
    processor.save_pretrained(source)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        export_llava_hf(source, tmp_path / "out", progress=False)


def test_cli_convert_and_export(release, clip_folder, tmp_path, capsys):
    from qilin_med_vl.cli import build_parser

    parser = build_parser()
    folder, _ = release
    args = parser.parse_args(["convert", "original", str(folder), str(tmp_path / "hf"), "--clip", str(clip_folder),
                              "--no-progress", "--report", str(tmp_path / "report.json")])
    assert args.handler(args) == 0
    assert "0 missing" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["missing"] == []
    args = parser.parse_args(["convert", "original", str(folder), str(tmp_path / "hf"), "--clip", str(clip_folder)])
    with pytest.raises(FileExistsError):
        args.handler(args)
    args = parser.parse_args(
        ["convert", "export-llava", str(tmp_path / "hf"), str(tmp_path / "llava"), "--no-progress"]
    )
    assert args.handler(args) == 0
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["model_type"] == "llava"


def test_safetensors_writer_round_trips_every_dtype(tmp_path):
    from safetensors.torch import load_file

    tensors = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "f32": torch.randn(7), "i64": torch.arange(6).view(2, 3),
               "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6)[:, ::2],
               "f8": torch.randn(4).to(torch.float8_e4m3fn)}
    write_safetensors(tmp_path / "x.safetensors", [PendingTensor(k, v, v.dtype) for k, v in tensors.items()])
    loaded = load_file(tmp_path / "x.safetensors")
    mapped = load_lazily(tmp_path / "x.safetensors")  # the converters' zero-copy reader
    assert list(mapped) == list(tensors)  # file order
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key].float(), value.float())
        assert mapped[key].dtype == value.dtype and torch.equal(mapped[key].float(), value.float())


def test_shard_writer_splits_casts_and_indexes_like_save_pretrained(tmp_path):
    writer = ShardWriter(max_shard_size="100")  # a byte count, as the command line passes it
    writer.add("a", torch.zeros(20))  # 80 bytes
    writer.add("b", torch.zeros(20))  # would pass 100: new shard
    writer.add("c", torch.zeros(100))  # larger than a shard: a shard of its own
    writer.add("d", torch.ones(40), dtype=torch.bfloat16)  # 80 bytes once cast
    writer.add("e", torch.arange(2), dtype=torch.bfloat16)  # integers keep their dtype: 16 bytes
    with pytest.raises(ConversionError, match="Two source tensors map to a"):
        writer.add("a", torch.zeros(1))
    names = writer.write(tmp_path)
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 80 + 80 + 400 + 80 + 16
    # huggingface_hub's plan: a tensor over the limit is a shard of its own at once, the open shard goes on after it.
    assert index["weight_map"] == {"a": names[0], "c": names[1], "b": names[2], "d": names[3], "e": names[3]}
    with safe_open(tmp_path / names[3], framework="pt") as handle:
        assert handle.get_tensor("d").dtype == torch.bfloat16 and handle.get_tensor("e").dtype == torch.int64
    single = ShardWriter("5GB")
    single.add("a", torch.zeros(2))
    (tmp_path / "single").mkdir()
    assert single.write(tmp_path / "single") == ["model.safetensors"]
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    with pytest.raises(ValueError, match="2GiB"):  # sizes are read as save_pretrained reads them, at once
        ShardWriter("2GiB")


PEAK_MEMORY = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from qilin_med_vl.conversion import convert_original

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def convert(output):
        convert_original(sys.argv[1], output, clip=sys.argv[3], max_shard_size=sys.argv[4], progress=False)

    convert(sys.argv[2] + "-warm-up")  # first-use costs (imports, tokenizer conversion) are not the shards'
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets the peak resident set size (VmHWM) to the current one
    before = status("VmRSS")
    convert(sys.argv[2])
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
    """
)


def test_streamed_conversion_peak_memory_stays_near_one_shard(tmp_path, clip_folder):
    """A 4-shard, 41 MiB release written as ONE output shard: the resident set grows by about one input shard (the
    memory-mapped file being written), never by the output shard's or the model's size."""
    source = tmp_path / "big"
    train_sentencepiece(source)
    big_text = {**TEXT, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8,
                "num_attention_heads": 8, "num_key_value_heads": 8}
    shards, per_shard = 4, 2
    weight_map, total = {}, 0
    torch.manual_seed(0)
    for number in range(shards):
        name = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
        part = {}
        for layer in range(number * per_shard, (number + 1) * per_shard):
            prefix = f"model.layers.{layer}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                part[prefix + f"self_attn.{proj}.weight"] = torch.randn(512, 512, dtype=torch.bfloat16)
            part[prefix + "mlp.gate_proj.weight"] = torch.randn(1024, 512, dtype=torch.bfloat16)
            part[prefix + "mlp.up_proj.weight"] = torch.randn(1024, 512, dtype=torch.bfloat16)
            part[prefix + "mlp.down_proj.weight"] = torch.randn(512, 1024, dtype=torch.bfloat16)
            part[prefix + "input_layernorm.weight"] = torch.ones(512, dtype=torch.bfloat16)
            part[prefix + "post_attention_layernorm.weight"] = torch.ones(512, dtype=torch.bfloat16)
        if number == 0:
            part["model.embed_tokens.weight"] = torch.randn(400, 512, dtype=torch.bfloat16)
            part["model.mm_projector.0.weight"] = torch.randn(512, 32, dtype=torch.bfloat16)
            part["model.mm_projector.0.bias"] = torch.randn(512, dtype=torch.bfloat16)
            part["model.mm_projector.2.weight"] = torch.randn(512, 512, dtype=torch.bfloat16)
            part["model.mm_projector.2.bias"] = torch.randn(512, dtype=torch.bfloat16)
        if number == shards - 1:
            part["model.norm.weight"] = torch.ones(512, dtype=torch.bfloat16)
            part["lm_head.weight"] = torch.randn(400, 512, dtype=torch.bfloat16)
        torch.save(part, source / name)
        weight_map.update({key: name for key in part})
        total += sum(t.numel() * 2 for t in part.values())
        del part
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (source / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "vocab_size": 400,
        "torch_dtype": "bfloat16",
        "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "bos_token_id": 1, "eos_token_id": 2,
        **big_text}))
    shard_bytes = total / shards
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, str(source), str(tmp_path / "out"), str(clip_folder), "5GB"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    usage = json.loads(result.stdout.strip().splitlines()[-1])
    growth = usage["peak"] - usage["before"]
    print(f"model {total / 2**20:.1f} MiB, shard {shard_bytes / 2**20:.1f} MiB, peak growth {growth / 2**20:.1f} MiB "
          f"= {growth / shard_bytes:.2f} shards")
    assert growth < 1.5 * shard_bytes and growth < 0.4 * total
