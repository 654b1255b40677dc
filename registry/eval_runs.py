"""Eval runs recorded against builds: `composer eval` writes one row per run, `composer registry
show BUILD` lists them. A folder is matched to the newest build whose output is that folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from registry.db import Registry, current_revision, head_revision
from registry.errors import RegistryError
from registry.models import Build, EvalRun


def check_schema(registry: Registry) -> None:
    """Refuse before any work when the database predates the eval_runs table."""
    have, want = current_revision(registry.engine), head_revision(registry.url)
    if have != want:
        raise RegistryError(
            f"the registry at {registry.display_url} has schema {have}, recording eval runs "
            f"needs {want}: run `composer registry init`"
        )


def build_for_folder(registry: Registry, folder: str | Path) -> int | None:
    """Id of the newest recorded build written to ``folder``, or None."""
    want = Path(folder).resolve()
    with registry.session() as s:
        rows = s.execute(select(Build.id, Build.output_path).order_by(Build.id.desc())).all()
    return next((bid for bid, out in rows if Path(out).resolve() == want), None)


def record_eval_run(registry: Registry, build_id: int, command: str, report: dict[str, Any]) -> int:
    """Store one evaluation report (composer.eval.run.run_eval) against its build."""
    with registry.session() as s:
        row = EvalRun(
            build_id=build_id,
            command=command,
            data=report["data"],
            mask=report["experts"],
            results={
                k: report.get(k) for k in ("perplexity", "opt_out_matrix", "routing", "lm_eval")
            },
            figures=report["figures"],
            wall_s=float(report["wall_s"]),
        )
        s.add(row)
        s.flush()
        return row.id


def eval_runs(registry: Registry, build_id: int) -> list[dict[str, Any]]:
    """Every eval run of a build, oldest first."""
    with registry.session() as s:
        rows = s.scalars(select(EvalRun).where(EvalRun.build_id == build_id).order_by(EvalRun.id))
        return [
            {
                "id": r.id,
                "at": r.created_at.isoformat(),
                "command": r.command,
                "data": r.data,
                "mask": r.mask,
                "results": r.results,
                "figures": r.figures,
                "wall_s": r.wall_s,
            }
            for r in rows
        ]
