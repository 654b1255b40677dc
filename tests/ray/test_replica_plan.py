"""`--replicas` and its options without a cluster: how they map to Ray Serve's deployment options,
and what the CLI refuses before starting anything (the end-to-end tests:
test_serve_replicas.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from serve.replica_plan import DEPLOYMENT, ReplicaPlan

REPO = Path(__file__).resolve().parents[2]


def test_fixed_replicas_map_to_num_replicas_and_actor_resources() -> None:
    options = ReplicaPlan(replicas=2, gpus_per_replica=1).deployment_options()
    assert options["name"] == DEPLOYMENT
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert options["max_ongoing_requests"] == 64


def test_the_proxy_bounds_every_request_by_default() -> None:
    """Serve's own default is no request timeout: a request whose replica died under it could
    wait forever. The plan always gives the proxy one."""
    assert ReplicaPlan(replicas=2).http_options("0.0.0.0", 9000) == {
        "host": "0.0.0.0", "port": 9000, "request_timeout_s": 600.0,
    }  # fmt: skip
    plan = ReplicaPlan(replicas=1, request_timeout_s=5)
    assert plan.http_options("h", 1)["request_timeout_s"] == 5


def test_bounds_map_to_serves_autoscaling_config() -> None:
    options = ReplicaPlan(replicas=2, min_replicas=1, max_replicas=4).deployment_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
    }  # fmt: skip
    # One bound given: the other is --replicas.
    assert ReplicaPlan(replicas=3, max_replicas=5).deployment_options()["autoscaling_config"] == {
        "min_replicas": 3, "max_replicas": 5, "initial_replicas": 3,
    }  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ray-address", "127.0.0.1:6379"], "--ray-address only apply with --replicas N"),
        (["--max-replicas", "3", "--gpus-per-replica", "1"],
         "--max-replicas, --gpus-per-replica only apply with --replicas N"),
        (["--replicas", "3", "--max-replicas", "2"],
         "--replicas 3 must lie within --min-replicas 3 and --max-replicas 2"),
        (["--replicas", "1", "--min-replicas", "2"],
         "--replicas 1 must lie within --min-replicas 2 and --max-replicas 1"),
        (["--request-timeout-s", "5"], "--request-timeout-s only apply with --replicas N"),
        (["--replicas", "2", "--request-timeout-s", "0"],
         "--request-timeout-s: Input should be greater than 0"),
        (["--replicas", "2", "--adapters", "code"],
         "--adapters with --replicas is not supported yet"),
    ],
)  # fmt: skip
def test_the_cli_refuses_inconsistent_replica_options(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMPOSER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "300")
    res = CliRunner().invoke(app, ["serve", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_the_single_server_never_imports_ray() -> None:
    code = (
        "import sys, cli.main, cli.serve_cmds, serve.server, serve.replica_plan; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
