"""What differs between the transformers releases the package supports (5.23: `past_key_values`; 5.24: `cache`),
pinned on whichever release is installed: CI runs this file at both ends of the range."""

import logging
import os
import subprocess
import sys
import textwrap
import warnings
from threading import Thread

import torch
import transformers
from packaging import version
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TextIteratorStreamer

from qilin_med_vl import HiAConfig
from qilin_med_vl.modeling.modeling_qilin_med_vl import CACHE_NAME
from qilin_med_vl.testing import tiny_model

PROMPT = "USER: <image>\n<image>\n对比两张图片。 ASSISTANT:"


def test_cache_name_follows_the_installed_release():
    expected = "cache" if version.parse(transformers.__version__) >= version.parse("5.24") else "past_key_values"
    assert CACHE_NAME == expected


def test_return_dict_false_gives_tuples(processor, images):
    model = tiny_model().eval()
    inputs = processor(images=images[:2], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        base_tuple = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)
    torch.testing.assert_close(base_tuple[0], model.model(**inputs).last_hidden_state)


def test_the_old_cache_argument_name_gives_the_same_step(processor, images):
    model = tiny_model().eval()
    inputs = processor(images=images[:2], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        step = {"input_ids": torch.tensor([[5]]), "use_cache": True}
        new_name = model(**step, cache=getattr(prefill, CACHE_NAME)).logits
        prefill = model(**inputs, use_cache=True)
        old_name = model(**step, past_key_values=getattr(prefill, CACHE_NAME)).logits
    torch.testing.assert_close(new_name, old_name)


def _hia_model():
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(), HiAConfig(num_queries=4, num_heads=2, high_res_size=56))
    for name, parameter in model.named_parameters():
        if "output_proj" in name:  # a new adapter is the identity; make it act
            torch.nn.init.normal_(parameter, std=0.1)
    return model.eval()


def test_generation_with_hia_streams_and_warns_of_nothing_deprecated(processor, images, caplog):
    model = _hia_model()
    inputs = processor(images=images[:2], text=PROMPT, return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        thread = Thread(target=model.generate, kwargs={**inputs, "max_new_tokens": 6, "do_sample": False,
                                                       "streamer": streamer})
        thread.start()
        streamed = "".join(streamer)
        thread.join()
    prompt_length = inputs["input_ids"].shape[1]
    assert streamed == processor.tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "deprecat" in m.lower()], messages


def test_static_cache_generation_equals_the_dynamic_cache(processor, images):
    model = tiny_model().eval()
    inputs = processor(images=images[:2], text=PROMPT, return_tensors="pt")
    dynamic = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    static = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_the_base_path_compiles_as_one_graph(processor, images):
    model = tiny_model().eval()
    inputs = processor(images=images[:2], text=PROMPT, return_tensors="pt")
    inputs.pop("high_res_pixel_values")
    with torch.no_grad():
        expected = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")  # graph capture only: no C++ build here
        torch.testing.assert_close(compiled(**inputs).logits, expected)


def test_loaded_weights_equal_saved_weights(tmp_path, processor):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).state_dict()
    assert set(saved) <= set(loaded)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name

    adapted = _hia_model()
    adapted.save_pretrained(tmp_path / "hia")
    saved_adapter = load_file(tmp_path / "hia" / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "hia").state_dict()
    reloaded = {name.replace(".hia.default.", ".hia."): value for name, value in reloaded.items()}
    for name, tensor in saved_adapter.items():
        assert torch.equal(reloaded[name], tensor), name


def test_remote_code_refuses_a_transformers_older_than_the_minimum(tmp_path):
    import qilin_med_vl.modeling.configuration_qilin_med_vl as configuration

    script = textwrap.dedent(
        f"""
        import runpy, transformers
        transformers.__version__ = "5.22.0"
        runpy.run_path({configuration.__file__!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert result.returncode != 0
    assert "needs transformers>=5.23.0, but transformers 5.22.0 is installed" in result.stderr


def test_the_cli_prints_nothing_from_bitsandbytes():
    result = subprocess.run([sys.executable, "-m", "qilin_med_vl.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "bitsandbytes" not in result.stderr and "kernels" not in result.stderr
    # The notice bitsandbytes logs at import on CPUs with AVX512-BF16 (not every machine): filtered by the package.
    import qilin_med_vl  # noqa: F401

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", ("x",), None)
    assert not logger.filter(record)
    assert logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "something else", (), None))


def test_remote_code_loads_every_saved_tensor_unchanged(tmp_path):
    import qilin_med_vl  # noqa: F401

    tiny_model().save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        """
        import sys, torch
        sys.modules["qilin_med_vl"] = None  # remote code only
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText
        folder = sys.argv[1]
        loaded = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).state_dict()
        saved = load_file(folder + "/model.safetensors")
        different = [name for name, tensor in saved.items() if not torch.equal(loaded[name], tensor)]
        assert not different, different
        print("ALL-EQUAL", len(saved))
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ALL-EQUAL" in result.stdout
