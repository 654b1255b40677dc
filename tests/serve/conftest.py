"""Session-wide vLLM engines for the serve tests.

Engines run in the test process (server_fixtures.tiny_llm; FlexOlmo ones in vLLM's engine
process): engines of different models live side by side, each masking with its own settings
(serve/masking.py MaskingConfig).
Tests that need the same tiny model on the same MoE backend still share one engine for the
session (one per pytest-xdist worker): test_engine_masks and test_engine_moe_backend both use
the `vllm` backend's engine of each tiny model when they run on the same worker. Every engine
is started with the same settings (tests/serve/server_fixtures.py tiny_llm) and shut down, all
at once, at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from composer.tiny_moe import make_tiny_moe
from serve.moe_backend import BACKEND_ENV
from tests.serve.server_fixtures import tiny_llm, write_composition

# As `composer build` records it: slot 0 is the public base, the others registered experts.
SLOTS: dict[str, int | None] = {"public": None, "code": 1, "legal": 2, "math": 3}


class EnginePool:
    """One tiny composed MoE per kind (mixtral, flexolmo) and one engine per (kind, backend)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: dict[str, Path] = {}
        self._engines: dict[tuple[str, str], Any] = {}

    def model(self, kind: str) -> Path:
        """The full tiny model of ``kind``, with its composition.json (SLOTS)."""
        if kind not in self._models:
            path = make_tiny_moe(self.root / kind / "full", kind)
            write_composition(path, SLOTS, "0" * 64)
            self._models[kind] = path
        return self._models[kind]

    def engine(self, kind: str, backend: str) -> Any:
        """The offline engine of ``kind``'s model on MoE ``backend`` (started on first use)."""
        key = (kind, backend)
        if key not in self._engines:
            with pytest.MonkeyPatch.context() as mp:  # the engine process reads both at start
                mp.setenv(BACKEND_ENV, backend)
                # `apply_model` (test_engine_moe_backend) pickles a function to the engine.
                mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
                self._engines[key] = tiny_llm(self.model(kind))
        return self._engines[key]

    def close(self) -> None:
        """Shut every engine down at once: each waits up to 5 s for its process to exit."""
        with ThreadPoolExecutor(max_workers=max(1, len(self._engines))) as pool:
            list(
                pool.map(lambda llm: llm.llm_engine.engine_core.shutdown(), self._engines.values())
            )
        self._engines.clear()


@pytest.fixture(scope="session")
def engine_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginePool]:
    pool = EnginePool(tmp_path_factory.mktemp("engines"))
    yield pool
    pool.close()
