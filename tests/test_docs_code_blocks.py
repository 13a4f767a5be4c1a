"""Every ```python block of the model cards and the README runs against the tiny model, so the demos never rot.

The repo ids the docs use (`qilin-med-vl/Qilin-Med-VL`, `-HiA`, `-Demo`) are replaced with a saved tiny model
folder that has a HiA adapter in `hia/`; every image file a block names (`"....png"`, `".jpg"`, `".dcm"`) is
created in the folder the blocks run in (random PNG/JPEG images, a CT slice shipped with pydicom). The blocks of one
document run in order in one fresh process with HF_HUB_OFFLINE=1, sharing their variables as a reader who runs them
one after the other would; a failure names the block. A block preceded by `<!-- no-test: reason -->` is skipped with
its reason; such blocks are counted and kept few.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_hub import build_model_with_adapter

from qilin_med_vl.testing import random_image

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(ROOT.glob("qilin_med_vl/model_cards/*.md")) + [path for path in [ROOT / "README.md"]
                                                                 if path.is_file()]
DOC_REPO_ID = re.compile(r"qilin-med-vl/Qilin-Med-VL(?:-HiA|-Demo)?(?![\w.-])")
IMAGE_PATH = re.compile(r"""["']([\w./-]+\.(png|jpe?g|dcm))["']""", re.IGNORECASE)
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(?P<reason>.*?)\s*-->$")
MAX_NO_TEST_BLOCKS = 3

RUNNER = """
import sys, traceback
blocks = __import__("json").load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
for block in blocks:
    try:
        exec(compile(block["code"], block["name"], "exec"), namespace)
    except BaseException:
        print(f"BLOCK FAILED: {block['name']}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    print(f"BLOCK OK: {block['name']}", flush=True)
"""


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
            start = end = index + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = NO_TEST.match(previous)
            blocks.append(CodeBlock(path, start, "\n".join(lines[start:end]) + "\n", marker and marker["reason"]))
            index = end
        index += 1
    return blocks


BLOCKS = {document: extract_python_blocks(document) for document in DOCUMENTS}


def prepare_code(code: str, model_folder: Path) -> str:
    code = DOC_REPO_ID.sub(str(model_folder), code)
    # A random tiny model rarely stops early: a few tokens show that generation works, hundreds only cost time.
    return re.sub(r"""(max_new_tokens["']?\s*[=:]\s*)\d+""", r"\g<1>4", code)


def create_images(code: str, folder: Path, dicom_source: str) -> None:
    for seed, (name, extension) in enumerate(IMAGE_PATH.findall(code)):
        path = folder / name
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if extension.lower() == "dcm":
            shutil.copy(dicom_source, path)
        else:
            random_image(seed, size=(64, 48)).save(path)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs-model") / "tiny-model"
    build_model_with_adapter(folder)
    return folder


def test_documents_have_runnable_examples():
    cards = list(ROOT.glob("qilin_med_vl/model_cards/*.md"))
    assert len(cards) >= 3
    for card in cards:
        assert any(not block.skip_reason for block in BLOCKS[card]), card


def test_no_test_blocks_are_few_and_say_why():
    skipped = [block for blocks in BLOCKS.values() for block in blocks if block.skip_reason is not None]
    assert all(block.skip_reason for block in skipped), [block.name for block in skipped if not block.skip_reason]
    assert len(skipped) <= MAX_NO_TEST_BLOCKS, [block.name for block in skipped]


def test_extractor_reads_blocks_and_no_test_markers(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text(
        "text\n```python\nprint(1)\n```\n\n<!-- no-test: needs a GPU -->\n\n```python\nprint(2)\n```\n"
        "```bash\nls\n```\n```python\nx = 'qilin-med-vl/Qilin-Med-VL-HiA'; open('scan.dcm'); max_new_tokens=256\n```\n"
    )
    blocks = extract_python_blocks(document)
    assert [(block.line, block.skip_reason) for block in blocks] == [(2, None), (8, "needs a GPU"), (14, None)]
    code = prepare_code(blocks[2].code, Path("/models/tiny"))
    assert code == "x = '/models/tiny'; open('scan.dcm'); max_new_tokens=4\n"
    assert IMAGE_PATH.findall(code) == [("scan.dcm", "dcm")]


@pytest.mark.parametrize("document", DOCUMENTS, ids=[str(path.relative_to(ROOT)) for path in DOCUMENTS])
def test_document_code_blocks_run(document, tiny_repo, tmp_path):
    import pydicom.data as pydicom_data
    runnable = [block for block in BLOCKS[document] if not block.skip_reason]
    if not runnable:
        pytest.skip(f"{document.name} has no runnable python block")
    blocks = [{"name": block.name, "code": prepare_code(block.code, tiny_repo)} for block in runnable]
    dicom = pydicom_data.get_testdata_file("CT_small.dcm", download=False)
    for block in blocks:
        create_images(block["code"], tmp_path, dicom)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.count("BLOCK OK") == len(blocks)
