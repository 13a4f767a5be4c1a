"""The model files that travel with checkpoints as remote code (one flat folder, single-dot imports only)."""

from .configuration_qilin_med_vl import QilinMedVLConfig
from .modeling_qilin_med_vl import (
    QilinMedVLForConditionalGeneration,
    QilinMedVLModel,
    QilinMedVLPreTrainedModel,
)

__all__ = [
    "QilinMedVLConfig",
    "QilinMedVLForConditionalGeneration",
    "QilinMedVLModel",
    "QilinMedVLPreTrainedModel",
]
