"""Hub publishing: the assembled repo folder, its model card, loading it by repo id from a local Hugging Face cache
with HF_HUB_OFFLINE=1 (the real huggingface_hub resolution path), and what `push` sends. No network."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from peft import get_peft_model

from qilin_med_vl.hub import CARD_REPO_IDS, assemble_repo, check_repo_folder, push_to_hub, render_model_card
from qilin_med_vl.modeling.configuration_hia import HiAConfig
from qilin_med_vl.modeling.modeling_hia import HiABlock
from qilin_med_vl.testing import random_image, tiny_model, tiny_processor

COMMIT = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
QUESTION = "USER: <image>\n<image>\n第一张和第二张分别是治疗前后的图片，请对比两张图片。 ASSISTANT:"


def build_model_with_adapter(folder, seed=0):
    """A saved tiny model + processor, and a HiA adapter (non-identity) saved next to it in `hia/`.
    Returns the adapted PEFT model."""
    tiny_model().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    adapted = get_peft_model(
        tiny_model(), HiAConfig(num_queries=8, num_heads=4, encoder_depths=[1, 1], encoder_width=8, high_res_size=56)
    ).eval()
    generator = torch.Generator().manual_seed(seed)
    for module in adapted.modules():
        if isinstance(module, HiABlock):
            with torch.no_grad():
                module.output_proj.weight.copy_(
                    torch.randn(module.output_proj.weight.shape, generator=generator) * 0.3
                )
    adapted.save_pretrained(folder / "hia")
    return adapted


def install_in_hub_cache(folder, cache, repo_id, commit=COMMIT):
    """Lays `folder` out as huggingface_hub's cache holds a downloaded repo: `models--org--name/snapshots/<commit>`
    plus `refs/main` naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "Qilin-Med-VL-tiny"
    adapted = build_model_with_adapter(folder)
    return folder, adapted


@pytest.fixture(scope="module")
def assembled(model_folder, tmp_path_factory):
    folder, _ = model_folder
    output = tmp_path_factory.mktemp("repo") / "repo"
    return assemble_repo(folder, output, repo_id="test-org/Qilin-Med-VL-HiA-tiny")


def test_assembled_folder_has_everything_a_hub_load_needs(assembled, model_folder):
    files = {path.relative_to(assembled).as_posix() for path in assembled.rglob("*") if path.is_file()}
    source = model_folder[0]
    source_files = {path.relative_to(source).as_posix() for path in source.rglob("*") if path.is_file()}
    assert source_files - files == {"hia/README.md"}  # all of the model, subfolders included
    assert {"README.md", "config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "configuration_qilin_med_vl.py",
            "modeling_qilin_med_vl.py", "modeling_hia.py", "configuration_hia.py", "high_resolution_encoder_hia.py",
            "processing_qilin.py", "image_processing_qilin.py", "image_loading_qilin.py", "dicom_qilin.py",
            "image_checks_qilin.py",
            "hia/adapter_config.json", "hia/adapter_model.safetensors"} <= files
    assert "hia/README.md" not in files  # PEFT's stub card stays out; the repo has one card
    assert check_repo_folder(assembled) == []


def test_model_card_metadata(assembled):
    card = ModelCard.load(assembled / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "llama2" and set(data["language"]) == {"zh", "en"}
    assert data["pipeline_tag"] == "image-text-to-text" and data["library_name"] == "transformers"
    assert "medical" in data["tags"] and "hia" in data["tags"] and data["base_model"]
    assert "test-org/Qilin-Med-VL-HiA-tiny" in card.text and CARD_REPO_IDS["qilin-med-vl-hia"] not in card.text
    assert "No clinical decisions" in card.text


@pytest.mark.parametrize("name", sorted(CARD_REPO_IDS))
def test_every_card_renders_with_complete_metadata(name):
    text = render_model_card(name, repo_id="someone/model", base_model="someone/base")
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == "someone/base"
    for section in ("Intended use", "Out-of-scope use", "Training data", "Limitations", "Evaluation", "Citation"):
        assert f"## {section}" in text, section


def test_incomplete_folder_or_card_is_refused(model_folder, tmp_path):
    folder, _ = model_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "modeling_hia.py").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer") as error:
        assemble_repo(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    card = tmp_path / "card.md"
    card.write_text("---\nlicense: mit\nlanguage: [en]\n---\n# A card\n")
    with pytest.raises(ValueError, match="pipeline_tag"):
        assemble_repo(folder, tmp_path / "out", card=card)
    assert "modeling_hia.py (imported by modeling_qilin_med_vl.py) is missing" in str(error.value)


def test_missing_remote_code_file_is_reported(assembled, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(assembled, copy)
    (copy / "processing_qilin.py").unlink()
    (copy / "hia" / "adapter_model.safetensors").unlink()
    problems = check_repo_folder(copy)
    assert "remote-code file processing_qilin.py is missing" in problems
    assert "hia/ has no adapter weights" in problems


LOAD_BY_REPO_ID = textwrap.dedent(
    """
    import sys, torch
    sys.modules["qilin_med_vl"] = None  # a Hub user: transformers + peft + the repo's remote code only
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    repo_id, expected_path, image0, image1, question = sys.argv[1:6]
    expected = torch.load(expected_path)
    processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
    inputs = processor(images=[image0, image1], text=question, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True).eval()
    assert model.name_or_path == repo_id, model.name_or_path
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected["base"], atol=1e-6, rtol=0)
        model.load_adapter("hia")
        torch.testing.assert_close(model(**inputs).logits, expected["hia"], atol=1e-6, rtol=0)
    pipe = pipeline("image-text-to-text", model=repo_id, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "path": image0}, {"type": "text", "text": "描述"}]}]
    pipe(text=messages, generate_kwargs={"max_new_tokens": 3, "do_sample": False})
    print("HUB-CACHE-OK")
    """
)


def test_loads_by_repo_id_from_an_offline_hub_cache_with_the_adapter(assembled, model_folder, tmp_path):
    _, adapted = model_folder
    repo_id = "test-org/Qilin-Med-VL-HiA-tiny"
    install_in_hub_cache(assembled, tmp_path / "hub", repo_id)
    images = []
    for index in range(2):
        random_image(index).save(tmp_path / f"{index}.png")
        images.append(str(tmp_path / f"{index}.png"))
    inputs = tiny_processor()(images=images, text=QUESTION, return_tensors="pt")
    with torch.no_grad():
        expected = {"hia": adapted(**inputs).logits}
        with adapted.disable_adapter():
            expected["base"] = adapted(**inputs).logits
    torch.save(expected, tmp_path / "expected.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": "",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("HF_HOME", None)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_BY_REPO_ID, repo_id, str(tmp_path / "expected.pt"), *images, QUESTION],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HUB-CACHE-OK" in result.stdout


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records calls, checks what upload_folder would send."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs["revision"], files))
        return type("Commit", (), {"commit_url": "https://example.invalid/commit/1"})()


def test_dry_run_lists_files_and_touches_no_network(model_folder, monkeypatch):
    folder, _ = model_folder

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not contact the Hub")

    monkeypatch.setattr("huggingface_hub.HfApi", refuse)
    result = push_to_hub(folder, "me/tiny", dry_run=True, private=True, revision="v0")
    paths = [path for path, _ in result.files]
    assert "README.md" in paths and "hia/adapter_model.safetensors" in paths and "model.safetensors" in paths
    assert result.dry_run and result.commit_url is None
    assert "would upload" in result.summary() and "me/tiny@v0 (private)" in result.summary()


def test_assembled_folder_may_not_replace_the_model(model_folder):
    folder, _ = model_folder
    with pytest.raises(ValueError, match="would delete the model folder"):
        push_to_hub(folder, "me/tiny", assembled=folder)
    assert (folder / "model.safetensors").is_file()


def test_push_creates_private_repo_branch_and_uploads(model_folder, monkeypatch):
    folder, _ = model_folder
    RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    result = push_to_hub(folder, "me/tiny", private=True, revision="dev", token="hf_fake")
    kinds = [call[0] for call in RecordingApi.calls]
    assert kinds == ["init", "create_repo", "create_branch", "upload_folder"]
    assert RecordingApi.calls[0][1] == "hf_fake"
    assert RecordingApi.calls[1][2]["private"] is True and RecordingApi.calls[1][2]["exist_ok"] is True
    assert RecordingApi.calls[2][2]["branch"] == "dev"
    _, repo_id, revision, files = RecordingApi.calls[3]
    assert (repo_id, revision) == ("me/tiny", "dev")
    assert sorted(files) == sorted(path for path, _ in result.files)
    assert result.commit_url == "https://example.invalid/commit/1"


def test_cli_push_keeps_the_assembled_folder(model_folder, tmp_path, capsys, monkeypatch):
    from qilin_med_vl.cli import build_parser

    folder, _ = model_folder
    parser = build_parser()
    RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    args = parser.parse_args(["push", str(folder), "me/tiny", "--card", "qilin-med-vl-demo",
                              "--assembled", str(tmp_path / "assembled"), "--base-model", "me/base"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    # The list is printed before the upload starts.
    assert "uploading" in out and "hia/adapter_config.json" in out and "commit: https://example.invalid" in out
    card = ModelCard.load(tmp_path / "assembled" / "README.md")
    assert card.data.base_model == "me/base" and "me/tiny" in card.text
    assert json.loads((tmp_path / "assembled" / "hia" / "adapter_config.json").read_text())["peft_type"] == "HIA"


def test_push_works_from_an_installed_wheel(model_folder, tmp_path):
    """The model cards are package data: `push --dry-run` from the built wheel, away from the source checkout."""
    import zipfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Built from a copy: a build writes build/ and *.egg-info next to the sources, and a stale build/ in the checkout
    # could put deleted modules into the wheel.
    source = tmp_path / "source"
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".git", ".venv*", ".ci-venv*", "build", "*.egg-info",
                                                                "runs", "__pycache__", "node_modules"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("qilin_med_vl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert {f"qilin_med_vl/model_cards/{name}.md" for name in CARD_REPO_IDS} <= set(archive.namelist())
        archive.extractall(tmp_path / "installed")
    folder, _ = model_folder
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "installed"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "qilin_med_vl.cli", "push", str(folder), "me/tiny", "--dry-run"],
                            cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "README.md" in result.stdout and "would upload" in result.stdout
