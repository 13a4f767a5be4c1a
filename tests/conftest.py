import numpy as np
import pytest
import torch
from PIL import Image

from qilin_med_vl.testing import tiny_model, tiny_processor

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def processor():
    return tiny_processor()


@pytest.fixture
def model():
    return tiny_model()


def random_image(seed: int, size=(40, 30)) -> Image.Image:
    """A random RGB image of `size` (width, height), not square, so that padding to a square matters."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def images():
    return [random_image(seed) for seed in range(4)]
