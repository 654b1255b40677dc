"""`composer sweep SWEEP.yaml`: build and score every candidate of a sweep, print the table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.build_cmds import _resolver, ray_executor
from cli.errors import handles_errors
from cli.output import console, err_console, print_json


@handles_errors
def sweep(
    sweep_path: Annotated[Path, typer.Argument(metavar="SWEEP", help="The sweep YAML.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Results folder (new or empty); default sweeps/NAME."),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="One Ray task per candidate ($RAY_ADDRESS or a new local "
            "cluster); paths must be on storage every node sees.",
        ),
    ] = False,  # fmt: skip
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", metavar="ADDR", help="The Ray cluster (implies --ray)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Build and score each candidate of a sweep; write results.json, sweep.png, best.yaml."""
    from composer.sweep.report import table, write_report
    from composer.sweep.run import run_sweep
    from composer.sweep.spec import load_sweep

    sw = load_sweep(sweep_path)
    resolver, _service = _resolver()
    out_dir = out or Path("sweeps") / sweep_path.stem
    executor = ray_executor(ray, ray_address)
    try:
        rows = run_sweep(sw, out_dir, resolver, executor, progress=not json_out)
    finally:
        if executor is not None:
            executor.close()
    summary = write_report(sw, rows, out_dir)
    if json_out:
        print_json(summary)
        return
    best = next((r for r in rows if r["label"] == summary["best"]), None)
    console.print(table(rows, sw.spec.select.metric, best), markup=False, highlight=False)
    err_console.print(
        f"results in {out_dir}: results.json, sweep.png"
        + (f", best.yaml ({summary['best']})" if best else "")
    )
