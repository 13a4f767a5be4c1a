# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Publishing to the Hugging Face Hub: assemble a repo folder, check it, upload it.

A repo holds the HF-native model (weights, config, remote code, processor, generation config), optionally the
HiA adapter in `hia/` (so `model.load_adapter("hia")` works), and a model card (`README.md`) from the package's
`model_cards/` with its YAML metadata checked.

    >>> from qilin_med_vl.hub import push_to_hub
    >>> push_to_hub("Qilin-Med-VL-hf", "my-org/Qilin-Med-VL-HiA", adapter="hia-run/checkpoint-final",
    ...             card="qilin-med-vl-hia", dry_run=True)  # doctest: +SKIP
"""

import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .conversion.checkpoint_io import find_weight_files, index_shard_files
from .conversion.staging import check_not_inside, staged_output
from .loading import HIA_SUBFOLDER

# Each card in model_cards/ names its own repo with one of these ids; `render_model_card` puts the real one in.
CARD_REPO_IDS = {
    "qilin-med-vl": "qilin-med-vl/Qilin-Med-VL",
    "qilin-med-vl-hia": "qilin-med-vl/Qilin-Med-VL-HiA",
    "qilin-med-vl-demo": "qilin-med-vl/Qilin-Med-VL-Demo",
}
REQUIRED_METADATA = ("license", "language", "pipeline_tag", "library_name", "tags", "base_model")
REQUIRED_LANGUAGES = {"zh", "en"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# What `push` takes from a model folder: an allow-list, so a training run folder (optimizer states, checkpoints,
# `training_args.bin`, a stray token file or a link to one) never leaks to the Hub by accident. Patterns match the
# path relative to the model folder, one path level per pattern level. Anything else is listed as left out, and
# goes only when asked for by name (`include`).
UPLOAD_ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    "*.py",  # remote code (configuration_*, modeling_*, processing_*, image_*)
)
# Training leftovers that are never uploaded, even from a folder an allow pattern would otherwise reach.
NEVER_UPLOADED_PATTERNS = ("checkpoint-*", "global_step*", "optimizer.pt", "scheduler.pt", "training_args.bin",
                           "rng_state*.pth", "trainer_state.json")


def model_cards_folder() -> Path:
    """The model cards shipped with the package (`qilin_med_vl/model_cards/`), so `push` works from a wheel."""
    return Path(__file__).resolve().parent / "model_cards"


def model_card_path(card: str | os.PathLike) -> Path:
    """A card name from `CARD_REPO_IDS` (`model_cards/<name>.md`) or a path to a markdown file."""
    if str(card) in CARD_REPO_IDS:
        path = model_cards_folder() / f"{card}.md"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass the card as a path to a markdown file")
        return path
    path = Path(card)
    if not path.is_file():
        raise FileNotFoundError(f"No model card {card!r}: a name in {sorted(CARD_REPO_IDS)} or a markdown file")
    return path


def check_card_metadata(data: dict) -> list[str]:
    """Problems with a card's YAML metadata (empty when it is complete)."""
    problems = [f"metadata lacks {key!r}" for key in REQUIRED_METADATA if not data.get(key)]
    languages = data.get("language") or []
    languages = {languages} if isinstance(languages, str) else set(languages)
    if not REQUIRED_LANGUAGES <= languages:
        problems.append(f"language should include {sorted(REQUIRED_LANGUAGES)}, got {sorted(languages)}")
    if data.get("pipeline_tag") not in (None, "image-text-to-text"):
        problems.append(f"pipeline_tag should be image-text-to-text, got {data['pipeline_tag']!r}")
    if data.get("library_name") not in (None, "transformers"):
        problems.append(f"library_name should be transformers, got {data['library_name']!r}")
    return problems


def render_model_card(card: str | os.PathLike, repo_id: str | None = None, base_model: str | None = None) -> str:
    """The card's markdown with `repo_id` in place of the card's own placeholder id and, if given, `base_model`
    in its metadata. Raises `ValueError` when the metadata is incomplete."""
    from huggingface_hub import ModelCard

    path = model_card_path(card)
    text = path.read_text(encoding="utf-8")
    own_id = CARD_REPO_IDS.get(path.stem)
    if repo_id and own_id:
        text = re.sub(rf"{re.escape(own_id)}(?![\w.-])", repo_id, text)
    model_card = ModelCard(text)
    if base_model:
        model_card.data.base_model = base_model
    problems = check_card_metadata(model_card.data.to_dict())
    if problems:
        raise ValueError(f"Model card {path}: " + "; ".join(problems))
    return str(model_card)


def check_repo_folder(folder: str | os.PathLike) -> list[str]:
    """Problems that would stop the folder from loading from the Hub (empty when it is complete): weights and
    every shard of the index, config with `auto_map` and the remote-code files it names, processor and tokenizer
    files, the chat template, the adapter in `hia/`, the card's metadata."""
    folder = Path(folder)
    problems = []
    config_path = folder / "config.json"
    if not config_path.is_file():
        return ["config.json is missing"]
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "qilin_med_vl":
        problems.append(f"config.json describes a {config.get('model_type')!r} model, not qilin_med_vl")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = index_shard_files(folder, index)
        except ValueError as error:
            return [str(error)]
        problems += [f"weight shard {path.name} is missing" for path in shards if not path.is_file()]
    elif not find_weight_files(folder):
        problems.append("no model weights (model.safetensors)")
    auto_maps = [config.get("auto_map", {})]
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            auto_maps.append(json.loads((folder / name).read_text()).get("auto_map", {}))
    if "AutoModelForImageTextToText" not in auto_maps[0]:
        problems.append("config.json has no auto_map for AutoModelForImageTextToText (remote code)")
    for auto_map in auto_maps:
        for reference in auto_map.values():
            for entry in reference if isinstance(reference, (list, tuple)) else [reference]:
                if entry and not (folder / f"{entry.split('.')[0]}.py").is_file():
                    problems.append(f"remote-code file {entry.split('.')[0]}.py is missing")
    for module in folder.glob("*.py"):
        # Remote code reaches its siblings with single-dot imports; each must travel too.
        for sibling in re.findall(r"^\s*from \.(\w+) import", module.read_text(), re.MULTILINE):
            if not (folder / f"{sibling}.py").is_file():
                problems.append(f"remote-code file {sibling}.py (imported by {module.name}) is missing")
    if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        problems.append("no processor (processor_config.json)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        problems.append("no tokenizer (tokenizer.json or tokenizer.model)")
    has_template = (
        (folder / "chat_template.jinja").is_file() or "chat_template" in _json(folder / "processor_config.json")
    )
    if not has_template:
        problems.append("no chat template")
    adapter = folder / HIA_SUBFOLDER
    if adapter.exists():
        adapter_config = _json(adapter / "adapter_config.json")
        if adapter_config.get("peft_type") != "HIA":
            problems.append(f"{HIA_SUBFOLDER}/adapter_config.json is missing or not a HiA adapter")
        if not any((adapter / name).is_file() for name in ADAPTER_FILES[1:]):
            problems.append(f"{HIA_SUBFOLDER}/ has no adapter weights")
    readme = folder / "README.md"
    if not readme.is_file():
        problems.append("README.md (model card) is missing")
    else:
        from huggingface_hub import ModelCard

        metadata = ModelCard(readme.read_text(encoding="utf-8")).data.to_dict()
        problems += [f"README.md {problem}" for problem in check_card_metadata(metadata)]
    return sorted(set(problems))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def assemble_repo(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    card: str | os.PathLike | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    force: bool = False,
    include: Iterable[str] = (),
) -> Path:
    """Builds the folder to upload: the model folder's files, the HiA adapter as `hia/`, and `README.md`.

    Args:
        model: a saved Qilin-Med-VL folder (`save_pretrained` of model and processor, or a converter's output).
        output: the folder to create (an existing one needs `force=True`).
        adapter: a saved HiA adapter folder; default: the model folder's own `hia/`, if any.
        card: a card name (`qilin-med-vl`, `qilin-med-vl-hia`, `qilin-med-vl-demo`) or a markdown path; default
            `qilin-med-vl-hia` with an adapter, else `qilin-med-vl`.
        repo_id: the repo the card should name in its examples.
        base_model: overrides the card's `base_model` metadata.
        include: glob patterns of further files to take from the model folder (see `select_upload_files`: only
            allow-listed files are taken by default).

    Raises `ValueError` listing every problem when the assembled folder would not load from the Hub, and when a
    file to take is a link out of the model folder. `output` may not be or contain the model or adapter folder.
    """
    model = Path(model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a saved model folder (no config.json)")
    adapter = Path(adapter) if adapter is not None else model / HIA_SUBFOLDER
    has_adapter = adapter.is_dir()
    if not has_adapter and adapter != model / HIA_SUBFOLDER:
        raise FileNotFoundError(f"Adapter folder {adapter} not found")
    card = card or ("qilin-med-vl-hia" if has_adapter else "qilin-med-vl")
    readme = render_model_card(card, repo_id, base_model)
    selection = select_upload_files(model, adapter if has_adapter else None, include)
    check_not_inside(output, [model, adapter if has_adapter else None], "model folder")
    with staged_output(output, force) as staging:
        for name, source in selection.files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            # The link is resolved (inside the model folder, checked): the repo gets the bytes, not a link.
            shutil.copyfile(source, target)
        (staging / "README.md").write_text(readme, encoding="utf-8")
        problems = check_repo_folder(staging)
        if problems:
            raise ValueError(f"The assembled repo would not load: {'; '.join(problems)}")
    return Path(output)


@dataclass
class UploadSelection:
    """What `assemble_repo` takes: `files` maps a repo path to its source file; `left_out` lists the model
    folder's other files (repo-relative), which are not uploaded."""

    files: dict[str, Path] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    parts = PurePosixPath(path).parts
    for pattern in patterns:
        pattern_parts = PurePosixPath(pattern).parts
        if len(pattern_parts) == len(parts) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts)):
            return True
    return False


def _never_uploaded(path: str) -> bool:
    return any(fnmatch.fnmatchcase(part, pattern) for part in PurePosixPath(path).parts
               for pattern in NEVER_UPLOADED_PATTERNS)


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a link in `folder` may point: inside it, and for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<commit>`, whose files are links into `../../blobs`) that repo's blobs."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def _checked_file(path: Path, folder: Path, name: str) -> Path:
    """`path` when it is a regular file, or a link to one, inside `folder`; anything else is refused by name."""
    if path.is_symlink():
        target = path.resolve()
        if not any(target == root or root in target.parents for root in _allowed_roots(folder)):
            raise ValueError(
                f"{name} in {folder} is a symbolic link to {os.readlink(path)}, outside the folder; links out of the "
                "folder are never uploaded (they may point at a token or private data). Copy the file in if it "
                "belongs to the model."
            )
    if not path.is_file():
        raise ValueError(f"{name} in {folder} is not a regular file")
    return path


def select_upload_files(model: str | os.PathLike, adapter: str | os.PathLike | None = None,
                        include: Iterable[str] = ()) -> UploadSelection:
    """The files `push` uploads from a model folder: those matching `UPLOAD_ALLOW_PATTERNS` (weights, configs,
    tokenizer and processor files, remote-code `.py` files), the adapter files of every subfolder holding an
    `adapter_config.json`, and the `adapter` folder's as `hia/`. Training leftovers (`checkpoint-*`,
    `global_step*`, `optimizer.pt`, `training_args.bin`, ...) and everything else go only when an `include` glob
    pattern names them. A selected file that is a link pointing outside the folder raises `ValueError`."""
    model = Path(model)
    include = tuple(include)
    selection = UploadSelection()
    adapter_dirs = {path.parent.relative_to(model).as_posix() for path in model.glob("*/adapter_config.json")}
    for path in sorted(model.rglob("*")):
        name = path.relative_to(model).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        if name == "README.md" or (adapter is not None and name.startswith(f"{HIA_SUBFOLDER}/")):
            continue  # the card is rendered; an explicit adapter replaces the folder's own hia/
        parent = PurePosixPath(name).parent.as_posix()
        allowed = (_matches(name, UPLOAD_ALLOW_PATTERNS) or (parent in adapter_dirs and PurePosixPath(name).name in
                   ADAPTER_FILES)) and not _never_uploaded(name) and not PurePosixPath(name).name.startswith(".")
        if allowed or _matches(name, include):
            selection.files[name] = _checked_file(path, model, name)
        else:
            selection.left_out.append(name)
    if adapter is not None:
        adapter = Path(adapter)
        for file_name in ADAPTER_FILES:
            if (adapter / file_name).exists() or (adapter / file_name).is_symlink():
                selection.files[f"{HIA_SUBFOLDER}/{file_name}"] = _checked_file(adapter / file_name, adapter,
                                                                                   file_name)
    return selection


def list_upload(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """`(path in the repo, bytes)` of every file `upload_folder` would send, sorted."""
    folder = Path(folder)
    return sorted(
        (path.relative_to(folder).as_posix(), path.stat().st_size) for path in folder.rglob("*") if path.is_file()
    )


@dataclass
class PushResult:
    """What was (or, for a dry run, would be) sent: `files` as `(path, bytes)`; `commit_url` after an upload;
    `left_out`: the model folder's files that are not sent."""

    repo_id: str
    revision: str | None
    private: bool
    dry_run: bool
    files: list[tuple[str, int]] = field(default_factory=list)
    commit_url: str | None = None
    left_out: list[str] = field(default_factory=list)

    def summary(self, uploading: bool = False) -> str:
        total = sum(size for _, size in self.files)
        where = f"{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        verb = "would upload" if self.dry_run else "uploading" if uploading else "uploaded"
        private = " (private)" if self.private else ""
        lines = [f"{verb} {len(self.files)} files ({total / 2**20:.1f} MiB) to {where}{private}"]
        lines += [f"  {path}  {size:,} B" for path, size in self.files]
        if self.left_out:
            lines.append(f"not uploaded ({len(self.left_out)} files; --include PATTERN to add one):")
            lines += [f"  {path}" for path in self.left_out]
        if self.commit_url:
            lines.append(f"  commit: {self.commit_url}")
        return "\n".join(lines)


def push_to_hub(
    model: str | os.PathLike,
    repo_id: str,
    *,
    adapter: str | os.PathLike | None = None,
    card: str | os.PathLike | None = None,
    base_model: str | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    assembled: str | os.PathLike | None = None,
    include: Iterable[str] = (),
    announce: Callable[[PushResult], None] | None = None,
) -> PushResult:
    """Assembles the repo folder (see `assemble_repo`) and uploads it with `huggingface_hub`.

    Args:
        repo_id: the target repo, created if it does not exist.
        private: create the repo private.
        revision: a branch to push to (created if needed); default the main branch.
        dry_run: only assemble (in a temporary folder) and list what would be sent; nothing touches the network
            and nothing is written anywhere else.
        token: a Hub token; default the logged-in one.
        assembled: keep the assembled folder here (a new or empty folder: an existing one is never replaced).
            Not with `dry_run`.
        include: glob patterns of files beyond the allow-list to send (e.g. `"checkpoint-*/*"`).
        announce: called with the file list before anything is uploaded (the command line prints it).
    """
    if assembled and dry_run:
        raise ValueError("A dry run writes nothing outside a temporary folder: drop --assembled, or --dry-run")
    if assembled:
        check_not_inside(assembled, [model, adapter], "model folder")
        if Path(assembled).exists() and (not Path(assembled).is_dir() or any(Path(assembled).iterdir())):
            raise FileExistsError(f"--assembled {assembled} already exists and is not empty; it is never replaced: "
                                  "choose a new folder")
    with tempfile.TemporaryDirectory(prefix="qilin-push-") as temporary:
        folder = Path(assembled) if assembled else Path(temporary) / "repo"
        assemble_repo(model, folder, adapter=adapter, card=card, repo_id=repo_id, base_model=base_model,
                      force=bool(assembled), include=include)
        left_out = select_upload_files(model, adapter, include).left_out
        result = PushResult(repo_id, revision, private, dry_run, list_upload(folder), left_out=left_out)
        if dry_run:
            return result
        if announce is not None:
            announce(result)
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload Qilin-Med-VL with qilin-med-vl push",
        )
        result.commit_url = getattr(commit, "commit_url", None) or str(commit)
        return result



__all__ = [
    "CARD_REPO_IDS",
    "PushResult",
    "assemble_repo",
    "check_repo_folder",
    "list_upload",
    "push_to_hub",
    "render_model_card",
    "select_upload_files",
]
