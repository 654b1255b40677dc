"""Eval runs recorded against builds (SQLite and PostgreSQL): stored as reported, listed by
`composer registry show BUILD` / `#id`, refused on a schema that predates them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.db import Registry, downgrade
from registry.errors import RegistryError
from registry.eval_runs import build_for_folder, check_schema, eval_runs, record_eval_run
from registry.service import RegistryService

REPORT = {
    "data": {"code": {"patterns": ["c/*.py"], "files": [{"path": "c/a.py", "sha256": "a" * 64}],
                      "chunks": 2, "seq_len": 64}},
    "experts": {"request": {"exclude": ["beta"]}, "used": ["public", "alpha"],
                "model": ["public", "alpha", "beta"]},
    "perplexity": {"code": 12.5},
    "opt_out_matrix": None,
    "routing": None,
    "figures": {"routing": {"path": "x/routing.png", "sha256": "b" * 64}},
    "wall_s": 3.25,
}  # fmt: skip


def _build(cli, out: Path) -> int:
    service = RegistryService(cli.db_url, cli.home)
    try:
        return service.record_build(
            name="flexmix", spec_sha256="0" * 64, spec={}, method="compose/flexolmo",
            output_path=str(out), inputs=[], outputs={}, metrics={}, wall_s=1.0,
            peak_rss_bytes=None,
        )  # fmt: skip
    finally:
        service.close()


def test_runs_are_recorded_and_listed(cli, tmp_path: Path) -> None:
    build_id = _build(cli, tmp_path / "flexmix")
    reg = Registry(cli.db_url)
    try:
        check_schema(reg)
        assert build_for_folder(reg, tmp_path / "flexmix") == build_id
        assert build_for_folder(reg, tmp_path / "other") is None
        run_id = record_eval_run(reg, build_id, "composer eval flexmix --data code=c/*.py", REPORT)
        [run] = eval_runs(reg, build_id)
    finally:
        reg.close()
    assert run["id"] == run_id
    assert run["mask"] == REPORT["experts"] and run["data"] == REPORT["data"]
    assert run["results"] == {"perplexity": {"code": 12.5}, "opt_out_matrix": None,
                              "routing": None, "lm_eval": None}  # fmt: skip
    for ref in ("flexmix", f"#{build_id}"):
        doc = json.loads(cli("registry", "show", ref, "--json").stdout)
        assert doc["id"] == build_id and [r["id"] for r in doc["eval_runs"]] == [run_id]
    proc = cli("registry", "show", "nothing", ok=False)
    assert proc.returncode == 2
    assert "unknown expert 'nothing'" in proc.stderr and "no build 'nothing' either" in proc.stderr


def test_an_old_schema_is_refused_naming_the_fix(cli) -> None:
    downgrade(cli.db_url, "0001")
    reg = Registry(cli.db_url)
    try:
        with pytest.raises(RegistryError, match="composer registry init"):
            check_schema(reg)
    finally:
        reg.close()
