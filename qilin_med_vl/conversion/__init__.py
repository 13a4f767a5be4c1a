"""Conversions between Qilin-Med-VL and other checkpoint layouts."""

from .llava import llava_config_from_qilin, qilin_config_from_llava

__all__ = ["llava_config_from_qilin", "qilin_config_from_llava"]
