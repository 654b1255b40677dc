"""One registry build and ONE vLLM engine for every eval test (an engine start costs 20-40 s).

The registry is made with the real `composer` CLI, in process (typer's runner: the same code
as the command line, without a Python start per command): a tiny public model, three FFN
experts owned by acme, and a FlexOlmo build of them with a router bias large enough to change
routing. The engine is opened exactly as `composer eval` opens it (serve.offline.open_engine
with the CLI's settings), so the CLI run in the tests shares it instead of starting another.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from cli.main import app
from composer.tiny_models import make_tiny_llama, perturb_ffn
from composer.tiny_moe import write_tiny_tokenizer
from tests.serve.server_fixtures import in_process_engine

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 64
MAX_CHUNKS = 3
EXPERTS = ["alpha", "beta", "gamma"]
SLOTS = ["public", *EXPERTS]

SPEC = """\
name: evaluated
method: compose
style: flexolmo
base: tiny
experts: [alpha, beta, gamma]
top_k: 2
router: {{init: given, weights: {router}}}
output: {{dtype: float32}}
seed: 0
"""


@dataclass
class InProcessCli:
    """The real typer app against one registry ($COMPOSER_HOME, $COMPOSER_DATABASE_URL)."""

    home: Path
    db_url: str

    def __call__(self, *args: str | Path, ok: bool = True) -> Result:
        env = {"COMPOSER_HOME": str(self.home), "COMPOSER_DATABASE_URL": self.db_url}
        res = CliRunner().invoke(app, [str(a) for a in args], env=env)
        if ok and res.exit_code != 0:
            raise AssertionError(
                f"composer {' '.join(map(str, args))} exited {res.exit_code}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}\n{res.exception!r}"
            )
        return res


@dataclass
class Evaluated:
    cli: InProcessCli
    build: Path  # the build's output folder
    data: list[str]  # --data arguments
    engine: Any  # serve.offline.OfflineEngine, shared with the CLI


def _router_file(path: Path) -> Path:
    """Router rows and a bias per layer that flips top-2 choices (public, alpha, beta, gamma)."""
    g = torch.Generator().manual_seed(3)
    router = {}
    for i in range(2):
        router[f"model.layers.{i}.router"] = torch.randn(4, 128, generator=g) * 0.05
        router[f"model.layers.{i}.router_bias"] = torch.tensor([0.0, -5.0, 3.0, 1.0])
    save_file(router, str(path))
    return path


def make_build(cli: InProcessCli, root: Path) -> Path:
    base = make_tiny_llama(root / "base", seed=0)
    write_tiny_tokenizer(base)
    cli("registry", "init")
    cli("registry", "add-owner", "acme")
    cli("registry", "add-base", base, "--name", "tiny")
    for seed, name in enumerate(EXPERTS, start=1):
        perturb_ffn(base, root / name, seed=seed, scale=0.5)
        cli("registry", "add-expert", root / name, "--name", name, "--owner", "acme",
            "--base", "tiny", "--domain", name)  # fmt: skip
    spec = root / "evaluated.yaml"
    spec.write_text(SPEC.format(router=_router_file(root / "router.safetensors")))
    cli("build", spec, "--out", root / "evaluated")
    return root / "evaluated"


def data_args() -> list[str]:
    """Two domains of real text: Python sources and Markdown docs of this repository."""
    return [f"code={REPO / 'merge'}/*.py", f"docs={REPO / 'docs'}/*.md"]


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Evaluated]:
    from cli.serve_cmds import serving_dtype
    from serve.offline import EngineSettings, open_engine

    root = tmp_path_factory.mktemp("eval")
    cli = InProcessCli(root / "home", f"sqlite:///{root / 'registry.db'}")
    out = make_build(cli, root)
    settings = EngineSettings(dtype=serving_dtype(), max_model_len=SEQ_LEN + 1)
    with open_engine(out, cli.db_url, settings) as engine:
        with in_process_engine(out):  # only while it starts: later engines keep their default
            engine.llm  # noqa: B018 (starts the engine)
        yield Evaluated(cli, out, data_args(), engine)
