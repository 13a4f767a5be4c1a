# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint files in and out, one tensor at a time.

Reading: the weight files of a checkpoint folder (or Hub repo), `.safetensors` through `safetensors.safe_open` and
`.bin` through `torch.load(weights_only=True, mmap=True)`; both map the file, so a tensor is read from disk only
when it is used, and a damaged file raises `ConversionError` naming it.

Writing: `ShardWriter` collects the output tensors (still unread views of the sources), plans the shards with
`huggingface_hub.split_torch_state_dict_into_shards` and writes each shard tensor by tensor, casting on the fly and
letting go of each source tensor once written, so memory holds about one source shard however large the output
(`safetensors.torch.save_file` would need every tensor of a shard in memory at once, cast).
"""

import json
import os
import pickle
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from huggingface_hub import constants, split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open

from .report import ConversionError

DEFAULT_MAX_SHARD_SIZE = "5GB"

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


# --------------------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(name_or_path: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as it is, or a Hub repo id through `huggingface_hub.snapshot_download` (the local cache
    only when `HF_HUB_OFFLINE=1`)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    if Path(name_or_path).exists() or str(name_or_path).count("/") > 1:
        raise FileNotFoundError(f"{name_or_path} is neither a checkpoint folder nor a Hub repo id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=str(name_or_path), allow_patterns=allow_patterns))


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a transformers-style checkpoint folder: those its index names, else every
    `model*.safetensors`, else every `pytorch_model*.bin` (sorted). Safetensors win when both are present."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "model*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            return index_shard_files(folder, index)
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


def index_shard_files(folder: Path, index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, sorted. Raises `ConversionError` naming the index when it is not
    valid JSON with a `weight_map`, or names a file outside `folder` (`../x.bin`, an absolute path, a link out):
    a checkpoint must never make us read, or publish, a file it does not contain."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConversionError(f"{index}: not a valid shard index ({type(error).__name__}: {error})") from None
    files = []
    for name in names:
        # Checked lexically, not by resolving links: a Hugging Face cache snapshot's shards are links into its blobs.
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConversionError(f"{index} maps weights to {name!r}, outside {folder}; refusing to read it")
        files.append(folder / name)
    return files


def ignored_weight_files(folder: Path, read: Iterable[Path]) -> list[str]:
    """Names of the weight-like files in `folder` (`.bin`, `.safetensors`, `.pt`, `.pth`) that are not in `read`:
    training leftovers, or a format superseded by another, listed in the report."""
    read = {path.resolve() for path in read}
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and path.suffix in (".bin", ".safetensors", ".pt", ".pth") and path.resolve() not in read
    )


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config, generation config, preprocessor config), or `{}` when there is none."""
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------------------------


def _load_bin(path: Path) -> dict:
    """A `.bin` (torch pickle) file's state dict, memory-mapped where the format allows. Only tensors and plain
    containers are unpickled (`weights_only=True`); anything else, and a damaged file, raise `ConversionError`
    naming the file."""
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty (an interrupted download or copy?)")
    try:
        try:
            # Memory-mapped: a tensor is read from disk only when it is used, so a shard never sits in memory twice.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files from before torch's zip format (torch < 1.6) cannot be mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, which would run whatever code the file carries: never do.
        match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if match is None:
            operand = re.search(r"Unsupported operand \d+", str(error))
            raise ConversionError(f"{path}: not a readable torch checkpoint, truncated or damaged (unpickling "
                                  f"failed{': ' + operand.group(0) if operand else ''})") from None
        raise ConversionError(
            f"{path}: refused: the pickle holds an object of type {match.group(1)}, not only tensors. Only plain "
            "state dicts are read, since unpickling anything else can run code. Convert the file to safetensors "
            "where it was made, from a source you trust."
        ) from None
    except (EOFError, OSError, RuntimeError, ValueError, KeyError, IndexError, MemoryError, struct.error) as error:
        raise ConversionError(f"{path}: not a readable torch checkpoint, truncated or damaged "
                              f"({type(error).__name__}: {str(error)[:300]})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, in file order, as views of `safe_open`'s map of it (nothing read yet).
    `safe_open` checks the header against the file; a file it refuses raises `ConversionError` naming it."""
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.offset_keys()}
    except SafetensorError as error:
        detail = str(error).removeprefix("Error while deserializing header: ")
        raise ConversionError(
            f"{path}: not a valid safetensors file, truncated or damaged ({_explain_safetensors(path, detail)})"
        ) from None


def _explain_safetensors(path: Path, detail: str) -> str:
    """Which part of a file `safe_open` refused is at fault, in words, with the tensor where one is (the library
    has already validated the file; this only explains its `detail`)."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as handle:
        header_size = struct.unpack("<Q", handle.read(8))[0]
        if header_size > size - 8:
            return f"the header claims {header_size:,} bytes but the file has {size:,}"
        if header_size > 100_000_000:  # safetensors' own limit
            return detail
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            return f"the header is not JSON: {detail}"
    data_size = size - 8 - header_size
    for key, info in header.items() if isinstance(header, dict) else ():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES.values():
            return f"tensor {key!r} has an unreadable entry {str(info)[:120]}: {detail}"
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(end, int) for end in offsets)):
            return f"tensor {key!r} has an unreadable entry {str(info)[:120]}: {detail}"
        if offsets[1] > data_size:
            return f"tensor {key!r} at bytes {offsets[0]}..{offsets[1]} does not fit the {data_size:,} bytes of data"
    return detail


def load_lazily(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of one `.safetensors` or `.bin` file, memory-mapped: a tensor is read when it is used."""
    state_dict = _load_safetensors(path) if path.suffix == ".safetensors" else _load_bin(path)
    if not isinstance(state_dict, dict):
        raise ConversionError(f"{path} does not hold a state dict")
    return state_dict


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one `.safetensors` or `.bin` file, one at a time, memory-mapped; the file holds no
    reference to a tensor once it is handed out."""
    state_dict = load_lazily(path)
    for key in list(state_dict):
        yield key, state_dict.pop(key)


class LazyCheckpoint:
    """Random access to the tensors of some weight files without reading them: every file is memory-mapped, a
    tensor is read from disk when it is used."""

    def __init__(self, files: list[Path]):
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            self._tensors.update(load_lazily(path))

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    """`"bfloat16"`, `"torch.float16"` or a `torch.dtype` -> the floating-point `torch.dtype`; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Not a floating-point dtype: {name!r}")
    return dtype


def output_dtype(requested: str | torch.dtype | None, *configs: dict) -> torch.dtype | None:
    """The dtype to write floating-point tensors in: `requested`, or for "auto" the first `dtype` / `torch_dtype`
    the source `configs` name (None: keep each tensor's own)."""
    if requested != "auto":
        return dtype_from_name(requested)
    names = (config.get("dtype") or config.get("torch_dtype") for config in configs)
    return next((dtype_from_name(name) for name in names if name), None)


# --------------------------------------------------------------------------------------------------------------
# Writing tensors
# --------------------------------------------------------------------------------------------------------------


class PendingTensor:
    """A tensor to write (often an unread view of a source file) and the dtype to write it in."""

    def __init__(self, key: str, tensor: torch.Tensor, dtype: torch.dtype):
        self.key, self.tensor, self.dtype = key, tensor, dtype
        self.shape = tuple(tensor.shape)
        self.nbytes = tensor.numel() * dtype.itemsize


def write_safetensors(path: Path, tensors: list[PendingTensor], metadata: dict | None = None,
                      on_written=None) -> None:
    """Writes a safetensors file tensor by tensor (each cast on the fly), dropping each `PendingTensor`'s tensor
    once it is written, so memory holds one tensor at a time. `on_written(nbytes)` is called after each tensor."""
    header, offset = {}, 0
    for item in tensors:
        header[item.key] = {
            "dtype": SAFETENSORS_DTYPES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for item in tensors:
            data = item.tensor.to(item.dtype).contiguous()
            if data.numel():
                handle.write(data.reshape(-1).view(torch.uint8).numpy().data)
            # Let go at once: a memory-mapped source file is unmapped when its last tensor is written, so resident
            # pages stay near one source shard however large the output shard.
            item.tensor = data = None
            if on_written is not None:
                on_written(item.nbytes)


class ShardWriter:
    """Collects the output tensors, then writes them as safetensors shards of at most `max_shard_size` (a byte
    count, or "5GB", "500MB": decimal units, as `save_pretrained` reads them; a tensor larger than that gets a shard
    of its own), named and indexed as `save_pretrained` does. Nothing is read from the sources before `write`."""

    def __init__(self, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
        is_count = isinstance(max_shard_size, str) and max_shard_size.strip().isdigit()  # a command line's "1000000"
        self.max_shard_size = int(max_shard_size) if is_count else max_shard_size
        split_torch_state_dict_into_shards({}, max_shard_size=self.max_shard_size)  # a size it cannot read fails now
        self._pending: dict[str, PendingTensor] = {}

    @property
    def keys(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor added so far."""
        return {key: item.shape for key, item in self._pending.items()}

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self._pending.values())

    def add(self, key: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Adds `tensor` as `key`, to be written in `dtype` if it is floating point (else in its own dtype)."""
        if key in self._pending:
            raise ConversionError(f"Two source tensors map to {key}")
        dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        self._pending[key] = PendingTensor(key, tensor, dtype)

    def write(self, folder: Path, progress: bool = False, description: str = "Writing") -> list[str]:
        """Writes the shards (`model.safetensors`, or `model-0000i-of-0000N.safetensors` and the index) into
        `folder` in the order the tensors were added; returns the shard file names."""
        # The plan is made on meta stand-ins in the output dtype: the source views would be sized (and grouped) by
        # the storage they share with the rest of their source file.
        stand_ins = {
            key: torch.empty(item.shape, dtype=item.dtype, device="meta") for key, item in self._pending.items()
        }
        split = split_torch_state_dict_into_shards(
            stand_ins, filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN, max_shard_size=self.max_shard_size
        )
        with progress_bar(self.total_bytes, progress, description) as bar:
            for name, keys in split.filename_to_tensors.items():
                write_safetensors(folder / name, [self._pending.pop(key) for key in keys], on_written=bar.update)
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (folder / constants.SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return list(split.filename_to_tensors)


def progress_bar(total_bytes: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=not enabled)
