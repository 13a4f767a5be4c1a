"""The embedded demo model's builder and installer: used by this experiment to create the untrained demo base and to
copy the trained model into the package (`qilin_med_vl/demo_model/`). Not part of the package.

    python experiments/synthetic_hia/demo_builder.py install runs/demo/base runs/demo/HiA
"""

import json
import shutil
import sys
from pathlib import Path

import torch

from qilin_med_vl.loading import DEMO_MODEL_DIR
from qilin_med_vl.modeling.configuration_qilin_med_vl import QilinMedVLConfig
from qilin_med_vl.modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration
from qilin_med_vl.processing.image_processing_qilin import QilinImageProcessor
from qilin_med_vl.processing.processing_qilin import IMAGE_TOKEN, QilinProcessor
from qilin_med_vl.testing import tiny_tokenizer


def build_demo_base_model(output_dir, characters: str = "", seed: int = 0):
    """Create the untrained demo base: CLIP-style ViT at 112 px (64 image tokens), a 4-layer Llama of width 256,
    the character-level tokenizer of `qilin_med_vl.testing` extended with `characters`, and a processor whose
    high-resolution view is 448 px. Saved to `output_dir`; returns `(model, processor)`."""

    tokenizer = tiny_tokenizer(model_max_length=1024, extra_characters=characters)
    image_size, patch_size = 112, 14
    config = QilinMedVLConfig(
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": 128, "intermediate_size": 512,
            "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": image_size, "patch_size": patch_size,
            "projection_dim": 128,
        },
        text_config={
            "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
            "vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
    )
    torch.manual_seed(seed)
    model = QilinMedVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    processor = QilinProcessor(
        image_processor=QilinImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            high_res_size=448,
        ),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return model, processor


def install_demo_model(base_dir, hia_dir, target_dir=DEMO_MODEL_DIR) -> None:
    """Copy a trained base model and its HiA adapter into the package as the embedded demo model.

    The remote-code `.py` files and `auto_map` entries are left out: the installed package registers its classes,
    so the embedded copy holds weights and configuration only. `examples/` in the target is kept.
    """
    base_dir, hia_dir, target_dir = Path(base_dir), Path(hia_dir), Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    for path in list(target_dir.iterdir()):
        if path.name != "examples":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in base_dir.iterdir():
        if path.is_file() and path.suffix != ".py" and not path.name.startswith(("training_args", "trainer_state")):
            shutil.copy2(path, target_dir / path.name)
        elif path.name == "additional_chat_templates":
            shutil.copytree(path, target_dir / path.name)
    for name in ("config.json", "processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = target_dir / name
        if path.is_file():
            content = json.loads(path.read_text(encoding="utf-8"))
            content.pop("auto_map", None)
            if isinstance(content.get("image_processor"), dict):
                content["image_processor"].pop("auto_map", None)
            path.write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (target_dir / "hia").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(hia_dir / name, target_dir / "hia" / name)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "install":
        sys.exit("usage: demo_builder.py install BASE_DIR HIA_DIR")
    install_demo_model(sys.argv[2], sys.argv[3])
