"""`composer eval TARGET --data NAME=PATH_OR_GLOB ...`: parse, open the engine, print, record."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.errors import handles_errors
from cli.output import console, err_console, print_json, print_table, stdout_to_stderr
from registry.errors import ComposerError


def _experts_arg(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ComposerError(f"--experts: not JSON ({e.msg} at character {e.pos})") from None


@handles_errors
def eval_(
    target: Annotated[
        str, typer.Argument(metavar="TARGET", help="Build name, #id, or checkpoint folder.")
    ],
    data: Annotated[
        list[str] | None,
        typer.Option("--data", help="NAME=PATH_OR_GLOB: a domain's held-out text (repeatable)."),
    ] = None,
    experts: Annotated[
        str | None,
        typer.Option(
            help='Expert choice as served: \'{"exclude": ["code"]}\' or {"include": ...}.'
        ),
    ] = None,
    opt_out_matrix: Annotated[
        bool, typer.Option("--opt-out-matrix", help="Each domain without each expert, + PNG.")
    ] = False,
    routing: Annotated[
        bool, typer.Option("--routing", help="Routing fractions, entropy, MaxVio, + PNG.")
    ] = False,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per scored chunk.")] = 128,
    max_chunks: Annotated[int, typer.Option(min=1, help="Chunks per domain at most.")] = 16,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("composer-eval"),
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            metavar="TASKS",
            help="lm-eval tasks or groups (comma-separated), scored through a `composer serve` "
            "this command starts; composer_domains ships offline.",
        ),
    ] = None,
    include_path: Annotated[
        list[Path] | None,
        typer.Option("--include-path", help="A folder of lm-eval task YAMLs (repeatable)."),
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option("--lm-eval-limit", min=1, help="Documents per task at most.")
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            metavar="URL",
            help="Run --lm-eval against this running `composer serve` instead of starting one.",
        ),
    ] = None,
    log_samples: Annotated[
        bool,
        typer.Option("--log-samples", help="Keep lm-eval's per-request loglikelihoods (--json)."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Held-out perplexity per domain through the serving engine, and lm-eval tasks through the
    server itself, with the server's masks and the registry's policies; recorded against the
    build."""
    from cli.serve_cmds import resolve_target, serving_dtype
    from composer.eval.harness import check_tasks, task_manager
    from composer.eval.run import EvalOptions, choose_experts, empty_report, prepare, run_eval
    from registry.db import Registry
    from registry.eval_runs import check_schema, record_eval_run
    from serve.offline import EngineSettings, open_engine

    if not data and not lm_eval:
        raise ComposerError("give --data NAME=PATH_OR_GLOB (perplexity) and/or --lm-eval TASKS")
    if routing and not data:
        raise ComposerError("--routing: needs --data (routing is measured on held-out text)")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    path, url, build_id = resolve_target(target)
    registry = Registry(url) if url and build_id is not None else None
    try:
        if registry is not None:
            check_schema(registry)
        choice = _experts_arg(experts)
        label = Path(target).name if (Path(target) / "config.json").is_file() else target
        options = EvalOptions(
            seq_len=seq_len, max_chunks=max_chunks, opt_out_matrix=opt_out_matrix,
            routing=routing, out_dir=out, label=label.lstrip("#"),
        )  # fmt: skip
        tasks = [t.strip() for t in (lm_eval or "").split(",") if t.strip()]
        manager = None
        if lm_eval is not None:
            if not tasks:
                raise ComposerError("--lm-eval: no task named")
            manager = task_manager(include_path or [])
            check_tasks(tasks, manager)  # before any engine starts
        if data:
            prepared = prepare(path, data, options)
            settings = EngineSettings(dtype=serving_dtype(), max_model_len=seq_len + 1)
            with stdout_to_stderr(), open_engine(path, url, settings) as engine:
                choose_experts(engine, choice)  # a refused choice fails before any scoring
                report = run_eval(engine, path, prepared, choice, options)
        else:
            report = empty_report(path, choice)
        if manager is not None:
            report["lm_eval"] = _lm_eval(
                target, path, options, tasks, manager, choice, lm_eval_limit, log_samples, server
            )
            report["experts"]["used"] = report["experts"]["used"] or report["lm_eval"]["used"]
            report["wall_s"] = report["wall_s"] + report["lm_eval"]["wall_s"]
        if registry is not None and build_id is not None:
            command = _command(target, data or [], experts, opt_out_matrix, routing, seq_len,
                               max_chunks, include_path or [], lm_eval, lm_eval_limit)  # fmt: skip
            report["run_id"] = record_eval_run(registry, build_id, command, report)
            report["build_id"] = build_id
        else:
            err_console.print(f"{target}: not a recorded build, the run is not recorded")
    finally:
        if registry is not None:
            registry.close()
    if json_out:
        print_json(report)
    else:
        _print_report(report)


def _lm_eval(
    target: str, path: Path, options: Any, tasks: list[str], manager: Any, choice: Any,
    limit: int | None, log_samples: bool, url: str | None,
) -> dict[str, Any]:  # fmt: skip
    """lm-eval through `composer serve TARGET` (started for it, or at ``url``), once per mask."""
    from cli.local_server import local_server, running_server
    from composer.eval.harness import harness_runs

    config = json.loads((path / "config.json").read_text())
    max_len = min(int(config.get("max_position_embeddings") or 2048), 4096)
    start = time.monotonic()
    if url is None:
        log = options.out_dir / f"{options.label}-serve.log"
        err_console.print(f"lm-eval: starting composer serve {target} (log: {log})")
        serving = local_server(target, options.label, log, max_len)
    else:
        serving = running_server(url)
    with serving as endpoint:
        doc = harness_runs(
            endpoint, path, tasks, manager, choice, opt_out_matrix=options.opt_out_matrix,
            max_length=max_len, limit=limit, log_samples=log_samples,
        )  # fmt: skip
    doc["used"] = doc["runs"][0]["used"]
    doc["server"] = "started" if url is None else url
    doc["wall_s"] = round(time.monotonic() - start, 3)
    return doc


def _command(
    target: str, data: list[str], experts: str | None, matrix: bool, routing: bool,
    seq_len: int, max_chunks: int, include: list[Path], lm_eval: str | None, limit: int | None,
) -> str:  # fmt: skip
    """The run as one command line (what the options were, whatever argv looked like)."""
    args = ["composer", "eval", target, *(a for d in data for a in ("--data", d))]
    args += ["--experts", experts] if experts is not None else []
    args += ["--opt-out-matrix"] if matrix else []
    args += ["--routing"] if routing else []
    args += ["--lm-eval", lm_eval] if lm_eval is not None else []
    args += [a for p in include for a in ("--include-path", str(p))]
    args += ["--lm-eval-limit", str(limit)] if limit is not None else []
    return shlex.join([*args, "--seq-len", str(seq_len), "--max-chunks", str(max_chunks)])


def _print_report(report: dict[str, Any]) -> None:
    console.print(f"experts used: {', '.join(report['experts']['used'])}")
    rows = [{"domain": d, "perplexity": f"{p:.3f}", "chunks": report["data"][d]["chunks"]}
            for d, p in report["perplexity"].items()]  # fmt: skip
    print_table("held-out perplexity", rows, ["domain", "perplexity", "chunks"])
    matrix = report["opt_out_matrix"]
    if matrix:
        rows = [
            {"without": e, **{d: f"{matrix['perplexity'][e][d]:.3f} "
                                 f"({100 * matrix['relative_change'][e][d]:+.1f} %)"
                              for d in matrix["domains"]}}
            for e in matrix["experts"]
        ]  # fmt: skip
        print_table("opt-out matrix", rows, ["without", *matrix["domains"]])
    if report["routing"]:
        for domain, layers in report["routing"]["layers"].items():
            rows = [
                {"layer": r["layer"], "entropy": f"{r['entropy']:.3f}",
                 "max_vio": f"{r['max_vio']:.3f}",
                 **{n: f"{f:.3f}" for n, f in r["fractions"].items()}}
                for r in layers
            ]  # fmt: skip
            names = list(layers[0]["fractions"]) if layers else []
            print_table(f"routing: {domain}", rows, ["layer", "entropy", "max_vio", *names])
    for run in (report.get("lm_eval") or {}).get("runs", []):
        title = "lm-eval" + (f" without {run['without']}" if run["without"] else "")
        rows = [{"task": t, **{k: f"{v:.4f}" for k, v in m.items()}}
                for t, m in run["results"].items()]  # fmt: skip
        metrics = sorted({k for r in run["results"].values() for k in r})
        print_table(f"{title} ({','.join(run['used'])})", rows, ["task", *metrics])
    for name, fig in report["figures"].items():
        console.print(f"{name}: {fig['path']}")
    if "run_id" in report:
        console.print(f"recorded as eval run {report['run_id']} of build #{report['build_id']}")
