"""Conversions between Qilin-Med-VL and other checkpoint layouts.

- `convert_original`: the original LLaVA-fork release (+ CLIP) -> HF-native Qilin-Med-VL.
- `convert_llava_hf`: transformers' llava-hf checkpoints (LLaVA-1.5 and medical variants) -> Qilin-Med-VL.
- `export_llava_hf`: Qilin-Med-VL (base model) -> transformers' `LlavaForConditionalGeneration` (vLLM, SGLang).

What they are built from: `checkpoint_io` (finding weight files, reading them memory-mapped, writing safetensors
shards tensor by tensor), `key_rules` (which source tensor becomes which output tensor, or why it is dropped),
`report` (the account of every source tensor and the completeness check), `staging` (an output folder that appears
only when complete), `assets` (config with remote code, tokenizer, processor, generation config) and `llava`
(config mapping to and from transformers' Llava).
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
