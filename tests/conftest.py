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
