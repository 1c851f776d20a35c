"""Fixtures for the memory tests: tiny random models (CPU, seeded) and small media items."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmembed.model import Model
from tests.conftest import tiny_model


@pytest.fixture(scope="session")
def model() -> Model:
    return tiny_model(0)


@pytest.fixture(scope="session")
def other_model() -> Model:
    return tiny_model(1)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "memory.db"


def picture(seed: int, size: tuple[int, int] = (20, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def sound(seed: int, n: int = 8000, rate: int = 16000) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, n).astype(np.float32), rate
