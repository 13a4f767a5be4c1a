"""qilin-med-vl: Qilin-Med-VL and the HiA adapter, native to Hugging Face transformers and PEFT.

Importing the package registers the config, model, image processor and processor with transformers' auto classes
(so local folders load without `trust_remote_code`) and the HiA adapter type with PEFT.
"""

import logging


def _drop_bitsandbytes_kernel_notice(record: logging.LogRecord) -> bool:
    # PEFT imports bitsandbytes whenever it is installed, and bitsandbytes then announces at import time that an
    # optional CPU 4-bit kernel package is missing, before any command has run and whether or not quantization is
    # used. 4-bit still works without that package (bitsandbytes falls back to its own kernel).
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bitsandbytes_kernel_notice)

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling.configuration_hia import HiAConfig  # noqa: E402
from .modeling.configuration_qilin_med_vl import QilinMedVLConfig  # noqa: E402
from .modeling.modeling_hia import HiAModel  # noqa: E402
from .modeling.modeling_qilin_med_vl import (  # noqa: E402
    QilinMedVLForConditionalGeneration,
    QilinMedVLModel,
    QilinMedVLPreTrainedModel,
)
from .processing.image_loading_qilin import ImageLoadingError, load_image  # noqa: E402
from .processing.image_processing_qilin import QilinImageProcessor  # noqa: E402
from .processing.processing_qilin import QilinProcessor  # noqa: E402

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(QilinMedVLConfig.model_type, QilinMedVLConfig, exist_ok=True)
    AutoModel.register(QilinMedVLConfig, QilinMedVLForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(QilinMedVLConfig, QilinMedVLForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(QilinMedVLConfig, slow_image_processor_class=QilinImageProcessor, exist_ok=True)
    AutoProcessor.register(QilinMedVLConfig, QilinProcessor, exist_ok=True)
    # So that save_pretrained writes `auto_map` and copies the remote-code files next to the weights.
    QilinMedVLConfig.register_for_auto_class()
    QilinMedVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    QilinImageProcessor.register_for_auto_class("AutoImageProcessor")
    QilinProcessor.register_for_auto_class("AutoProcessor")


_register()

__all__ = [
    "HiAConfig",
    "HiAModel",
    "ImageLoadingError",
    "QilinImageProcessor",
    "QilinMedVLConfig",
    "QilinMedVLForConditionalGeneration",
    "QilinMedVLModel",
    "QilinMedVLPreTrainedModel",
    "QilinProcessor",
    "load_image",
]
