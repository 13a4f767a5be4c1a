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
