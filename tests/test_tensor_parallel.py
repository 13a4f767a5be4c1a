"""`from_pretrained(..., tp_plan="auto")`: transformers' tensor parallelism shards the model across processes; two CPU
processes (gloo) give the logits one process gives, for the base model and with HiA attached."""

import os
import subprocess
import sys
import textwrap

import torch
from peft import PeftModel

from qilin_med_vl.testing import random_image, tiny_model, tiny_processor

PROMPT = "USER: <image>\n<image>\n第一张和第二张分别是治疗前后的图片，请对比两张图片。 ASSISTANT:"

TENSOR_PARALLEL_RUN = textwrap.dedent(
    """
    import os, sys, torch
    import qilin_med_vl  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    folder, output = sys.argv[1], sys.argv[2]
    inputs = torch.load(folder + "/inputs.pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, tp_plan="auto").eval()
    sharded = type(model.lm_head.weight).__name__ == "DTensor"
    layer = model.model.language_model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        base = model(**{k: v for k, v in inputs.items() if k != "high_res_pixel_values"}).logits
        adapted = PeftModel.from_pretrained(model, folder + "/hia").eval()
        with_hia = adapted(**inputs).logits
    if int(os.environ["RANK"]) == 0:
        torch.save({"base": base, "hia": with_hia, "lm_head_sharded": sharded,
                    "q_proj_local_rows": layer.to_local().shape[0] if hasattr(layer, "to_local") else None}, output)
    """
)


def test_tensor_parallel_logits_equal_one_process(tmp_path):
    from test_hia import hia_model  # a HiA adapter whose output projection is non-zero

    model, processor = tiny_model(), tiny_processor()
    model.save_pretrained(tmp_path)
    hia_model().save_pretrained(tmp_path / "hia")
    inputs = dict(processor(images=[random_image(0), random_image(1)], text=PROMPT, return_tensors="pt"))
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected_base = model.eval()(**{k: v for k, v in inputs.items() if k != "high_res_pixel_values"}).logits
        expected_hia = PeftModel.from_pretrained(tiny_model(), tmp_path / "hia").eval()(**inputs).logits

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(tmp_path / "run.py"), str(tmp_path), str(tmp_path / "out.pt")]
    (tmp_path / "run.py").write_text(TENSOR_PARALLEL_RUN)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["lm_head_sharded"]  # the plan covers the head
    assert out["q_proj_local_rows"] == model.config.text_config.hidden_size // 2  # each rank holds half a layer
    torch.testing.assert_close(out["base"], expected_base, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["hia"], expected_hia, atol=1e-5, rtol=0)
