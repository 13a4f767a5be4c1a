"""Evaluation utilities: Chinese tokenisation, BLEU-4 / METEOR, per-task tables.

Importing this package is cheap; ``evaluate`` and ``jieba`` are imported only
when needed.
"""

from .scoring import CAPTION_METRICS_PATH, format_markdown_table, load_caption_metrics, score_by_task
from .tokenization import get_tokenizer, normalize_text, tokenize_zh

__all__ = [
    "CAPTION_METRICS_PATH",
    "format_markdown_table",
    "get_tokenizer",
    "load_caption_metrics",
    "normalize_text",
    "score_by_task",
    "tokenize_zh",
]
