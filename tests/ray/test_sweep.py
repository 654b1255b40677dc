"""`composer sweep`: a TIES sweep over tiny models, candidates built and scored as Ray tasks on
the local cluster (one candidate invalid: reported, not fatal), and sweep files with bad field
paths refused before anything runs, naming the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from composer.distributed.ray_exec import RayExecutor
from composer.eval.data import domain_chunks, parse_data_args
from composer.inputs import LocalPathResolver
from composer.sweep.report import table, write_report
from composer.sweep.run import run_sweep
from composer.sweep.spec import SweepError, load_sweep
from composer.text import ByteTokenizer
from composer.tiny_models import make_tiny_llama, perturb_ffn
from composer.train.evaluate import perplexity

BASE = """\
method: merge
base: base
experts: [code, legal]
parameters: {method: ties, density: 0.5, lambda: 1.0}
output: {dtype: float32}
"""

SWEEP = """\
base: ties.yaml
candidates:
  - {parameters.density: 0.3}
  - {parameters.density: 0.8}
  - {parameters.density: 0.8, parameters.lambda: 0.5}
  - {parameters.density: 1.5}
eval:
  data: {code: held/code.txt, legal: "held/legal*.txt"}
  seq_len: 32
  max_chunks: 2
select: {metric: mean_perplexity}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    make_tiny_llama(root / "base", seed=0)
    perturb_ffn(root / "base", root / "code", seed=1, scale=0.3)
    perturb_ffn(root / "base", root / "legal", seed=2, scale=0.3)
    (root / "ties.yaml").write_text(BASE)
    (root / "held").mkdir()
    (root / "held" / "code.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    legal = "Permission is hereby granted, free of charge.\n" * 20
    (root / "held" / "legal1.txt").write_text(legal)
    (root / "sweep.yaml").write_text(SWEEP)
    return root


@pytest.mark.slow
def test_sweep_on_ray(ray_cluster: str, models: Path, tmp_path: Path) -> None:
    sweep = load_sweep(models / "sweep.yaml")
    out = tmp_path / "out"
    executor = RayExecutor(ray_cluster)
    rows = run_sweep(sweep, out, LocalPathResolver(models), executor, progress=False)
    summary = write_report(sweep, rows, out)

    assert [r["label"] for r in rows] == ["c0", "c1", "c2", "c3"]
    assert [r["ok"] for r in rows] == [True, True, True, False]
    assert "parameters.density" in rows[3]["error"]  # planned on the driver: never ran
    assert executor.stats.tasks == 3
    means = [r["mean_perplexity"] for r in rows[:3]]
    assert len(set(means)) == 3 and all(1.0 < m < 1e4 for m in means)
    assert set(rows[0]["perplexity"]) == {"code", "legal"}

    best = min(rows[:3], key=lambda r: r["mean_perplexity"])
    assert summary["best"] == best["label"]
    # The figure from the Ray task is the one scoring its build here gives, exactly.
    domains = parse_data_args([f"code={models / 'held/code.txt'}"])
    chunks = domain_chunks(domains[0], ByteTokenizer(256), 32, 2)
    assert perplexity(best["out_dir"], chunks) == best["perplexity"]["code"]
    # best.yaml is the winning candidate's spec.
    spec = yaml.safe_load((out / "best.yaml").read_text())
    wanted = next(c for c in sweep.candidates if c.label == best["label"]).overrides
    for k, v in wanted.items():
        assert spec["parameters"][k.split(".")[1]] == v
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = table(rows, "mean_perplexity", best).splitlines()
    assert lines[1 + int(best["label"][1:])].startswith("*")
    assert "FAILED: " in lines[4] and "parameters.density" in lines[4]
    doc = json.loads((out / "results.json").read_text())
    assert [c["ok"] for c in doc["candidates"]] == [True, True, True, False]


@pytest.mark.parametrize(
    ("grid", "line", "field"),
    [
        ("  parameters.density: [0.5]\n  router.tune.stepz: [1, 2]\n", 4, "grid.router.tune.stepz"),
        ("  densty: [0.5]\n", 3, "grid.densty"),
        ("  output.dtype.x: [1]\n", 3, "grid.output.dtype.x"),
    ],
)
def test_bad_field_path_is_refused(models: Path, grid: str, line: int, field: str) -> None:
    path = models / "bad.yaml"
    path.write_text(f"base: ties.yaml\ngrid:\n{grid}eval:\n  data: {{code: held/code.txt}}\n")
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert str(e.value).startswith(f"{path}:{line}: {field}: ")


def test_grid_expands_every_combination(models: Path) -> None:
    path = models / "grid.yaml"
    path.write_text(
        "base: ties.yaml\ngrid:\n  parameters.density: [0.2, 0.4]\n"
        "  experts.1.weight: [1.0, 2.0, 3.0]\neval:\n  data: {code: held/code.txt}\n"
    )
    sweep = load_sweep(path)
    assert len(sweep.candidates) == 6
    last = yaml.safe_load(sweep.candidates[-1].spec_text)
    assert last["parameters"]["density"] == 0.4
    assert last["experts"] == ["code", {"ref": "legal", "weight": 3.0}]


def test_cli_sweep_bad_file_exits_2(models: Path, tmp_path: Path) -> None:
    """The real typer app, in process (a subprocess would spend seconds importing torch)."""
    from typer.testing import CliRunner

    from cli.main import app

    path = models / "bad-cli.yaml"
    path.write_text("base: ties.yaml\ncandidates:\n  - {parameters.density: 0.5, topk: 3}\n"
                    "eval:\n  data: {code: held/code.txt}\n")  # fmt: skip
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert f"{path}:3: candidates[0].topk: unknown field" in result.output.replace("\n", "")
    assert not (tmp_path / "o").exists()
