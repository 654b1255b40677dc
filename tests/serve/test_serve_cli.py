"""`composer serve BUILD_OR_PATH`: what it serves (a folder or a recorded build) and how it
refuses bad targets before starting vLLM (the server itself: test_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.serve_cmds import resolve_model
from registry.db import upgrade
from registry.errors import ComposerError
from registry.service import RegistryService

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("COMPOSER_HOME", str(home))
    monkeypatch.setenv("COMPOSER_DATABASE_URL", f"sqlite:///{tmp_path / 'registry.db'}")
    return home


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    return path


def _record(name: str, out: Path) -> int:
    service = RegistryService()
    try:
        return service.record_build(
            name=name, spec_sha256="0" * 64, spec={}, method="compose/flexolmo",
            output_path=str(out), inputs=[], outputs={}, metrics={}, wall_s=1.0,
            peak_rss_bytes=None,
        )  # fmt: skip
    finally:
        service.close()


def test_a_folder_is_served_with_the_registry_when_there_is_one(home: Path, tmp_path: Path) -> None:
    model = _model(tmp_path / "m")
    assert resolve_model(str(model)) == (model, None)  # no registry yet: no policies
    upgrade()
    assert resolve_model(str(model)) == (model, os.environ["COMPOSER_DATABASE_URL"])


def test_builds_are_found_by_name_newest_first_and_by_id(home: Path, tmp_path: Path) -> None:
    upgrade()
    old, new = _model(tmp_path / "old"), _model(tmp_path / "new")
    first = _record("flexmix", old)
    second = _record("flexmix", new)
    assert resolve_model("flexmix")[0] == new
    assert resolve_model(f"#{first}")[0] == old
    assert resolve_model(str(second))[0] == new
    with pytest.raises(ComposerError, match="no build 'nope'"):
        resolve_model("nope")


def test_a_build_whose_folder_is_gone_is_refused(home: Path, tmp_path: Path) -> None:
    upgrade()
    _record("gone", tmp_path / "deleted")
    with pytest.raises(ComposerError, match="has no config.json"):
        resolve_model("gone")


def test_cli_refuses_bad_targets_with_one_line_and_exit_2(home: Path, tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "cli.main", "serve", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=os.environ)

    proc = serve(str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: not a checkpoint folder, and there is no registry to "
        "find a build in"
    ]
    proc = serve(str(_model(tmp_path / "m")), "--api-keys", "on")
    assert proc.returncode == 2 and "--api-keys on needs a registry" in proc.stderr
    # With a registry, a composer build that lost its composition.json cannot be bound to its
    # experts' policies: refused before vLLM starts, not served ungoverned.
    upgrade()
    model = _model(tmp_path / "orphan")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "composer_experts": ["public", "a"]}))
    proc = serve(str(model), "--policy-max-staleness", "10")
    assert proc.returncode == 2 and "composition.json is missing" in proc.stderr
    proc = serve(str(_model(tmp_path / "m2")), "--policy-ttl", "5", "--policy-max-staleness", "5")
    assert proc.returncode == 2 and "must exceed the refresh interval" in proc.stderr


def test_serving_dtype_follows_the_device(pretend) -> None:  # type: ignore[no-untyped-def]
    """vLLM would serve bfloat16 on any CPU; composer serve asks for it only where it is native."""
    from cli.serve_cmds import serving_dtype

    pretend(False)
    assert serving_dtype() == "float32"
    pretend(True)
    assert serving_dtype() == "bfloat16"
