"""The processor files that travel with checkpoints as remote code (one flat folder, single-dot imports only)."""

from .image_loading_qilin import ImageLoadingError, load_image
from .image_processing_qilin import QilinImageProcessor
from .processing_qilin import QilinProcessor

__all__ = ["ImageLoadingError", "QilinImageProcessor", "QilinProcessor", "load_image"]
