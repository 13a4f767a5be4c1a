import json

import pytest
import torch

from qilin_med_vl.testing import random_image, tiny_model, tiny_processor

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def processor():
    return tiny_processor()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def images():
    return [random_image(seed) for seed in range(4)]


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """A saved tiny model folder (weights, config, processor), read-only: tests that change it copy it first."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    tiny_model().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def write_training_workspace(root, records):
    """A training folder: images a.png and b.png, train.jsonl holding `records` twice, and a saved tiny model +
    processor in base/. Returns `root`."""
    random_image(0).save(root / "a.png")
    random_image(1).save(root / "b.png")
    with open(root / "train.jsonl", "w", encoding="utf-8") as handle:
        for record in records * 2:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tiny_model().save_pretrained(root / "base")
    tiny_processor().save_pretrained(root / "base")
    return root
