"""Every ```python block of the model cards and the README runs, against the tiny model, so the demos never rot.

The repo ids the docs use (`qilin-med-vl/Qilin-Med-VL`, `-HiA`, `-Demo`) are replaced with a saved tiny model
folder that has a HiA adapter in `hia/`; each block runs in its own process with HF_HUB_OFFLINE=1, in a folder that
holds the image files the docs name (PNG made here, a DICOM file shipped with pydicom). A block preceded by
`<!-- no-test: reason -->` is skipped, with its reason; such blocks are counted and kept few.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import random_image
from test_hub import build_model_with_adapter

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(ROOT.glob("model_cards/*.md")) + [path for path in [ROOT / "README.md"] if path.is_file()]
DOC_REPO_ID = re.compile(r"qilin-med-vl/Qilin-Med-VL(?:-HiA|-Demo)?(?![\w.-])")
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(?P<reason>.*?)\s*-->$")
MAX_NO_TEST_BLOCKS = 3
PNG_FILES = {"chest_xray.png": 0, "knee_before.png": 1, "knee_after.png": 2}
DICOM_FILE = "ct_slice.dcm"


@dataclass
class CodeBlock:
    document: Path
    line: int
    code: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def extract_python_blocks(path: Path) -> list[CodeBlock]:
    """The ```python blocks of a markdown file, with the no-test reason of the comment right before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            start = index + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = NO_TEST.match(previous)
            blocks.append(CodeBlock(path, start, "\n".join(lines[start:end]) + "\n", marker and marker["reason"]))
            index = end
        index += 1
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in extract_python_blocks(document)]


@pytest.fixture(scope="session")
def docs_workdir(tmp_path_factory):
    """A folder with the docs' image files and, in `tiny-model/`, the model every repo id stands for."""
    pydicom_data = pytest.importorskip("pydicom.data")
    workdir = tmp_path_factory.mktemp("docs")
    build_model_with_adapter(workdir / "tiny-model")
    for name, seed in PNG_FILES.items():
        random_image(seed, size=(64, 48)).save(workdir / name)
    shutil.copy(pydicom_data.get_testdata_file("CT_small.dcm", download=False), workdir / DICOM_FILE)
    return workdir


def test_documents_have_runnable_examples():
    assert len(list(ROOT.glob("model_cards/*.md"))) >= 3
    for document in ROOT.glob("model_cards/*.md"):
        assert any(block.document == document and not block.skip_reason for block in BLOCKS), document


def test_no_test_blocks_are_few_and_say_why():
    skipped = [block for block in BLOCKS if block.skip_reason is not None]
    assert all(block.skip_reason for block in skipped), [block.name for block in skipped if not block.skip_reason]
    assert len(skipped) <= MAX_NO_TEST_BLOCKS, [block.name for block in skipped]


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_code_block_runs(block, docs_workdir):
    if block.skip_reason:
        pytest.skip(f"no-test: {block.skip_reason}")
    code = DOC_REPO_ID.sub(str(docs_workdir / "tiny-model"), block.code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(docs_workdir / "modules")}
    result = subprocess.run([sys.executable, "-c", code], cwd=docs_workdir, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{block.name} failed:\n{block.code}\n{result.stderr[-3000:]}"
