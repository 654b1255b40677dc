"""`composer build`: --check, --json, errors as one line with exit code 2, a real build.

COMPOSER_HOME is an empty folder, so no registry is found and references are local folders.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from build_helpers import config, tensors, write_spec
from typer.testing import CliRunner, Result

from cli.main import app

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    home = tmp_path / "home"
    monkeypatch.setenv("COMPOSER_HOME", str(home))
    monkeypatch.delenv("COMPOSER_DATABASE_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at the terminal width
    monkeypatch.chdir(tmp_path)  # where the default output folder (out/NAME) would go
    return {"COMPOSER_HOME": str(home)}


def _flex_spec(models: Path, folder: Path, name: str = "flex.yaml") -> Path:
    text = (
        "name: clitest\nmethod: compose\nstyle: flexolmo\n"
        f"base: {models / 'base'}\nexperts: [{models / 'code'}, {models / 'legal'}]\ntop_k: 2\n"
    )
    return write_spec(folder, text, name)


def _invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, ["build", *map(str, args)], catch_exceptions=False)


def _outputs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("home", "specs"))


def test_check_prints_the_plan_and_writes_nothing(
    models: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    spec = _flex_spec(models, tmp_path / "specs")
    res = _invoke(spec, "--check", "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    for fragment in (
        "compose/flexolmo",
        "MixtralForCausalLM, 3 experts, top-2",
        "public",
        "code",
        "legal",
        "steps:",
        "verify: shared weights of every expert bit-identical to the base",
    ):
        assert fragment in res.stdout, fragment
    assert _outputs(tmp_path) == []  # neither --out nor the default out/clitest
    res = _invoke(spec, "--check")
    assert res.exit_code == 0 and _outputs(tmp_path) == []


def test_check_json_is_one_document(models: Path, tmp_path: Path, env: dict[str, str]) -> None:
    spec = _flex_spec(models, tmp_path / "specs")
    res = _invoke(spec, "--check", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["ok"] is True
    assert doc["plan"][0].split() == ["method", "compose/flexolmo"]
    assert "steps:" in doc["plan"]
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "method: upcycle\nbase: base\nnum_experts: 2\ntopk: 1\n",
            "bad.yaml:4: topk: unknown field",
        ),
        ("method: upcycle\nbase: [x\n", "bad.yaml:3: invalid YAML"),
        (
            "method: upcycle\nbase: nowhere\nnum_experts: 2\n",
            "'nowhere' is not a checkpoint folder",
        ),
        (
            "method: upcycle\nbase: BASE\nnum_experts: 2\n"
            "router: {init: hidden_mean, calibration: [x.txt, y.txt]}\n",
            "router.calibration[0]: ",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    models: Path, tmp_path: Path, env: dict[str, str], text: str, where: str
) -> None:
    text = text.replace("BASE", str(models / "base"))
    spec = write_spec(tmp_path / "specs", text, "bad.yaml")
    res = _invoke(spec, "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert where in lines[0]
    if "bad.yaml:" in where:
        assert lines[0].startswith(f"error: {spec}:")
    assert _outputs(tmp_path) == []


def test_build_json_no_record(models: Path, tmp_path: Path, env: dict[str, str]) -> None:
    spec = _flex_spec(models, tmp_path / "specs")
    out = tmp_path / "built"
    res = _invoke(spec, "--out", out, "--json", "--no-record", "--seed", "4")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["build_id"] is None and doc["out_dir"] == str(out)
    assert set(doc) == {"build_id", "out_dir", "spec_sha256", "files", "wall_s", "peak_rss_bytes"}
    assert doc["peak_rss_bytes"] > 0 and doc["wall_s"] >= 0
    for name, sha in doc["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha, name
    assert "composer_router.safetensors" in doc["files"]
    assert config(out)["composer_experts"] == ["public", "code", "legal"]
    assert json.loads((out / "composition.json").read_text())["seed"] == 4
    assert len(tensors(out)) > 0
    # The same command again is refused: the output exists.
    again = _invoke(spec, "--out", out, "--json", "--no-record")
    assert again.exit_code == 2 and again.stdout == ""
    assert again.stderr.startswith("error: output ") and "already exists" in again.stderr


def test_build_default_output_folder_without_registry(
    models: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    spec = _flex_spec(models, tmp_path / "specs")
    res = _invoke(spec)  # records by default, but there is no registry: nothing to record in
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    last = res.stderr.splitlines()[-1].split("\r")[-1]  # after the progress bars
    assert last.startswith(f"built {tmp_path / 'out' / 'clitest'} in "), res.stderr
    assert "registry build" not in last
    assert (tmp_path / "out" / "clitest" / "config.json").is_file()


def test_real_command_line(models: Path, tmp_path: Path) -> None:
    """The installed entry point, in a subprocess: a bad spec, then --check --json."""
    env = {"COMPOSER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "COLUMNS": "300"}
    bad = write_spec(tmp_path / "specs", "method: upcycle\nbase: b\nnum_experts: 0\n", "bad.yaml")
    composer = Path(sys.executable).parent / "composer"
    cmd = [str(composer)] if composer.exists() else [sys.executable, "-m", "cli.main"]
    p = subprocess.run(
        [*cmd, "build", str(bad)], env=env, capture_output=True, text=True, cwd=REPO, check=False
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"error: {bad}:3: num_experts: must be >= 1, got 0\n"
    spec = _flex_spec(models, tmp_path / "specs")
    p = subprocess.run(
        [*cmd, "build", str(spec), "--check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ok"] is True
    assert not (tmp_path / "out").exists()


def test_check_without_a_registry_says_where_it_looked(tmp_path: Path, env: dict[str, str]) -> None:
    """A fresh machine: no registry in $COMPOSER_HOME. The error names the spec line, where the
    registry was looked for and the commands that would make the name resolve; --check creates
    no database file on the way."""
    spec = write_spec(tmp_path / "specs", "method: upcycle\nbase: smollm2\nnum_experts: 2\n")
    res = _invoke(spec, "--check")
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    home = Path(env["COMPOSER_HOME"])
    assert lines[0].startswith(f"error: {spec}:2: base: 'smollm2' is not a checkpoint folder")
    for needle in (
        f"no registry database at {home / 'registry.db'}",
        "`composer registry init`",
        "`composer registry add-base PATH --name smollm2`",
        "`make demo`",
    ):
        assert needle in lines[0], needle
    assert not (home / "registry.db").exists()


def test_check_help_says_what_it_needs() -> None:
    res = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "300"})
    text = " ".join(res.stdout.split())
    assert "reads no weights and writes nothing" in text and "COMPOSER_HOME" in text
