"""Tokenisation of Chinese (medical) report text for n-gram metrics.

This module is the single implementation of the tokenisers used by the
caption metrics (``qilin_med_vl/evaluation/caption_metrics``).  It depends only
on the standard library; ``jieba`` is imported lazily for ``mode="jieba"``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable, List, Union

__all__ = ["TOKENIZER_MODES", "normalize_text", "tokenize_zh", "get_tokenizer"]

TOKENIZER_MODES = ("char", "jieba")

# A run of ASCII letters/digits.  A "." is kept inside the run only when it sits
# between two digits, so decimal numbers stay whole ("3.5cm", "1.5T", "v1.2").
_ALNUM_RUN = r"(?:[A-Za-z0-9]|(?<=[0-9])\.(?=[0-9]))+"
# Either such a run or any single non-whitespace character.
_CHAR_TOKEN_RE = re.compile(_ALNUM_RUN + r"|\S")

_JIEBA = None


def normalize_text(text: str) -> str:
    """NFKC-normalise ``text`` and drop control/format characters.

    NFKC maps full-width forms to half-width (``"Ｔ２ＷＩ"`` -> ``"T2WI"``,
    ``"，"`` -> ``","``, ``"："`` -> ``":"``, ``"（"`` -> ``"("``, the ideographic
    space U+3000 -> ``" "``) and compatibility characters to their canonical
    spelling (``"㎝"`` -> ``"cm"``, ``"…"`` -> ``"..."``).  Characters of Unicode
    category ``Cc``/``Cf`` that are not whitespace (zero-width space, BOM, soft
    hyphen, ...) are removed.  Characters without a half-width form, such as
    ``"。"``, ``"、"``, ``"《"`` or ``"“"``, are left unchanged.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text)
    return "".join(
        ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf")
    )


def _load_jieba():
    global _JIEBA
    if _JIEBA is None:
        try:
            import jieba  # noqa: PLC0415 (optional dependency, imported lazily)
        except ImportError as err:  # pragma: no cover - exercised only without jieba
            raise ImportError(
                'tokenize_zh(mode="jieba") needs the jieba word segmenter; '
                "install it with `pip install jieba`, or use mode=\"char\"."
            ) from err
        import logging

        jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict ..." messages
        _JIEBA = jieba
    return _JIEBA


def tokenize_zh(text: str, mode: str = "char") -> List[str]:
    """Split Chinese (medical) text into tokens for BLEU / METEOR.

    Both modes first apply :func:`normalize_text` (NFKC normalisation, so
    full-width letters, digits and punctuation become half-width, and removal of
    non-whitespace control/format characters).  Case is preserved.

    ``mode="char"`` (default), applied left to right:

    1. Whitespace (any character for which ``str.isspace()`` is true) separates
       tokens and is dropped.
    2. A maximal run of ASCII letters and digits ``[A-Za-z0-9]`` is one token.
       A ``"."`` directly between two digits is part of the run, so decimal
       numbers stay whole: ``"T2WI"`` -> ``["T2WI"]``, ``"3.5cm"`` ->
       ``["3.5cm"]``, ``"1.5T"`` -> ``["1.5T"]``; any other ``"."`` is its own
       token (``"5."`` -> ``["5", "."]``).
    3. Every other character is one token on its own: each CJK ideograph, each
       CJK punctuation mark (``"。"``, ``"、"``, ``"《"``), each ASCII
       punctuation/symbol (``","``, ``"("``, ``"%"``, ``"/"``, ``"-"``) and
       each non-ASCII letter or symbol (``"β"``, ``"×"``, ``"°"``).

    Example: ``"右肺上叶见3.5cm×2cm结节，T2WI呈高信号。"`` ->
    ``["右", "肺", "上", "叶", "见", "3.5cm", "×", "2cm", "结", "节", ",",
    "T2WI", "呈", "高", "信", "号", "。"]``.

    ``mode="jieba"``: the normalised text is segmented with ``jieba.lcut``
    (default dictionary, HMM on); tokens are stripped of surrounding whitespace
    and whitespace-only tokens are dropped.  Requires ``pip install jieba``.

    Args:
        text: the text to tokenise.
        mode: ``"char"`` or ``"jieba"``.

    Returns:
        The list of tokens; ``[]`` for empty or whitespace-only text.
    """
    text = normalize_text(text)
    if mode == "char":
        return _CHAR_TOKEN_RE.findall(text)
    if mode == "jieba":
        jieba = _load_jieba()
        if not text.strip():
            return []
        tokens = (tok.strip() for tok in jieba.lcut(text))
        return [tok for tok in tokens if tok]
    raise ValueError(f"unknown tokenizer mode {mode!r}; expected one of {TOKENIZER_MODES}")


def get_tokenizer(tokenizer: Union[str, Callable[[str], List[str]]] = "char") -> Callable[[str], List[str]]:
    """Return a ``text -> tokens`` callable for a mode name or a callable."""
    if callable(tokenizer):
        return tokenizer
    if tokenizer not in TOKENIZER_MODES:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZER_MODES} or a callable")
    if tokenizer == "jieba":
        _load_jieba()  # fail early with the install hint
    return lambda text: tokenize_zh(text, mode=tokenizer)
