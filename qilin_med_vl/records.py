# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The LLaVA record format shared by training, evaluation and the dataset converters: one streaming reader and the
rules every record must follow.

A record::

    {"id": "0001", "images": ["before.png", "after.dcm"],        # or "image": "a.png"
     "conversations": [{"from": "human", "value": "<image>\\n<image>\\n请对比两张图片。"},
                       {"from": "gpt", "value": "第二张相比第一张..."}],
     "task": "comparative"}                                         # optional
"""

import json
import os
from collections.abc import Iterator
from typing import Any

JSON_CHUNK_CHARACTERS = 1 << 20
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataValidationError(ValueError):
    """Raised with every problem found, each naming the record id."""


def _iter_json_lines(handle, name: str) -> Iterator[tuple[str, Any, str | None]]:
    for line_number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{line_number}", json.loads(line), None
        except json.JSONDecodeError as error:
            yield f"{name}:{line_number}", None, str(error)


def _iter_json_list(handle, name: str, chunk_characters: int) -> Iterator[tuple[str, Any, str | None]]:
    """The items of a JSON list, decoded one at a time from chunks of the file: memory holds one chunk and one item,
    never the whole list. A syntax error inside the list cannot be skipped (where the next item starts is unknown),
    so it raises."""
    decoder = json.JSONDecoder()
    buffer, position, end_of_file = "", 0, False

    def read_more() -> None:
        nonlocal buffer, position, end_of_file
        chunk = handle.read(chunk_characters)
        end_of_file = not chunk
        buffer, position = buffer[position:] + chunk, 0

    def peek() -> str:
        """The next character that is not whitespace, without consuming it; "" at the end of the file."""
        nonlocal position
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n":
                position += 1
            if position < len(buffer):
                return buffer[position]
            if end_of_file:
                return ""
            read_more()

    def fail(message: str):
        raise ValueError(f"{name}: {message} (list item {index})")

    index = 0
    if peek() != "[":
        fail("a .json file must hold a list of records")
    position += 1
    if peek() == "]":
        return
    while True:
        peek()
        while True:
            try:
                item, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as error:
                if end_of_file:
                    fail(f"not valid JSON ({error.msg})")
                read_more()
                continue
            if end == len(buffer) and not end_of_file:  # a number or literal may go on in the next chunk
                read_more()
                continue
            break
        position = end
        yield f"{name}[{index}]", item, None
        index += 1
        separator = peek()
        position += 1
        if separator == "]":
            return
        if separator != ",":
            fail(f"expected ',' or ']' after an item, found {separator or 'the end of the file'!r}")


def iter_source_records(path: str | os.PathLike, chunk_characters: int = JSON_CHUNK_CHARACTERS
                        ) -> Iterator[tuple[str, Any, str | None]]:
    """Stream `(source, item, error)` from a `.jsonl` file (one object a line) or a `.json` list.

    `source` names the place (`file.jsonl:12`, `file.json[11]`); `error` is the JSON error of an unreadable line
    (then `item` is None); such a line is reported, and reading goes on. A `.json` file whose first character is not
    "[" is read as JSON lines.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    with open(path, encoding="utf-8-sig") as handle:
        if path.endswith(".jsonl"):
            yield from _iter_json_lines(handle, name)
            return
        first = handle.read(1)
        while first and first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if first == "[":
            yield from _iter_json_list(handle, name, chunk_characters)
        else:
            yield from _iter_json_lines(handle, name)


def read_records(path: str | os.PathLike):
    """Yield the records of a `.json` (a list) or `.jsonl` (one per line) file, streaming both (`iter_source_records`).
    A file that is not UTF-8 JSON, is empty or is not a list raises `DataValidationError` naming the file (and the
    line or list item)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            if not handle.read(4096).strip() and not handle.read(1):
                raise DataValidationError(f"{path}: the file is empty (a data file holds a list of records, or "
                                          "one record a line)")
        for source, record, error in iter_source_records(path):
            if error is not None:
                raise DataValidationError(f"{path} ({source}): not valid JSON ({error})")
            yield record
    except UnicodeDecodeError as error:
        raise DataValidationError(f"{path}: not a UTF-8 text file, so not JSON data ({error.reason} at byte "
                                  f"{error.start})") from None
    except (FileNotFoundError, IsADirectoryError) as error:
        raise DataValidationError(f"{path}: {error.strerror}") from None
    except ValueError as error:  # a .json list broken in the middle (where the next item starts is unknown)
        if isinstance(error, DataValidationError):
            raise
        raise DataValidationError(f"{path}: not valid JSON ({error})") from None


def record_images(record: dict) -> list[str]:
    images = record.get("images", record.get("image", []))
    return [images] if isinstance(images, str) else list(images or [])


def record_structure_problems(record) -> list[str]:
    """What makes `record` unusable as data before its content is looked at: not an object, `conversations` not a
    list of `{"from", "value"}` objects with string values, images not a path or a list of paths."""
    if not isinstance(record, dict):
        return [f"not a record object but a {type(record).__name__}"]
    problems = []
    conversations = record.get("conversations")
    if conversations is not None and not isinstance(conversations, list):
        problems.append(f"conversations is a {type(conversations).__name__}, not a list of turns")
    for turn_index, turn in enumerate(conversations if isinstance(conversations, list) else []):
        if not isinstance(turn, dict):
            problems.append(f"turn {turn_index}: a {type(turn).__name__}, not a {{'from', 'value'}} object")
        elif not isinstance(turn.get("value", ""), str):
            problems.append(f"turn {turn_index}: value is a {type(turn['value']).__name__}, not text")
    images = record.get("images", record.get("image", []))
    if images is not None and not isinstance(images, str) and (
            not isinstance(images, list) or not all(isinstance(image, str) for image in images)):
        problems.append(f"images must be a file path or a list of file paths, got {images!r:.80}")
    return problems


def record_task(record: dict) -> str:
    return record.get("task") or "default"


def record_to_messages(record: dict) -> list[dict]:
    """Chat messages for `QilinProcessor.apply_chat_template` (placeholders stay inline in the text)."""
    messages = []
    for turn in record["conversations"]:
        role = ROLE_NAMES.get(turn.get("from"))
        if role is None:
            raise DataValidationError(f"record {record.get('id')!r}: unknown speaker {turn.get('from')!r}")
        messages.append({"role": role, "content": turn.get("value", "")})
    return messages
