"""Conversions between Qilin-Med-VL and other checkpoint layouts.

- `convert_original`: the original LLaVA-fork release (+ CLIP) -> HF-native Qilin-Med-VL.
- `convert_llava_hf`: transformers' llava-hf checkpoints (LLaVA-1.5 and medical variants) -> Qilin-Med-VL.
- `export_llava_hf`: Qilin-Med-VL (base model) -> transformers' `LlavaForConditionalGeneration` (vLLM, SGLang).
"""

from .llava import llava_config_from_qilin, qilin_config_from_llava
from .llava_hf import convert_llava_hf, export_llava_hf
from .original import ConversionError, ConversionReport, convert_original, qilin_config_from_original

__all__ = [
    "ConversionError",
    "ConversionReport",
    "convert_llava_hf",
    "convert_original",
    "export_llava_hf",
    "llava_config_from_qilin",
    "qilin_config_from_llava",
    "qilin_config_from_original",
]
