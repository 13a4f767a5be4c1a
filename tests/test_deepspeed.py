"""DeepSpeed ZeRO-2 and ZeRO-3 with the shipped configs (`configs/deepspeed_zero{2,3}.json`): the HiA stage through
`qilin-med-vl train` under `torch.distributed.run`, 2 CPU processes (DeepSpeed's CPU accelerator, gloo).

Each run trains 2 steps with a global batch of 2 and is compared with one process taking the same 2 samples per step
by gradient accumulation: same data, same seed, same updates."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import write_training_workspace
from peft import PeftModel
from safetensors.torch import load_file

from qilin_med_vl.testing import tiny_model, tiny_processor
from qilin_med_vl.training import ConversationCollator

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install 'qilin-med-vl[distributed]'")

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
RECORDS = [
    {"id": "d1", "image": "a.png",
     "conversations": [{"from": "human", "value": "<image>\n描述这张图片。"},
                       {"from": "gpt", "value": "左侧股骨下段可见片状低密度影。"}]},
    {"id": "c1", "images": ["a.png", "b.png"],
     "conversations": [{"from": "human", "value": "<image>\n<image>\n请对比两张图片。"},
                       {"from": "gpt", "value": "第二张相比第一张好转。"}]},
    {"id": "m1", "images": ["b.png"],
     "conversations": [{"from": "human", "value": "<image>\n是否有异常？"}, {"from": "gpt", "value": "有。"},
                       {"from": "human", "value": "什么病变？"}, {"from": "gpt", "value": "骨折。"}]},
]
HIA_FLAGS = ["--num-queries", "8", "--num-heads", "4", "--encoder-depths", "1", "1", "--encoder-width", "8",
             "--high-res-size", "56"]
# Runs: (processes, DeepSpeed config or None); one process accumulates 2 micro-batches of 1, as 2 processes do.
RUNS = {
    "plain-1": (1, None),
    "zero2-2": (2, "deepspeed_zero2.json"),
    "zero3-2": (2, "deepspeed_zero3.json"),
    "zero3-1": (1, "deepspeed_zero3.json"),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_training_workspace(tmp_path_factory.mktemp("deepspeed"), RECORDS)


@pytest.fixture(scope="module")
def runs(workspace):
    """Each run's output folder and log, launched the first time a test asks for it."""
    done = {}

    def run(name):
        if name not in done:
            processes, config = RUNS[name]
            output = workspace / name
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                       "--standalone", "-m", "qilin_med_vl.cli", "train",
                       "--stage", "hia", "--model", str(workspace / "base"), "--data", str(workspace / "train.jsonl"),
                       "--image-root", str(workspace), "--output-dir", str(output), "--use-cpu", "--bf16", "false",
                       "--per-device-train-batch-size", "1", "--gradient-accumulation-steps", str(3 - processes),
                       "--max-steps", "2", "--save-steps", "1", "--learning-rate", "1e-3", "--warmup-steps", "0",
                       "--seed", "0", "--logging-steps", "1", "--report-to", "none", "--log-level", "info",
                       *HIA_FLAGS, *(["--deepspeed", os.path.join(CONFIGS, config)] if config else [])]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
            logs = result.stdout + result.stderr
            assert result.returncode == 0, logs[-5000:]
            assert "Total train batch size (w. parallel, distributed & accumulation) = 2" in logs, logs[-3000:]
            done[name] = output, logs
        return done[name]

    return run


def _adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _parameters(adapter: dict) -> dict[str, torch.Tensor]:
    """The trained tensors. BatchNorm's running statistics are buffers: each process updates them with its own
    samples and rank 0's are saved, so they are not expected to match one process that saw every sample."""
    return {key: value for key, value in adapter.items() if "running_" not in key and "num_batches_tracked" not in key}


def _assert_trains_like_one_process(adapter: dict, reference: dict) -> None:
    trained, expected = _parameters(adapter), _parameters(reference)
    assert trained.keys() == expected.keys() and len(trained) > 50
    for key in expected:
        assert trained[key].shape == expected[key].shape and trained[key].numel() > 0, key
        torch.testing.assert_close(trained[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


def _assert_changed_by_the_last_step(output) -> None:
    """The optimizer updated the (partitioned) parameters and the save took the update: every tensor of the block
    after decoder layer 1 differs from the adapter saved after step 1. (The tiny language model has 3 layers; the
    block after the last one edits image tokens that nothing reads afterwards, so it gets no gradient.)"""
    before, after = _parameters(_adapter(output / "checkpoint-1")), _parameters(_adapter(output))
    block = [key for key in after if ".layers.1.hia." in key]
    assert len(block) > 50
    unchanged = [key for key in block if torch.equal(before[key], after[key])]
    assert not unchanged, unchanged


def _assert_loads_and_acts(folder, workspace) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "HIA" and config["high_res_size"] == 56
    model = PeftModel.from_pretrained(tiny_model(), folder)
    batch = ConversationCollator(tiny_processor(), str(workspace))(RECORDS[:2])
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    assert (adapted - base).abs().max() > 0


def _assert_halved(output, stage: int, trained: int) -> None:
    """Each of the 2 processes held half of HiA's fp32 weights in the final ZeRO checkpoint (give or take the
    padding DeepSpeed adds to make each parameter group divisible by the world size)."""
    folder = output / "checkpoint-2" / "global_step2"
    sizes = []
    for rank in range(2):
        state = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)["optimizer_state_dict"]
        assert int(state["zero_stage"]) == stage
        groups = state["fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"]
        sizes.append(sum(group.numel() for group in groups))
    assert sizes[0] == sizes[1] and trained <= sum(sizes) <= trained + 2 * len(groups), (sizes, trained)


def _gathered(output) -> dict[str, torch.Tensor]:
    """The HiA tensors DeepSpeed's own `zero_to_fp32` gathers from the processes' ZeRO checkpoint files, under the
    adapter file's names."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(output / "checkpoint-2"))
    return {key.replace(".hia.default.", ".hia."): value for key, value in state.items() if ".hia." in key}


def _trainable_line(logs: str) -> str:
    return re.search(r"stage hia: \d+ of \d+ parameters train \([\d.]+%\)", logs).group(0)


def test_zero2_two_processes_train_hia_as_one_process_does(runs, workspace):
    output, _ = runs("zero2-2")
    adapter = _adapter(output)
    _assert_trains_like_one_process(adapter, _adapter(runs("plain-1")[0]))
    _assert_changed_by_the_last_step(output)
    # ZeRO-2 partitioned the optimizer state: each process held half of HiA's fp32 weights.
    trained = sum(value.numel() for value in _parameters(adapter).values())
    _assert_halved(output, 2, trained)
    gathered = _gathered(output)
    for key, value in _parameters(adapter).items():
        assert torch.equal(value, gathered[key]), key
    _assert_loads_and_acts(output, workspace)


def test_zero3_partitions_trains_and_saves_hia_whole(runs, workspace):
    output, logs = runs("zero3-2")
    adapter = _adapter(output)
    plain, plain_logs = runs("plain-1")
    # The base model was loaded under zero.Init with both processes (it refused the batch size before the train
    # command initialised deepspeed.comm on CPU processes); the parameter count sees the partitioned weights whole.
    assert _trainable_line(logs) == _trainable_line(plain_logs)
    # HiA's parameters were partitioned (each process held half), trained and saved whole: every tensor has the
    # shape one process saves and equals what zero_to_fp32 gathers from the processes' partitions.
    trained = sum(value.numel() for value in _parameters(_adapter(plain)).values())
    _assert_halved(output, 3, trained)
    expected_shapes = {key: value.shape for key, value in _adapter(plain).items()}
    assert {key: value.shape for key, value in adapter.items()} == expected_shapes
    gathered = _gathered(output)
    for key, value in _parameters(adapter).items():
        assert torch.equal(value, gathered[key]), key
    _assert_changed_by_the_last_step(output)
    # ZeRO-3 initialises HiA from a different random state than a plain load (zero.Init draws random numbers while
    # building the base model), so the reference is one process under ZeRO-3.
    _assert_trains_like_one_process(adapter, _adapter(runs("zero3-1")[0]))
    _assert_loads_and_acts(output, workspace)
