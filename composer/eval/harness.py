"""lm-evaluation-harness against a served build.

lm-eval's `local-completions` model scores loglikelihood tasks through `/v1/completions` with
`echo` and `logprobs` (ENVIRONMENT.md: chat completions cannot). The expert choice travels in
the `X-Composer-Experts` header, which `composer serve` treats exactly like the body field, so
the harness measures what any client of the server gets: the same engine, masks and policy.
The server itself is started by the caller (cli/eval_cmds.py); this module only needs its URL.

Tasks come from lm-eval's own collection (where their data is available offline), from
``--include-path`` folders, and always from TASKS_DIR, which ships `composer_domains` (which
line comes next, per demo domain; no download).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from composer.eval.matrix import opt_out_rows
from registry.errors import ComposerError

TASKS_DIR = Path(__file__).parent / "lm_tasks"
# Per-task metrics worth keeping in a report (lm-eval adds stderr and aliases beside them).
_METRIC_SUFFIX = ",none"
# Prompts per /v1/completions request: one at a time, the engine idles between HTTP round trips
# (1.1 s per request on a loaded 2-core machine); a batch lets it schedule them together.
BATCH = 16


class HarnessError(ComposerError):
    """A task lm-eval does not know, or a harness run that failed."""


def header_value(choice: dict[str, Sequence[str]] | None) -> str | None:
    """The X-Composer-Experts header for a body-style choice ({"exclude": [...]} etc.)."""
    if not choice:
        return None
    if set(choice) - {"include", "exclude"} or len(choice) != 1:
        raise HarnessError('--experts: expected {"include": [...]} or {"exclude": [...]}')
    ((mode, names),) = choice.items()
    return f"{mode}={','.join(names)}"


def task_manager(include_paths: Sequence[Path]) -> Any:
    """lm-eval's TaskManager over its own tasks, TASKS_DIR and the user's folders."""
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not Path(p).is_dir():
            raise HarnessError(f"--include-path {p}: not a folder")
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)])


def check_tasks(tasks: Sequence[str], manager: Any) -> None:
    """Refuse unknown task names before any server starts, naming them."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        ours = sorted(t for t in known if t.startswith("composer_"))
        raise HarnessError(
            f"--lm-eval: unknown task(s) {', '.join(unknown)} (shipped: {', '.join(ours)}; "
            "more with --include-path DIR)"
        )


def task_files(tasks: Sequence[str], manager: Any) -> dict[str, str]:
    """sha256 of every file in the folders that define the tasks (their YAML, code and data)."""
    out: dict[str, str] = {}
    for name in tasks:
        yaml_path = getattr(manager.task_index[name], "yaml_path", None)
        if not yaml_path:
            continue
        folder = Path(yaml_path).parent
        for f in sorted(folder.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_harness(
    base_url: str,
    model: str,
    tokenizer: Path,
    tasks: Sequence[str],
    manager: Any,
    *,
    header: str | None,
    max_length: int,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """One lm-eval run through the server: {"results": {task: {metric: value}}, "samples"?}."""
    import lm_eval

    headers = {"X-Composer-Experts": header} if header else {}
    model_args = {
        "base_url": f"{base_url}/v1/completions",
        "model": model,
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "max_length": max_length,
        "num_concurrent": 2,
        "max_retries": 1,
        "header": headers or None,
    }
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes are noise here
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=model_args,
            tasks=list(tasks),
            task_manager=manager,
            batch_size=BATCH,
            limit=limit,
            log_samples=log_samples,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    except Exception as e:  # lm-eval wraps HTTP failures in generic errors
        raise HarnessError(f"lm-eval run failed ({header or 'all experts'}): {e}") from e
    if out is None:
        raise HarnessError("lm-eval returned no results")
    results = {
        task: {
            k.removesuffix(_METRIC_SUFFIX): float(v)
            for k, v in metrics.items()
            if k.endswith(_METRIC_SUFFIX) and isinstance(v, int | float)
        }
        for task, metrics in out["results"].items()
    }
    doc: dict[str, Any] = {"results": results, "n_samples": out.get("n-samples", {})}
    if log_samples:
        doc["samples"] = {t: [_sample(s) for s in ss] for t, ss in out["samples"].items()}
    return doc


def _sample(s: dict[str, Any]) -> dict[str, Any]:
    """One logged document as plain JSON: each request's context and continuation with its
    loglikelihood (and whether it was greedy), or a generation's output."""
    requests = []
    for args, resps in zip(s["arguments"], s["resps"], strict=True):
        first = resps[0] if resps else None
        if isinstance(first, list | tuple):
            ll, greedy = first
            requests.append({"context": args[0], "continuation": args[1],
                             "loglikelihood": float(ll), "greedy": bool(greedy)})  # fmt: skip
        else:
            requests.append({"context": args[0], "output": first})
    return {"doc_id": s["doc_id"], "target": str(s.get("target")), "requests": requests}


class Endpoint(Protocol):
    """A running `composer serve` (cli/local_server.py implements it)."""

    url: str
    model: str

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]: ...


def experts_granted(endpoint: Endpoint, header: str | None) -> list[str]:
    """Ask the server which experts a choice gets (a one-token request); its refusal, with the
    server's own message, is the command's error: nothing is scored with a mask it did not
    grant."""
    headers = {"X-Composer-Experts": header} if header else {}
    body = {"model": endpoint.model, "prompt": [1], "max_tokens": 1, "temperature": 0}
    status, doc = endpoint.post("/v1/completions", body, headers)
    if status != 200:
        message = doc.get("error", {}).get("message", doc) if isinstance(doc, dict) else doc
        raise HarnessError(
            f"--experts ({header or 'all experts'}): server said {status}: {message}"
        )
    return [n for n in str(doc.get("_experts_header", "")).split(",") if n]


def harness_runs(
    endpoint: Endpoint,
    tokenizer: Path,
    tasks: Sequence[str],
    manager: Any,
    choice: dict[str, Sequence[str]] | None,
    *,
    opt_out_matrix: bool,
    max_length: int,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """The harness with the chosen experts and, with ``opt_out_matrix``, once more without each
    of them (as composer.eval.matrix does for perplexity): one entry per mask."""
    header = header_value(choice)
    used = experts_granted(endpoint, header)
    masks: list[tuple[str | None, str]] = [(header, "chosen")]
    if opt_out_matrix:
        masks += [("include=" + ",".join(n for n in used if n != e), e) for e in opt_out_rows(used)]
    runs = []
    for mask, without in masks:
        granted = used if mask == header else experts_granted(endpoint, mask)
        doc = run_harness(
            endpoint.url, endpoint.model, tokenizer, tasks, manager, header=mask,
            max_length=max_length, limit=limit, log_samples=log_samples,
        )  # fmt: skip
        runs.append({"header": mask, "without": None if without == "chosen" else without,
                     "used": granted, **doc})  # fmt: skip
    return {
        "tasks": list(tasks),
        "limit": limit,
        "task_files": task_files(tasks, manager),
        "runs": runs,
    }
