"""Fixtures for the expert-training tests: tiny public checkpoints and a learnable token pattern."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from composer.text import TokenChunks
from composer.tiny_models import make_tiny_llama, make_tiny_olmo2


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "public")


@pytest.fixture(scope="session")
def tiny_olmo2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_olmo2(tmp_path_factory.mktemp("olmo2") / "public")


def arithmetic_chunks(n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Rows ``start, start+d, start+2d, ... (mod 256)`` with d in {1, 2, 3}: a pattern a random
    model predicts at chance and an FFN quickly learns."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 256, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(seq_len)) % 256


@pytest.fixture(scope="session")
def pattern_data() -> TokenChunks:
    return TokenChunks(arithmetic_chunks(256, 32, seed=0), arithmetic_chunks(16, 32, seed=1))
