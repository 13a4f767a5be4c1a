"""transformers' own common model tests (`ModelTesterMixin`) on Qilin-Med-VL, with transformers' Llava as a control.

The mixin is `tests/test_modeling_common.py` from the sdist of the *installed* transformers release, downloaded from
the package registry at test time and cached (never copied into this repository), so each end of the supported
range is tested with its own common tests. The sdist does not ship `tests/exporters/` and `tests/generation/`, which
that file imports only for two base mixins; they are replaced by empty classes, so the export and generation mixins
are not part of this run (generation is covered by our own tests on both ends of the range).

Both test classes use one tiny config, built once for `LlavaConfig` and once for `QilinMedVLConfig` (the two configs
have the same fields). The target: no test fails for Qilin-Med-VL that passes for Llava.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

import torch
import transformers
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel

from qilin_med_vl import QilinMedVLConfig, QilinMedVLForConditionalGeneration, QilinMedVLModel

CACHE_DIR = Path(os.environ.get("QILIN_TEST_CACHE", Path.home() / ".cache" / "qilin-med-vl"))
# Imported by test_modeling_common.py but absent from the sdist: the base mixins only, replaced by empty ones.
MISSING_SIBLINGS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def common_tests_folder(version: str) -> Path:
    """Download (once) the transformers `version` sdist and keep its `tests/test_modeling_common.py` as a package."""
    folder = CACHE_DIR / f"transformers_common_tests_{version.replace('.', '_')}"
    if (folder / "test_modeling_common.py").is_file():
        return folder
    with tempfile.TemporaryDirectory() as download_dir:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "--dest", download_dir],
            check=True,
        )
        (sdist,) = Path(download_dir).glob("transformers-*.tar.gz")
        with tarfile.open(sdist) as archive:
            member = archive.getmember(f"transformers-{version}/tests/test_modeling_common.py")
            source = archive.extractfile(member).read()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE_DIR))
    (staging / "__init__.py").write_text("")
    for relative, text in MISSING_SIBLINGS.items():
        (staging / relative).parent.mkdir(exist_ok=True)
        (staging / relative).parent.joinpath("__init__.py").write_text("")
        (staging / relative).write_text(text)
    (staging / "test_modeling_common.py").write_bytes(source)
    os.replace(staging, folder)  # atomic: a concurrent or interrupted run never sees half a folder
    return folder


def load_common_tests(version: str = transformers.__version__):
    folder = common_tests_folder(version)
    package_name = folder.name
    if package_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            package_name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[package_name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{package_name}.test_modeling_common")


common = load_common_tests()
# The mixin tells base models from models with a head (which get labels, a loss, training tests) by transformers'
# static class-name mappings, which list in-tree models only. Our classes are added to the test module's own copies
# of the two mappings that apply, as they would be listed were the model in-tree; transformers itself is untouched.
common.MODEL_MAPPING_NAMES = {**common.MODEL_MAPPING_NAMES, "qilin_med_vl": "QilinMedVLModel"}
common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES = {
    **common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "qilin_med_vl": "QilinMedVLForConditionalGeneration"
}

TEXT_CONFIG = {
    "model_type": "llama", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "intermediate_size": 37, "hidden_act": "silu", "max_position_embeddings": 512,
    "initializer_range": 0.02, "pad_token_id": 1, "bos_token_id": 1, "eos_token_id": 2,
}
VISION_CONFIG = {
    "model_type": "clip_vision_model", "image_size": 8, "patch_size": 2, "num_channels": 3, "hidden_size": 32,
    "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
    "initializer_range": 0.02,
}
IMAGE_TOKEN_ID = 0
IMAGE_SEQ_LENGTH = (VISION_CONFIG["image_size"] // VISION_CONFIG["patch_size"]) ** 2


class TinyVisionLanguageModelTester:
    """What `ModelTesterMixin` reads: a tiny config of `config_class` and a batch of 3 samples with one image each."""

    def __init__(self, parent, config_class):
        self.parent = parent
        self.config_class = config_class
        self.batch_size = 3
        self.text_seq_length = 7
        self.seq_length = self.text_seq_length + IMAGE_SEQ_LENGTH
        self.encoder_seq_length = self.seq_length
        self.num_hidden_layers = TEXT_CONFIG["num_hidden_layers"]
        self.hidden_size = TEXT_CONFIG["hidden_size"]
        self.vocab_size = TEXT_CONFIG["vocab_size"]
        self.num_attention_heads = TEXT_CONFIG["num_attention_heads"]
        self.pad_token_id = TEXT_CONFIG["pad_token_id"]
        self.is_training = True

    def get_config(self):
        return self.config_class(
            text_config=dict(TEXT_CONFIG),
            vision_config=dict(VISION_CONFIG),
            image_token_id=IMAGE_TOKEN_ID,
            image_seq_length=IMAGE_SEQ_LENGTH,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = common.floats_tensor(
            [self.batch_size, 3, VISION_CONFIG["image_size"], VISION_CONFIG["image_size"]]
        )
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[:, :IMAGE_SEQ_LENGTH] = IMAGE_TOKEN_ID
        attention_mask = torch.ones_like(input_ids)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


class CommonTestsSetup:
    _is_composite = True
    config_class = None

    def setUp(self):
        self.model_tester = TinyVisionLanguageModelTester(self, self.config_class)

    # transformers' own Llava test file skips the gradient-checkpointing tests ("does not compute gradients properly
    # when using GC": the vision tower's unused last layer gets no gradient); skipped here for both classes so the
    # control compares like with like. Gradient checkpointing is covered by tests/test_training.py.
    @unittest.skip("skipped for Llava in transformers' own test file")
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip("skipped for Llava in transformers' own test file")
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip("skipped for Llava in transformers' own test file")
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip("the sdist has no tests/generation/, so there is no GenerationTesterMixin to inherit from")
    def test_generation_tester_mixin_inheritance(self):
        pass


class TestLlavaCommon(CommonTestsSetup, common.ModelTesterMixin, unittest.TestCase):
    """The control: transformers' Llava with the tiny config."""

    config_class = LlavaConfig
    all_model_classes = (LlavaModel, LlavaForConditionalGeneration)


class TestQilinMedVLCommon(CommonTestsSetup, common.ModelTesterMixin, unittest.TestCase):
    config_class = QilinMedVLConfig
    all_model_classes = (QilinMedVLModel, QilinMedVLForConditionalGeneration)
