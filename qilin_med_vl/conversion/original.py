# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""The original Qilin-Med-VL release (LLaVA v1.1-era layout) -> an HF-native Qilin-Med-VL folder.

The first half of this module is the streaming checkpoint machinery every converter here shares: readers that
map `.bin` shards (`weights_only=True`) one file at a time, key-mapping rules with drop reasons, a safetensors
shard writer that writes tensor by tensor, a report that accounts for every source tensor, and an output folder
that appears only when the conversion is complete.

    >>> from qilin_med_vl.conversion import convert_original
    >>> report = convert_original("Qilin-Med-VL", "Qilin-Med-VL-hf")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
"""

import json
import mmap
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling.configuration_qilin_med_vl import QilinMedVLConfig
from ..modeling.modeling_qilin_med_vl import QilinMedVLForConditionalGeneration
from ..processing.image_processing_qilin import QilinImageProcessor
from ..processing.processing_qilin import IMAGE_TOKEN, QilinProcessor
from .report import ConversionError, ConversionReport, check_complete, expected_state_dict_shapes
from .staging import staged_output

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
# transformers' llava-hf conversions pad the vocabulary to a multiple of 64 rows (32000 + `<image>` -> 32064).
VOCAB_MULTIPLE = 64
DEFAULT_MAX_SHARD_SIZE = "5GB"

# Files of a checkpoint folder that hold weights, in order of preference; anything else is configs or leftovers.
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")
ORIGINAL_DOWNLOAD_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "mm_projector.bin",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
]
CLIP_DOWNLOAD_PATTERNS = ["config.json", "preprocessor_config.json"]


# --------------------------------------------------------------------------------------------------------------
# Key mapping rules
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRule:
    """`pattern` (a full-match regex) -> `target` (a `re.sub` template), or dropped when `target` is None."""

    pattern: str
    target: str | None
    reason: str | None = None

    def apply(self, key: str) -> str | None:
        return re.sub(self.pattern, self.target, key) if self.target is not None else None


def map_key(rules: Iterable[KeyRule], key: str) -> tuple[bool, str | None, str | None]:
    """`(matched, target, drop_reason)` of the first rule whose pattern matches all of `key`."""
    for rule in rules:
        if re.fullmatch(rule.pattern, key):
            return True, rule.apply(key), rule.reason
    return False, None, None


def drop(pattern: str, reason: str) -> KeyRule:
    return KeyRule(pattern, None, reason)


INV_FREQ_REASON = "rotary inv_freq buffer: recomputed from the config at load time"

# The LLaVA v1.1 fork (and a plain HF LLaMA checkpoint, for projector-only releases): LLaMA under `model.*`.
ORIGINAL_LLM_RULES = (
    KeyRule(r"model\.embed_tokens\.weight", "model.language_model.embed_tokens.weight"),
    drop(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", INV_FREQ_REASON),
    KeyRule(r"model\.layers\.(.+)", r"model.language_model.layers.\1"),
    KeyRule(r"model\.norm\.weight", "model.language_model.norm.weight"),
    KeyRule(r"lm_head\.weight", "lm_head.weight"),
    KeyRule(r"model\.mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    KeyRule(r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    KeyRule(r"model\.mm_projector\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    # The CLIP copy some files carry; the original loader ignored it (it loaded CLIP from mm_vision_tower).
    drop(r"model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids", "CLIP position_ids buffer"),
    KeyRule(r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", r"model.vision_tower.\1"),
)

CLIP_HEAD_REASON = "CLIP contrastive head: LLaVA reads a hidden layer of the vision tower, not the projection"
# A CLIP checkpoint: a full `CLIPModel` or `CLIPVisionModel(WithProjection)` as saved by transformers 4.x
# (`vision_model.*`), or a `CLIPVisionModel` saved by transformers 5.x (no `vision_model.` level).
CLIP_RULES = (
    drop(r"(vision_model\.)?embeddings\.position_ids", "CLIP position_ids buffer (not persistent in transformers 5)"),
    drop(r"text_model\..+", "CLIP text tower: not part of the LLaVA architecture"),
    drop(r"(visual_projection|text_projection)\.weight|logit_scale", CLIP_HEAD_REASON),
    KeyRule(r"vision_model\.(.+)", r"model.vision_tower.\1"),
    KeyRule(r"((embeddings|encoder|pre_layrnorm|post_layernorm)\..+)", r"model.vision_tower.\1"),
)


# --------------------------------------------------------------------------------------------------------------
# Reading checkpoints
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


def resolve_clip(name_or_path: str | os.PathLike) -> Path:
    """The CLIP folder, downloading only its configs and one weight format (safetensors if there is one)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    folder = resolve_checkpoint(name_or_path, CLIP_DOWNLOAD_PATTERNS + ["model*.safetensors*"])
    if not find_weight_files(folder):
        folder = resolve_checkpoint(name_or_path, CLIP_DOWNLOAD_PATTERNS + ["pytorch_model*.bin*"])
    return folder


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


def _load_bin(path: Path) -> dict:
    """A `.bin` (torch pickle) file's state dict, memory-mapped where the format allows. Only tensors and plain
    containers are unpickled (`weights_only=True`); anything else, and a damaged file, raise `ConversionError`
    naming the file."""
    import pickle

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


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a memory map of it (copy-on-write: nothing is read until
    used, and the file is never modified), like `torch.load(mmap=True)` for `.bin` files. The header is checked
    first (its size, JSON, dtypes, shapes and offsets against the file's size): a truncated or damaged file raises
    `ConversionError` naming it instead of reading past its end."""
    size = path.stat().st_size

    def damaged(problem: str) -> ConversionError:
        return ConversionError(f"{path}: not a valid safetensors file, truncated or damaged ({problem})")

    if size < 8:
        raise damaged(f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as handle:
        header_size = struct.unpack("<Q", handle.read(8))[0]
        if header_size > size - 8 or header_size > 100 * 2**20:
            raise damaged(f"the header claims {header_size:,} bytes but the file has {size:,}")
        try:
            header = json.loads(handle.read(header_size))
        except (ValueError, UnicodeDecodeError) as error:
            raise damaged(f"the header is not JSON: {error}") from None
        if not isinstance(header, dict):
            raise damaged("the header is not a JSON object")
        data_size = size - 8 - header_size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_TO_TORCH[info["dtype"]]
                start, end = (int(value) for value in info["data_offsets"])
                shape = [int(value) for value in info["shape"]]
            except (KeyError, TypeError, ValueError) as error:
                raise damaged(f"tensor {key!r} has an unreadable entry {str(info)[:120]} ({error!r})") from None
            count = 1
            for dimension in shape:
                count *= dimension
            fits = 0 <= start <= end <= data_size and end - start == count * dtype.itemsize
            if min(shape, default=0) < 0 or not fits:
                raise damaged(f"tensor {key!r} ({info['dtype']} {shape}) at bytes {start}..{end} does not fit the "
                              f"{data_size:,} bytes of data")
        mapped = None if data_size == 0 else mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_TO_TORCH[info["dtype"]]
        start, end = info["data_offsets"]
        if end == start:
            tensors[key] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(
            mapped, dtype=dtype, offset=8 + header_size + start, count=(end - start) // dtype.itemsize
        )
        tensors[key] = flat.view(info["shape"])
    return tensors


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one `.safetensors` or `.bin` file, one at a time, memory-mapped."""
    state_dict = _load_safetensors(path) if path.suffix == ".safetensors" else _load_bin(path)
    if not isinstance(state_dict, dict):
        raise ConversionError(f"{path} does not hold a state dict")
    keys = list(state_dict)
    for key in keys:
        yield key, state_dict.pop(key)


class LazyCheckpoint:
    """Random access to the tensors of some weight files without reading them: every file is memory-mapped, a
    tensor is read from disk when it is used."""

    def __init__(self, files: list[Path]):
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            self._tensors.update(_load_safetensors(path) if path.suffix == ".safetensors" else _load_bin(path))

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


# --------------------------------------------------------------------------------------------------------------
# Writing checkpoints
# --------------------------------------------------------------------------------------------------------------



def parse_size(size: int | str) -> int:
    """`"5GB"`, `"500MB"`, `"2GiB"` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"Not a size: {size!r} (try '5GB' or '500MB')")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


@dataclass
class _PendingTensor:
    key: str
    tensor: torch.Tensor
    dtype: torch.dtype

    def __post_init__(self):
        self.nbytes = self.tensor.numel() * self.dtype.itemsize
        self.shape = list(self.tensor.shape)


def write_safetensors(path: Path, tensors: list[_PendingTensor], metadata: dict | None = None) -> None:
    """Writes a safetensors file tensor by tensor (each cast on the fly), so memory holds one tensor at a time,
    not the whole file as `safetensors.torch.save_file` does."""
    header, offset = {}, 0
    for item in tensors:
        header[item.key] = {
            "dtype": SAFETENSORS_DTYPES[item.dtype],
            "shape": item.shape,
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


class ShardWriter:
    """Collects output tensors and writes them into safetensors shards of at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own). Shards get their final `model-0000i-of-0000N` names in `close`."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[_PendingTensor] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.keys: dict[str, tuple[int, ...]] = {}

    def add(self, key: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        if key in self.keys:
            raise ConversionError(f"Two source tensors map to {key}")
        dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        item = _PendingTensor(key, tensor, dtype)
        if self._pending and self._pending_bytes + item.nbytes > self.max_shard_bytes:
            self.flush()
        self._pending.append(item)
        self._pending_bytes += item.nbytes
        self.total_bytes += item.nbytes
        self.keys[key] = tuple(tensor.shape)

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.folder / f"model-partial-{len(self._shards) + 1:05d}.safetensors"
        write_safetensors(path, self._pending)
        self._shards.append((path, [item.key for item in self._pending]))
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[str]:
        """Writes what is left, names the shards and writes the index; returns the shard file names."""
        self.flush()
        count = len(self._shards)
        if count == 1:
            self._shards[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for number, (path, keys) in enumerate(self._shards, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def progress_bar(total_bytes: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=not enabled)


def save_remote_code_and_config(folder: Path, config: QilinMedVLConfig) -> None:
    """`config.json` with `auto_map` plus the flat set of remote-code files, as `save_pretrained` would write them
    for a `QilinMedVLForConditionalGeneration` (which is never materialised here)."""
    from transformers.dynamic_module_utils import custom_object_save

    with torch.device("meta"):
        meta_model = QilinMedVLForConditionalGeneration(config)
    custom_object_save(meta_model, folder)
    entry = f"{QilinMedVLForConditionalGeneration.__module__.split('.')[-1]}.QilinMedVLForConditionalGeneration"
    config.architectures = ["QilinMedVLForConditionalGeneration"]
    config.auto_map = {
        "AutoConfig": f"{QilinMedVLConfig.__module__.split('.')[-1]}.QilinMedVLConfig",
        "AutoModel": entry,
        "AutoModelForImageTextToText": entry,
    }
    config.save_pretrained(folder)


def dtype_from_name(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Not a floating-point dtype: {name!r}")
    return dtype


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple if multiple > 1 else value


def grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` `(n, D)` with rows appended up to `rows`, each the mean of the existing rows: a neutral start for
    tokens the model never saw (the `<image>` row is never read, image features replace it)."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, -1)], dim=0)


# --------------------------------------------------------------------------------------------------------------
# The original release
# --------------------------------------------------------------------------------------------------------------

TEXT_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "initializer_range",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
)
SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
PROJECTOR_TYPES_BY_NAME = {"mlp2x_gelu": "mlp2x_gelu", "linear": "linear"}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _source_dtype(config: dict) -> torch.dtype | None:
    name = config.get("torch_dtype") or config.get("dtype")
    return dtype_from_name(name) if name else None


def vision_config_from_clip(clip_folder: Path) -> dict:
    """The `clip_vision_model` config of a CLIP checkpoint folder (full `CLIPModel` or vision-only)."""
    config = _read_json(clip_folder / "config.json")
    if not config:
        raise ConversionError(f"{clip_folder} has no config.json: not a CLIP checkpoint")
    if config.get("model_type") == "clip":
        from transformers import CLIPConfig

        vision = CLIPConfig(**{k: v for k, v in config.items() if k in ("vision_config", "text_config")}).vision_config
    elif config.get("model_type") == "clip_vision_model":
        from transformers import CLIPVisionConfig

        vision = CLIPVisionConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    else:
        raise ConversionError(f"{clip_folder} holds a {config.get('model_type')!r} model, not CLIP")
    return vision.to_dict()


def qilin_config_from_original(
    original: dict, text_source: dict, vision_config: dict, vocab_size: int, image_token_id: int, pad_token_id: int
) -> QilinMedVLConfig:
    """The `QilinMedVLConfig` of an original LLaVA-fork checkpoint.

    original: the release's config.json (the `mm_*` fields); text_source: the config of the checkpoint holding the
    LLaMA weights (the release itself, or the base model of a projector-only release)."""
    if original.get("mm_use_im_start_end") or original.get("mm_use_im_patch_token"):
        raise ConversionError("mm_use_im_start_end / mm_use_im_patch_token checkpoints are not supported")
    projector_type = original.get("mm_projector_type", "linear")  # the LLaVA builder's default
    if projector_type not in PROJECTOR_TYPES_BY_NAME:
        raise ConversionError(f"mm_projector_type {projector_type!r} is not supported (mlp2x_gelu or linear)")
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ConversionError(f"mm_vision_select_feature {select_feature!r} is not supported (patch or cls_patch)")
    if original.get("mm_hidden_size") not in (None, vision_config["hidden_size"]):
        raise ConversionError(
            f"mm_hidden_size {original['mm_hidden_size']} does not match the CLIP tower's "
            f"{vision_config['hidden_size']}"
        )
    text_config = {"model_type": "llama", **{k: text_source[k] for k in TEXT_CONFIG_FIELDS if k in text_source}}
    text_config.setdefault("num_key_value_heads", text_config.get("num_attention_heads"))
    text_config.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    strategy = SELECT_FEATURE_TO_STRATEGY[select_feature]
    patches = (vision_config["image_size"] // vision_config["patch_size"]) ** 2
    return QilinMedVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        projector_type=PROJECTOR_TYPES_BY_NAME[projector_type],
        image_token_id=image_token_id,
        image_seq_length=patches + (strategy == "full"),
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(text_source.get("tie_word_embeddings", False)),
    )


def load_llama_tokenizer(folder: Path):
    """A checkpoint's LLaMA tokenizer (a slow SentencePiece `tokenizer.model`, or a `tokenizer.json`) as a
    transformers tokenizer. transformers 5 converts `tokenizer.model` to a fast tokenizer, which needs
    `sentencepiece` and `protobuf`."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if not any((folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ConversionError(f"{folder} has no tokenizer.model or tokenizer.json")
    # Not AutoTokenizer: next to a `model_type: "llava"` config it picks a generic class that, reading
    # `tokenizer.model`, loses SentencePiece's word-start marker.
    tokenizer_class = _read_json(folder / "tokenizer_config.json").get("tokenizer_class", "LlamaTokenizer")
    try:
        if tokenizer_class.removesuffix("Fast") == "LlamaTokenizer":
            return LlamaTokenizer.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)
    except ImportError as error:
        raise ImportError(
            f"Converting {folder / 'tokenizer.model'} needs sentencepiece and protobuf: "
            "pip install 'qilin-med-vl[convert]'"
        ) from error


def prepare_tokenizer(tokenizer, model_max_length: int | None = None):
    """Adds `<image>` as a special token (if missing); pad = unk (id 0), as the original trained with; left
    padding, which batched generation needs. Returns the tokenizer."""
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    if model_max_length:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def build_processor(tokenizer, config: QilinMedVLConfig, image_source: dict | None = None, do_pad: bool = True):
    """`QilinProcessor` (v1 chat template) for `config`: CLIP normalisation (from `image_source`, a
    preprocessor_config.json, where given), the vision tower's resolution, HiA's high-resolution view at twice it."""
    image_size = config.vision_config.image_size
    image_source = image_source or {}
    kwargs = {key: image_source[key] for key in ("image_mean", "image_std") if key in image_source}
    image_processor = QilinImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        high_res_size=2 * image_size,
        do_pad=do_pad,
        **kwargs,
    )
    return QilinProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=config.image_seq_length
    )


def build_generation_config(source: dict, tokenizer):
    from transformers import GenerationConfig

    values = {k: v for k, v in source.items() if k not in ("transformers_version", "_from_model_config")}
    generation_config = GenerationConfig(**values)
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    return generation_config


def _ignored_files(folder: Path, read: Iterable[Path]) -> list[str]:
    read = {path.resolve() for path in read}
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and path.suffix in (".bin", ".safetensors", ".pt", ".pth") and path.resolve() not in read
    )


def _compare(tensor: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """"identical" or how two tensors differ, compared in the output `dtype` (what would be written)."""
    if tensor.shape != reference.shape:
        return f"shape {tuple(tensor.shape)} vs {tuple(reference.shape)}"
    if dtype is not None and tensor.is_floating_point():
        tensor, reference = tensor.to(dtype), reference.to(dtype)
    difference = (tensor.float() - reference.float()).abs().max().item() if tensor.numel() else 0.0
    return "identical" if difference == 0 else f"differs, max |diff| {difference:.3g}"


def convert_original(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    clip: str | os.PathLike = DEFAULT_CLIP,
    base_model: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    vocab_multiple: int = VOCAB_MULTIPLE,
    progress: bool = True,
) -> ConversionReport:
    """Converts an original Qilin-Med-VL release into an HF-native folder.

    Args:
        source: the release (folder or Hub repo id): `pytorch_model-*.bin` shards (or safetensors) and/or
            `mm_projector.bin`, a config with `mm_*` fields, the SentencePiece tokenizer.
        output: the folder to create: safetensors shards, `QilinMedVLConfig`, `QilinProcessor` with the v1 chat
            template, the remote-code files and `generation_config.json`.
        clip: the CLIP ViT-L/14-336 checkpoint (folder or repo id) the vision tower comes from, in place of the
            private `mm_vision_tower` path of the release.
        base_model: the LLaMA checkpoint for a projector-only release (`mm_projector.bin` without LLM weights).
        dtype: output dtype of floating-point tensors; "auto" keeps the release's `torch_dtype` (bf16).
        force: replace an existing `output`.
        max_shard_size: output shard size limit, e.g. "5GB".
        vocab_multiple: `embed_tokens` / `lm_head` grow to a multiple of this many rows after `<image>` is added.
        progress: show a progress bar.

    Returns:
        The `ConversionReport`: every source tensor mapped or dropped with a reason. A source tensor no rule
        knows, or a model tensor without a source, raises `ConversionError` and writes nothing.
    """
    report = ConversionReport()
    source_folder = resolve_checkpoint(source, ORIGINAL_DOWNLOAD_PATTERNS)
    original = _read_json(source_folder / "config.json")
    if "text_config" in original:
        raise ConversionError(f"{source} is a transformers llava-hf checkpoint: use convert_llava_hf")
    llm_files = find_weight_files(source_folder)
    projector_file = source_folder / "mm_projector.bin"
    projector_file = projector_file if projector_file.is_file() else None
    llm_folder, llm_origin = source_folder, "model"
    if not llm_files:
        if base_model is None:
            raise ConversionError(
                f"{source} holds no language-model weights (a projector-only release): pass base_model, the LLaMA "
                "checkpoint it was trained on"
            )
        llm_folder, llm_origin = resolve_checkpoint(base_model, ORIGINAL_DOWNLOAD_PATTERNS), "base"
        llm_files = find_weight_files(llm_folder)
        if not llm_files:
            raise ConversionError(f"{base_model} holds no weights")
    elif base_model is not None:
        raise ConversionError(
            f"{source} already holds language-model weights; base_model is only for projector-only releases"
        )
    # LLaVA pads to a square only for "pad"; "square" (or none) is CLIP's plain resize + centre crop.
    if original.get("image_aspect_ratio") not in (None, "pad", "square"):
        raise ConversionError(
            f"image_aspect_ratio {original['image_aspect_ratio']!r} is not supported (pad or square)"
        )
    do_pad = original.get("image_aspect_ratio") == "pad" or not original
    text_source = _read_json(llm_folder / "config.json") if llm_origin == "base" else original
    if "hidden_size" not in text_source:
        raise ConversionError(f"{llm_folder / 'config.json'} does not describe the language model")

    clip_folder = resolve_clip(clip)
    vision_config = vision_config_from_clip(clip_folder)
    clip_files = find_weight_files(clip_folder)
    if not clip_files:
        raise ConversionError(f"{clip_folder} holds no CLIP weights")
    clip_weights = LazyCheckpoint(clip_files)

    tokenizer_folder = source_folder if any(
        (source_folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json")
    ) else llm_folder
    tokenizer = load_llama_tokenizer(tokenizer_folder)
    # Training truncated at tokenizer_model_max_length (LLaVA's --model_max_length, 2048 for Qilin-Med-VL).
    max_length = original.get("tokenizer_model_max_length")
    if not max_length and tokenizer.model_max_length > 10**8:  # transformers' "no limit"
        max_length = text_source.get("max_position_embeddings")
    tokenizer = prepare_tokenizer(tokenizer, max_length)
    source_rows = int(text_source.get("vocab_size", 32000))
    rows = round_up(max(source_rows, len(tokenizer)), vocab_multiple)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    projector_pending: dict[str, tuple[str, torch.Tensor]] = {}
    if projector_file is not None:
        projector_keys = set()
        for key, tensor in iter_tensors(projector_file):
            projector_keys.add(key)
            matched, target, _ = map_key(ORIGINAL_LLM_RULES, key)
            if not matched or target is None or not target.startswith("model.multi_modal_projector."):
                raise ConversionError(f"Unexpected tensor in {projector_file.name}: {key}", report)
            projector_pending[target] = (f"projector:{key}", tensor)
        if "mm_projector_type" not in original and "model.mm_projector.0.weight" in projector_keys:
            original = {**original, "mm_projector_type": "mlp2x_gelu"}  # a release without config.json

    config = qilin_config_from_original(
        original, text_source, vision_config, rows, image_token_id, tokenizer.pad_token_id
    )
    target_dtype = (
        dtype_from_name(None if dtype == "auto" else dtype) or _source_dtype(original) or _source_dtype(text_source)
    )
    expected = expected_state_dict_shapes(config)
    grown = {"model.language_model.embed_tokens.weight", "lm_head.weight"}

    read_files = [*llm_files, *clip_files, *([projector_file] if projector_file else [])]
    total = sum(path.stat().st_size for path in read_files)
    inputs = [source, clip, base_model, source_folder, clip_folder, llm_folder]
    with staged_output(output, force, protect=inputs) as staging, progress_bar(total, progress, "Converting") as bar:
        writer = ShardWriter(staging, parse_size(max_shard_size))

        def emit(source_key: str, target: str, tensor: torch.Tensor) -> None:
            nonlocal target_dtype
            if target_dtype is None and tensor.is_floating_point():
                target_dtype = tensor.dtype  # no torch_dtype in the config: keep the weights' own
            if target in grown:
                if tensor.shape[0] != source_rows:
                    raise ConversionError(
                        f"{source_key} has {tensor.shape[0]} rows, the config says {source_rows}", report
                    )
                if rows > tensor.shape[0]:
                    report.created[target] = f"rows {tensor.shape[0]} -> {rows}, new rows = mean of the existing rows"
                tensor = grow_rows(tensor, rows)
            writer.add(target, tensor, target_dtype)
            report.mapped[source_key] = target

        # 1. Language model (and whatever else the release's shards carry), one file at a time.
        for path in llm_files:
            for key, tensor in iter_tensors(path):
                source_key = f"{llm_origin}:{key}"
                bar.update(tensor.numel() * tensor.element_size())
                matched, target, reason = map_key(ORIGINAL_LLM_RULES, key)
                if not matched:
                    raise ConversionError(f"Unexpected tensor {key} in {path.name}: no rule maps it", report)
                if target is None:
                    report.dropped[source_key] = reason
                elif target.startswith("model.vision_tower."):
                    clip_key = _clip_key_for(target, clip_weights)
                    verdict = (
                        _compare(tensor, clip_weights.get(clip_key), target_dtype) if clip_key else "absent from CLIP"
                    )
                    report.dropped[source_key] = (
                        "embedded CLIP copy, which the original loader ignored; the vision tower comes from the CLIP "
                        f"checkpoint ({verdict})"
                    )
                elif target in projector_pending:
                    other_key, other = projector_pending.pop(target)
                    report.dropped[other_key] = (
                        "mm_projector.bin duplicates the projector in the shards, which win "
                        f"({_compare(other, tensor, target_dtype)})"
                    )
                    emit(source_key, target, tensor)
                else:
                    emit(source_key, target, tensor)
                del tensor

        # 2. The projector from mm_projector.bin, where the shards did not carry one.
        for target, (source_key, tensor) in projector_pending.items():
            emit(source_key, target, tensor)
        if projector_file is not None:
            bar.update(projector_file.stat().st_size)

        # 3. The CLIP vision tower.
        for path in clip_files:
            for key, tensor in iter_tensors(path):
                bar.update(tensor.numel() * tensor.element_size())
                matched, target, reason = map_key(CLIP_RULES, key)
                if not matched:
                    raise ConversionError(f"Unexpected tensor {key} in CLIP file {path.name}", report)
                if target is None:
                    report.dropped[f"clip:{key}"] = reason
                else:
                    emit(f"clip:{key}", target, tensor)
                del tensor

        if target_dtype is not None:
            config.dtype = target_dtype
        check_complete(writer.keys, expected, report)
        writer.close()

        save_remote_code_and_config(staging, config)
        processor = build_processor(tokenizer, config, _read_json(clip_folder / "preprocessor_config.json"), do_pad)
        processor.save_pretrained(staging)
        generation_source = _read_json(source_folder / "generation_config.json")
        build_generation_config(generation_source, tokenizer).save_pretrained(staging)
    report.ignored_files = _ignored_files(source_folder, read_files) + (
        _ignored_files(llm_folder, read_files) if llm_folder != source_folder else []
    )
    report.output = str(output)
    return report


def _clip_key_for(target: str, clip_weights: LazyCheckpoint) -> str | None:
    """The CLIP checkpoint key that fills `target` (`model.vision_tower.X`): `vision_model.X` or plain `X`."""
    suffix = target.removeprefix("model.vision_tower.")
    return next((key for key in (f"vision_model.{suffix}", suffix) if key in clip_weights), None)



__all__ = [
    "ConversionError",
    "ConversionReport",
    "DEFAULT_CLIP",
    "convert_original",
    "qilin_config_from_original",
]
