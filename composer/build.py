"""The build lifecycle, once for every method: plan, then execute into a temporary folder beside
the output, then rename it into place. Any error or Ctrl-C removes the temporary folder.

Methods are dispatched through one table, the way vLLM maps architectures to model classes:
``spec.method`` -> (planner, executor). Adding a method is adding its package under composer/
(a planner returning a ``composer.plan.BuildPlan`` and an executor returning a
``composer.plan.Written``) and one row in ``BUILD_METHODS``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.compose.execute import execute as execute_compose
from composer.compose.plan import make_plan
from composer.errors import PlanError
from composer.inputs import ResolvedInput, Resolver
from composer.manifest import write_manifest
from composer.merging.execute import execute as execute_merge
from composer.merging.plan import plan_merge
from composer.plan import BuildPlan, Written
from composer.spec import Spec
from composer.tensor_jobs import TensorExecutor
from composer.writer import TOKENIZER_FILES, atomic_dir, new_output_path, peak_rss
from registry.composition import COMPOSITION_FILE


@dataclass(frozen=True)
class BuildMethod:
    plan: Callable[[Spec, Resolver], Any]  # -> a BuildPlan; reads no weights
    # (plan, tmp, seed, progress, executor): the executor runs the tensor work (tensor_jobs)
    execute: Callable[[Any, Path, int, bool, TensorExecutor | None], Written]


# spec.method -> how it is planned and executed.
BUILD_METHODS: dict[str, BuildMethod] = {
    "upcycle": BuildMethod(make_plan, execute_compose),
    "compose": BuildMethod(make_plan, execute_compose),
    "merge": BuildMethod(plan_merge, execute_merge),
    "moe_merge": BuildMethod(plan_merge, execute_merge),
}


@dataclass
class BuildResult:
    out_dir: Path
    spec_sha256: str
    files: dict[str, str]  # output file name -> sha256
    wall_s: float
    peak_rss_bytes: int
    inputs: list[ResolvedInput] = field(default_factory=list)
    plan: BuildPlan | None = None


def method_of(spec: Spec) -> BuildMethod:
    try:
        return BUILD_METHODS[spec.method]
    except KeyError:  # the spec schema admits only table methods; keep the error readable
        raise PlanError(
            f"{spec.where('method')}: no build method {spec.method!r}; known: "
            + ", ".join(BUILD_METHODS)
        ) from None


def plan_for(spec: Spec, resolver: Resolver) -> Any:
    """The plan of any spec (what ``composer build --check`` prints)."""
    return method_of(spec).plan(spec, resolver)


def build(
    spec: Spec,
    out_dir: str | Path,
    resolver: Resolver,
    *,
    seed: int | None = None,
    progress: bool = True,
    executor: TensorExecutor | None = None,
) -> BuildResult:
    """Build ``spec`` into ``out_dir`` (which must not exist) atomically; ``executor`` (e.g.
    composer.distributed.ray_exec.RayExecutor) runs the per-tensor and per-layer work, the
    default runs it here. Either way the files are the same bytes."""
    t0 = time.perf_counter()
    method = method_of(spec)
    out = new_output_path(out_dir)
    plan = method.plan(spec, resolver)
    seed = spec.seed if seed is None else seed
    with atomic_dir(out) as tmp:
        copy_tokenizer(plan.base.path, tmp)
        written = method.execute(plan, tmp, seed, progress, executor)
        write_manifest(tmp / COMPOSITION_FILE, written.manifest)
    return BuildResult(
        out_dir=out,
        spec_sha256=spec.sha256(),
        files=written.files,
        wall_s=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss(),
        inputs=[plan.base, *plan.experts],
        plan=plan,
    )


def copy_tokenizer(base_dir: Path, out: Path) -> None:
    """The base's tokenizer files, byte for byte (router tuning reads them from the output)."""
    for name in TOKENIZER_FILES:
        src = base_dir / name
        if src.is_file():
            shutil.copyfile(src, out / name)
