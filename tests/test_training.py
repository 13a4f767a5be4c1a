"""Training on the HF Trainer and evaluation, end to end on a tiny model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_training_workspace
from peft import PeftModel
from safetensors.torch import load_file

from qilin_med_vl.cli import main as cli
from qilin_med_vl.modeling.modeling_hia import find_instruction_end_index, hia_is_active
from qilin_med_vl.testing import tiny_model, tiny_processor
from qilin_med_vl.training import ConversationCollator, ConversationDataset, DataValidationError, validate_records
from qilin_med_vl.training.data import record_to_messages, split_per_answer

RECORDS = [
    {"id": "d1", "image": "a.png", "task": "description",
     "conversations": [{"from": "human", "value": "<image>\n描述这张图片。"},
                       {"from": "gpt", "value": "左侧股骨下段可见片状低密度影。"}]},
    {"id": "c1", "images": ["a.png", "b.png"], "task": "comparative",
     "conversations": [{"from": "human", "value": "<image>\n<image>\n请对比两张图片。"},
                       {"from": "gpt", "value": "第二张相比第一张好转。"}]},
    {"id": "m1", "images": ["b.png"], "task": "disease",
     "conversations": [{"from": "human", "value": "<image>\n是否有异常？"}, {"from": "gpt", "value": "有。"},
                       {"from": "human", "value": "什么病变？"}, {"from": "gpt", "value": "骨折。"}]},
    {"id": "t1", "task": "location",
     "conversations": [{"from": "human", "value": "股骨在哪里？"}, {"from": "gpt", "value": "下肢。"}]},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_training_workspace(tmp_path_factory.mktemp("train"), RECORDS)


def test_collator_labels_exactly_the_answers_and_the_hia_instruction_end(workspace):
    processor = tiny_processor()
    batch = ConversationCollator(processor, str(workspace))(RECORDS)
    assert batch["pixel_values"].shape[0] == 4 and batch["high_res_pixel_values"].shape[0] == 4
    for row, record in enumerate(RECORDS):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        answers = [turn["value"] + "</s>" for turn in record["conversations"] if turn["from"] == "gpt"]
        assert processor.tokenizer.decode(labelled).replace(" ", "") == "".join(answers)
        assert not (batch["labels"][row] == processor.image_token_id).any()
    instruction_end = find_instruction_end_index(
        batch["labels"], batch["attention_mask"], batch["labels"].shape, "cpu"
    )
    first_supervised = (batch["labels"] != -100).int().argmax(dim=1)
    assert torch.equal(instruction_end, first_supervised - 1)
    # h_last in training is the token a generation prompt ends with at inference: the ":" of "ASSISTANT:"
    generation_prompt = processor.apply_chat_template(
        [[{"role": "user", "content": "描述"}]], add_generation_prompt=True, tokenize=True, return_dict=True)
    for row in range(len(RECORDS)):
        assert batch["input_ids"][row, instruction_end[row]] == generation_prompt["input_ids"][0][-1]
        prompt_tail = processor.tokenizer.decode(batch["input_ids"][row, : instruction_end[row] + 1])
        assert prompt_tail.endswith("ASSISTANT:")


def test_multi_turn_hia_samples_end_with_the_question_generation_sees(workspace):
    """HiA reads one instruction per forward pass. At inference it is the latest question (the prompt's last token);
    in training each answer of a multi-turn record becomes its own sample whose h_last is the end of its own
    question, at the same position and with the same prefix as the inference prompt for that turn."""
    processor = tiny_processor()
    (multi_turn,) = [record for record in RECORDS if record["id"] == "m1"]
    pieces = split_per_answer(multi_turn)
    assert [len(piece["conversations"]) for piece in pieces] == [2, 4] and pieces[1]["images"] == ["b.png"]
    batch = ConversationCollator(processor, str(workspace), supervise="last")(pieces)
    instruction_end = find_instruction_end_index(batch["labels"], batch["attention_mask"], batch["labels"].shape,
                                                 "cpu")
    for row, piece in enumerate(pieces):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.decode(labelled).replace(" ", "") == piece["conversations"][-1]["value"] + "</s>"
        # The prompt generation would see for this turn: history + the question, then the generation prompt.
        messages = record_to_messages({**piece, "conversations": piece["conversations"][:-1]})
        prompt = processor.apply_chat_template(
            [messages], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"images": [[str(workspace / image) for image in piece["images"]]]})
        prompt_ids = prompt["input_ids"][0]
        assert instruction_end[row] == len(prompt_ids) - 1
        assert torch.equal(batch["input_ids"][row, : len(prompt_ids)], prompt_ids)
    # Without the split, the record's single h_last is the end of the first question: the mismatch this fixes.
    whole = ConversationCollator(processor, str(workspace))([multi_turn])
    whole_end = find_instruction_end_index(whole["labels"], whole["attention_mask"], whole["labels"].shape, "cpu")
    assert whole_end[0] < instruction_end[1]
    # A record whose image comes with a later question: its first answer has no image, and the HiA stage (which
    # trains image paths only) leaves that sample out instead of building a batch without images.
    late_image = {"id": "late", "images": ["a.png"], "conversations": [
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好。"},
        {"from": "human", "value": "<image>\n描述这张图片。"}, {"from": "gpt", "value": "未见异常。"}]}
    assert [piece["images"] for piece in split_per_answer(late_image)] == [[], ["a.png"]]
    late_file = workspace / "late.jsonl"
    late_file.write_text(json.dumps(late_image, ensure_ascii=False) + "\n", encoding="utf-8")
    hia_samples = ConversationDataset(str(late_file), processor, str(workspace), require_images=True,
                                      one_sample_per_answer=True)
    assert [sample["images"] for sample in hia_samples] == [["a.png"]]
    # The dataset splits records for the HiA stage only, and every answer is still learned exactly once.
    plain = ConversationDataset(str(workspace / "train.jsonl"), processor, str(workspace))
    split = ConversationDataset(str(workspace / "train.jsonl"), processor, str(workspace), one_sample_per_answer=True)
    assert len(split) == len(plain) + 2  # m1 (two answers) appears twice in train.jsonl


def test_lengths_are_checked_with_the_template_the_collator_uses(workspace):
    """The align stage renders `plain` (image + caption, no system prompt); its length check must use the same
    template, or records that fit are dropped (or ones that do not fit are kept)."""
    processor = tiny_processor()
    record = RECORDS[0]
    plain_length = processor.count_tokens(processor.apply_chat_template(record_to_messages(record),
                                                                        chat_template="plain"))
    default_length = processor.count_tokens(processor.apply_chat_template(record_to_messages(record)))
    assert plain_length < default_length
    limit = (plain_length + default_length) // 2
    report = validate_records([record], processor, str(workspace), max_length=limit, chat_template="plain")
    assert report.too_long == {}
    assert len(validate_records([record], processor, str(workspace), max_length=limit).too_long) == 1
    batch = ConversationCollator(processor, str(workspace), chat_template="plain")([record])
    assert batch["input_ids"].shape[1] == plain_length


def test_plain_template_supervises_the_caption_only(workspace):
    processor = tiny_processor()
    batch = ConversationCollator(processor, str(workspace), chat_template="plain")(RECORDS[:1])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids[0] == processor.tokenizer.bos_token_id and (ids[1:5] == processor.image_token_id).all()
    supervised_text = processor.tokenizer.decode(labels[labels != -100])
    assert supervised_text.replace(" ", "") == "左侧股骨下段可见片状低密度影。\n".replace(" ", "")


def test_validation_names_each_problem_and_record(workspace):
    bad = [
        {"id": "missing", "image": "nope.png",
         "conversations": [{"from": "human", "value": "<image>\n描述"}, {"from": "gpt", "value": "好"}]},
        {"id": "count", "images": ["a.png"],
         "conversations": [{"from": "human", "value": "<image><image>描述"}, {"from": "gpt", "value": "好"}]},
        {"id": "empty", "conversations": [{"from": "human", "value": "描述"}, {"from": "gpt", "value": "  "}]},
        {"id": "long", "conversations": [{"from": "human", "value": "描述" * 80}, {"from": "gpt", "value": "好"}]},
    ]
    report = validate_records(bad, tiny_processor(), str(workspace), max_length=60)
    text = "\n".join(report.errors)
    assert "record 'missing'" in text and "nope.png" in text
    assert "record 'count': 2 <image> placeholder(s) but 1 image(s)" in text
    assert "record 'empty': turn 1: empty text" in text
    assert list(report.too_long) == ["long"]
    assert "records: 4" in report.summary()


def test_over_long_records_are_dropped_or_refused(workspace, tmp_path):
    path = tmp_path / "data.jsonl"
    long_record = {
        "id": "long", "conversations": [{"from": "human", "value": "描述" * 80}, {"from": "gpt", "value": "好"}]
    }
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [RECORDS[0], long_record]), encoding="utf-8")
    dataset = ConversationDataset(str(path), tiny_processor(), str(workspace), max_length=250)
    assert [r["id"] for r in dataset] == ["d1"]
    with pytest.raises(DataValidationError, match="long"):
        ConversationDataset(str(path), tiny_processor(), str(workspace), max_length=250, on_overflow="error")


def _train(workspace, output, stage, *extra):
    argv = ["train", "--stage", stage, "--model", str(workspace / "base"), "--data", str(workspace / "train.jsonl"),
            "--image-root", str(workspace), "--output-dir", str(output), "--per-device-train-batch-size", "2",
            "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--seed", "0", "--use-cpu",
            "--dataloader-num-workers", "0", *extra]
    assert cli(argv) == 0


def _base_state():
    return {k: v.clone() for k, v in tiny_model().state_dict().items()}


def test_align_trains_only_the_projector(workspace, tmp_path):
    _train(workspace, tmp_path / "align", "align", "--learning-rate", "1e-2")
    trained = load_file(tmp_path / "align" / "model.safetensors")
    base = _base_state()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed)


def test_instruct_trains_projector_and_llm_but_not_vision(workspace, tmp_path):
    _train(workspace, tmp_path / "instruct", "instruct", "--learning-rate", "1e-3")
    trained = load_file(tmp_path / "instruct" / "model.safetensors")
    base = _base_state()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert any(k.startswith("model.language_model.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert not any(k.startswith("model.vision_tower.") for k in changed)


def test_instruct_lora_saves_an_adapter(workspace, tmp_path):
    _train(workspace, tmp_path / "lora", "instruct", "--lora", "--lora-rank", "4")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert not (tmp_path / "lora" / "model.safetensors").exists()


@pytest.mark.parametrize("modules_to_save", [[], ["lm_head"]])
def test_hia_stage_saves_an_adapter_that_loads(workspace, tmp_path, modules_to_save):
    hia_flags = ["--num-queries", "8", "--num-heads", "4", "--encoder-depths", "1", "1", "--encoder-width", "8",
                 "--high-res-size", "56", "--learning-rate", "1e-3"]
    if modules_to_save:
        hia_flags += ["--modules-to-save", *modules_to_save]
    _train(workspace, tmp_path / "hia", "hia", *hia_flags)
    files = set(os.listdir(tmp_path / "hia"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    config = json.loads((tmp_path / "hia" / "adapter_config.json").read_text())
    assert config["peft_type"] == "HIA" and config["high_res_size"] == 56
    saved = load_file(tmp_path / "hia" / "adapter_model.safetensors")
    head = saved.get("base_model.model.lm_head.weight")
    if modules_to_save:  # the adapter's own trained copy of lm_head
        assert config["modules_to_save"] == ["lm_head"] and head is not None
        assert not torch.equal(head, _base_state()["lm_head.weight"])
    else:
        assert head is None
    model = PeftModel.from_pretrained(tiny_model(), tmp_path / "hia")
    batch = ConversationCollator(tiny_processor(), str(workspace))(RECORDS[:2])
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    assert (adapted - base).abs().max() > 0  # the trained adapter acts


def test_resume_reaches_the_same_weights(workspace, tmp_path):
    hia_flags = ["--num-queries", "8", "--num-heads", "4", "--encoder-depths", "1", "1", "--encoder-width", "8",
                 "--high-res-size", "56", "--learning-rate", "1e-3"]
    _train(workspace, tmp_path / "straight", "hia", *hia_flags)
    interrupted = tmp_path / "interrupted"
    _train(workspace, interrupted, "hia", *hia_flags)
    # Simulate a kill after the step-2 checkpoint: drop everything later, then resume.
    import shutil

    shutil.rmtree(interrupted / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.remove(interrupted / name)
    _train(workspace, interrupted, "hia", *hia_flags, "--resume")
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(interrupted / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)


def test_two_process_torchrun_trains_hia(workspace, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "qilin_med_vl.cli", "train", "--stage", "hia", "--model", str(workspace / "base"),
               "--data", str(workspace / "train.jsonl"), "--image-root", str(workspace), "--output-dir", str(output),
               "--per-device-train-batch-size", "1", "--max-steps", "2", "--use-cpu", "--report-to", "none",
               "--num-queries", "8", "--num-heads", "4", "--encoder-depths", "1", "1", "--encoder-width", "8",
               "--high-res-size", "56", "--log-level", "info"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = result.stdout + result.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 2" in logs, logs[-3000:]
    model = tiny_model()
    model.load_adapter(str(output))
    assert hia_is_active(model)


def test_evaluate_writes_predictions_and_per_task_scores(workspace, tmp_path):
    assert cli(["evaluate", "--model", str(workspace / "base"), "--data", str(workspace / "train.jsonl"),
                "--image-root", str(workspace), "--output-dir", str(tmp_path), "--max-new-tokens", "4",
                "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and rows[2]["references"] == ["骨折。"]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["per_task"]) == {"description", "comparative", "disease", "location"}
    header = (tmp_path / "scores.md").read_text(encoding="utf-8").splitlines()[0]
    assert all(f"{task} B4" in header and f"{task} M" in header for task in scores["per_task"]) and "AVG" in header


def test_training_arguments_come_from_a_yaml_file_and_flags_win(tmp_path):
    from qilin_med_vl.cli.train import parse_args

    config = tmp_path / "args.yaml"
    config.write_text("per_device_train_batch_size: 3\nlearning_rate: 5.0e-4\nlogging_steps: 7\n")
    args, hia_config, training_args = parse_args(["--stage", "hia", "--model", "m", "--data", "d.jsonl", "--config",
                                                  str(config), "--learning-rate", "1e-4", "--output-dir",
                                                  str(tmp_path)])
    assert training_args.per_device_train_batch_size == 3 and training_args.logging_steps == 7
    assert training_args.learning_rate == 1e-4  # the flag wins over the file
    assert training_args.lr_scheduler_type == "cosine" and training_args.warmup_steps == 0.03  # the paper's
    assert training_args.num_train_epochs == 1 and hia_config.num_queries == 256 and hia_config.high_res_size == 672
    assert args.stage == "hia" and args.data == ["d.jsonl"]


def test_train_flags_are_one_hf_argument_parser_over_stage_hia_and_training_arguments(tmp_path, capsys):
    from qilin_med_vl.cli.train import parse_args

    common = ["--model", "m", "--data", "a.jsonl", "b.jsonl", "--output-dir", str(tmp_path)]
    args, hia_config, training_args = parse_args(
        ["--stage", "hia", *common, "--layers", "0", "2", "--num-queries", "8", "--no-instruction-aware",
         "--encoder-depths", "1", "1", "1", "1", "--max-steps", "3"])
    assert (hia_config.layers, hia_config.num_queries, hia_config.instruction_aware) == ([0, 2], 8, False)
    assert hia_config.encoder_depths == [1, 1, 1, 1] and training_args.max_steps == 3 and args.data == ["a.jsonl",
                                                                                                           "b.jsonl"]
    # The earlier spellings of two flags still work.
    _, hia_config, _ = parse_args(["--stage", "hia", *common, "--hia-layers", "1", "--adapter-width", "64"])
    assert (hia_config.layers, hia_config.hidden_size) == ([1], 64)
    # PEFT's own bookkeeping is not a flag, and a HiA option on another stage is a mistake, not ignored.
    with pytest.raises(SystemExit, match="set by PEFT itself"):
        parse_args(["--stage", "hia", *common, "--inference-mode", "true"])
    with pytest.raises(SystemExit, match="needs --stage hia"):
        cli(["train", "--stage", "instruct", *common, "--num-queries", "8"])
    with pytest.raises(SystemExit) as exit_info:
        cli(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--num_queries" in help_text and "--per_device_train_batch_size" in help_text
    assert "--inference_mode" not in help_text


def test_shipped_distributed_configs_parse(tmp_path, caplog):
    from qilin_med_vl.cli.train import parse_args

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in ("deepspeed_zero2.json", "deepspeed_zero3.json"):
        stage = json.load(open(os.path.join(root, name)))["zero_optimization"]["stage"]
        assert stage == int(name[-6])
    # The FSDP file goes through the command's own parsing into TrainingArguments, in the current (non-deprecated)
    # form: FSDP2, full sharding of both towers' decoder layers.
    with caplog.at_level("WARNING"):
        _, _, training_args = parse_args(["--stage", "instruct", "--model", "m", "--data", "d.jsonl", "--config",
                                       os.path.join(root, "fsdp.yaml"), "--output-dir", str(tmp_path),
                                       "--use-cpu", "true"])  # bf16 on a CPU-only machine needs use_cpu
    assert training_args.fsdp_config["version"] == 2 and training_args.fsdp_config["reshard_after_forward"] is True
    assert training_args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    assert "deprecated" not in caplog.text


def test_fsdp_on_cpu_processes_is_refused_instead_of_silently_running_ddp(workspace, tmp_path):
    """accelerate turns FSDP on only for multi-accelerator runs; under torchrun on CPU the same flags would train
    every process on the whole model (DDP). The train command says so instead of pretending to shard."""
    fsdp_config = os.path.join(os.path.dirname(__file__), "..", "configs", "fsdp.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "qilin_med_vl.cli", "train", "--stage", "hia", "--model", str(workspace / "base"),
               "--data", str(workspace / "train.jsonl"), "--image-root", str(workspace), "--output-dir",
               str(tmp_path / "out"), "--per-device-train-batch-size", "1", "--max-steps", "1", "--use-cpu",
               "--bf16", "false", "--report-to", "none", "--num-queries", "8", "--num-heads", "4",
               "--encoder-depths", "1", "1", "--encoder-width", "8", "--high-res-size", "56", "--config", fsdp_config]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=600)
    assert result.returncode != 0
    assert "FSDP was requested" in result.stderr and "FSDP needs several GPUs" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
