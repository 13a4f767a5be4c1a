"""The shipped demo model answers from the image: shipped examples with different ground truth do not all get the
same answer, and a finding it reads reliably (a metal implant) is named."""

import json

import pytest

from qilin_med_vl.demo import DEMO_EXAMPLES_DIR, demo_model_available, generate_report

pytestmark = pytest.mark.skipif(not demo_model_available(), reason="the embedded demo model is not installed")


def load_demo(adapter):
    from qilin_med_vl.demo import DEMO_MODEL_DIR
    from qilin_med_vl.loading import load_model_and_processor

    return load_model_and_processor(str(DEMO_MODEL_DIR), adapter, "cpu")


@pytest.fixture(scope="module")
def demo():
    return load_demo("hia")


def gallery(task, file="gallery.jsonl"):
    """The shipped single-image records of `task`: the gallery's, or those of the before/after pair's images."""
    records = [json.loads(line) for line in (DEMO_EXAMPLES_DIR / file).read_text("utf-8").splitlines()]
    return [record for record in records if record["task"] == task]


def question(record):
    """The record's question without its image placeholders."""
    return record["conversations"][0]["value"].split("\n")[-1]


def test_disease_answers_depend_on_the_image(demo):
    model, processor = demo
    records = gallery("disease")
    assert len({record["meta"]["label"] for record in records}) == len(records) >= 2
    answers = {
        record["meta"]["label"]: generate_report(
            model, processor, [str(DEMO_EXAMPLES_DIR / record["images"][0])], question(record), max_new_tokens=16)
        for record in records
    }
    assert len(set(answers.values())) >= 2, answers  # an image-blind model gives one answer to every image


def test_a_visible_finding_is_named(demo):
    model, processor = demo
    record = next(record for record in gallery("disease") if record["meta"]["label"] == "postop")
    answer = generate_report(model, processor, [str(DEMO_EXAMPLES_DIR / record["images"][0])], question(record),
                             max_new_tokens=16)
    assert record["meta"]["disease_name"] in answer


def test_hia_reads_the_small_flake_that_the_base_cannot_see(demo):
    # The shipped pair's first image has one 8 px flake (at 1024 px), invisible to the base's 112 px tower: the base
    # calls the knee normal, and HiA, reading the high-resolution view, names the flake's disease.
    from qilin_med_vl.synthetic.findings import DISEASE_NAMES

    record = next(record for record in gallery("disease", "examples.jsonl") if record["meta"]["label"] == "flake")
    assert record["meta"]["findings"][0][0]["size_class"] == "small"
    image = [str(DEMO_EXAMPLES_DIR / record["images"][0])]
    model, processor = demo
    with_hia = generate_report(model, processor, image, question(record), max_new_tokens=16)
    base, base_processor = load_demo(None)  # as `qilin-med-vl demo --no-adapter` loads it
    without_hia = generate_report(base, base_processor, image, question(record), max_new_tokens=16)
    flake_disease = DISEASE_NAMES["flake"]
    assert flake_disease in with_hia and flake_disease not in without_hia, (with_hia, without_hia)


def test_the_shipped_adapter_names_no_local_base_path():
    from qilin_med_vl.demo import DEMO_MODEL_DIR

    config = json.loads((DEMO_MODEL_DIR / "hia" / "adapter_config.json").read_text("utf-8"))
    base = config.get("base_model_name_or_path")
    # nothing, or a Hub repo id ("owner/name"): never a path of the machine the adapter was trained on
    assert base is None or (base.count("/") == 1 and not base.startswith(("/", ".", "~")) and "\\" not in base), base
