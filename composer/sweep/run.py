"""Run a sweep: plan every candidate on the driver, then build and score each one as a job of a
composer.tensor_jobs executor (a Ray task each with ``--ray``, else one after the other here).

The driver parses and plans each candidate (no weights read): a value the spec or the method
rejects, an input that does not resolve or whose owner opted out, fails that candidate only.
Planning also records how every reference resolved, and the job replays exactly that
(``FixedResolver``), so a task needs no registry connection, only the paths (shared storage).
A job builds into OUT/candidates/<label> and scores held-out perplexity per domain in
transformers (composer.eval.data for files and chunks, composer.train.evaluate for the
figure); any exception becomes that candidate's error, never the sweep's.
"""

from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from composer.build import build, plan_for
from composer.eval.data import Domain, domain_chunks, parse_data_args
from composer.inputs import ResolvedInput, ResolveError, Resolver
from composer.progress import bar
from composer.spec_load import parse_spec
from composer.sweep.spec import Sweep, SweepError
from composer.tensor_jobs import LocalExecutor, OpenCheckpoint, TensorExecutor
from registry.errors import ComposerError

Role = Literal["base", "expert"]


class RecordingResolver:
    """The driver's resolver, remembering every answer (what the job replays)."""

    def __init__(self, inner: Resolver) -> None:
        self.inner = inner
        self.seen: dict[tuple[str, str], ResolvedInput] = {}

    def resolve(self, ref: str, *, role: Role) -> ResolvedInput:
        r = self.inner.resolve(ref, role=role)
        self.seen[(ref, role)] = r
        return r


class FixedResolver:
    """Answers only what the driver resolved (a task never consults a registry)."""

    def __init__(self, seen: dict[tuple[str, str], ResolvedInput]) -> None:
        self.seen = dict(seen)

    def resolve(self, ref: str, *, role: Role) -> ResolvedInput:
        try:
            return self.seen[(ref, role)]
        except KeyError:
            raise ResolveError(f"{ref}: not resolved when the sweep was planned") from None


@dataclass(frozen=True)
class CandidateJob:
    label: str
    spec_text: str
    spec_path: str  # the base spec (relative paths in the candidate resolve against it)
    resolved: dict[tuple[str, str], ResolvedInput]
    out: str
    domains: tuple[Domain, ...]
    seq_len: int
    max_chunks: int


def run_candidate(job: CandidateJob, _open: OpenCheckpoint) -> dict[str, Any]:
    """Build one candidate and score it; never raises (the error is the result)."""
    t0 = time.perf_counter()
    try:
        from composer.text import checkpoint_tokenizer
        from composer.train.evaluate import load_causal_lm, perplexity

        spec = parse_spec(job.spec_text, job.spec_path)
        result = build(spec, job.out, FixedResolver(job.resolved), progress=False)
        t1 = time.perf_counter()
        model = load_causal_lm(result.out_dir)
        vocab = int(model.config.vocab_size)
        tok = checkpoint_tokenizer(result.out_dir, vocab)
        ppl = {
            d.name: perplexity(model, domain_chunks(d, tok, job.seq_len, job.max_chunks))
            for d in job.domains
        }
        return {
            "ok": True,
            "perplexity": ppl,
            "mean_perplexity": statistics.fmean(ppl.values()),
            "build_s": round(t1 - t0, 3),
            "eval_s": round(time.perf_counter() - t1, 3),
            "out_dir": str(result.out_dir),
        }
    except Exception as e:  # a failed candidate is reported, not fatal
        msg = str(e) if isinstance(e, ComposerError) else f"{type(e).__name__}: {e}"
        return {"ok": False, "error": msg, "traceback": traceback.format_exc(limit=5)}


def plan_candidates(
    sweep: Sweep, out: Path, resolver: Resolver
) -> tuple[list[CandidateJob], dict[str, dict[str, Any]]]:
    """Jobs for the candidates that plan, and the errors of those that do not (by label)."""
    data = [
        f"{name}={pat}"
        for name, pats in sweep.spec.eval.data.items()
        for pat in ([pats] if isinstance(pats, str) else pats)
    ]
    try:
        domains = tuple(parse_data_args([_relative(sweep.path, d) for d in data]))
    except ComposerError as e:
        raise SweepError(f"{sweep.path}: eval.data: {e}") from None
    jobs, failed = [], {}
    for c in sweep.candidates:
        rec = RecordingResolver(resolver)
        try:
            spec = parse_spec(c.spec_text, sweep.base_path)
            plan_for(spec, rec)
        except ComposerError as e:
            failed[c.label] = {"ok": False, "error": _strip_spec_where(str(e), sweep.base_path)}
            continue
        ev = sweep.spec.eval
        jobs.append(
            CandidateJob(c.label, c.spec_text, str(sweep.base_path), rec.seen,
                         str(out / "candidates" / c.label), domains, ev.seq_len, ev.max_chunks)
        )  # fmt: skip
    return jobs, failed


def _relative(sweep_path: Path, arg: str) -> str:
    """NAME=PATH with PATH relative to the sweep file's folder."""
    name, _, pattern = arg.partition("=")
    p = Path(pattern).expanduser()
    return f"{name}={p if p.is_absolute() else sweep_path.parent.resolve() / p}"


def _strip_spec_where(msg: str, base_path: Path) -> str:
    """A candidate's spec error without the base spec's file:line (its lines are not the
    candidate's): the field and the problem."""
    prefix = str(base_path)
    if msg.startswith(prefix):
        rest = msg[len(prefix) :].lstrip(":0123456789")
        return rest.lstrip(": ").strip()
    return msg


def run_sweep(
    sweep: Sweep,
    out: Path,
    resolver: Resolver,
    executor: TensorExecutor | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every candidate's row (label, overrides, ok, perplexity or error), in sweep order."""
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"--out {out}: exists and is not empty")
    jobs, failed = plan_candidates(sweep, out, resolver)
    (out / "candidates").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = dict(failed)
    run = (executor or LocalExecutor()).map(run_candidate, jobs, return_exceptions=True)
    with bar(len(sweep.candidates), "sweep", progress, unit="candidate") as b:
        b.update(len(failed))
        for job, r in zip(jobs, run, strict=True):
            if isinstance(r, BaseException):  # the task itself died (worker lost, OOM)
                r = {"ok": False, "error": f"{type(r).__name__}: {r}"}
            results[job.label] = r
            b.update(1)
    return [
        {"label": c.label, "overrides": c.overrides, **results[c.label]} for c in sweep.candidates
    ]
