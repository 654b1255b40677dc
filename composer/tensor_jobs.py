"""The one seam between a build's executors and where their tensor work runs.

An executor (compose, moe_merge, the dense merges on Ray, a sweep) describes its work as a list
of small picklable jobs (names, paths, parameters; never weights) and a module-level function
``fn(job, open_checkpoint) -> result``. A ``TensorExecutor`` maps the function over the jobs and
yields the results in job order, so the writer on the driver sees tensors in the fixed order that
byte identity depends on (composer/writer.py).

``LocalExecutor`` runs the jobs here, one after the other, on the checkpoints the build already
opened. ``composer.distributed.ray_exec.RayExecutor`` runs them as Ray tasks that open the same
paths on whichever node they land (shared storage), and returns the tensors through the object
store. The functions are the same, so the bytes are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from composer.checkpoint import Checkpoint

J = TypeVar("J")
R = TypeVar("R")
# path of an input checkpoint folder -> that checkpoint, open for reading
OpenCheckpoint = Callable[[str | Path], Checkpoint]
JobFn = Callable[[Any, OpenCheckpoint], Any]


class TensorExecutor(Protocol):
    """Maps ``fn(job, open_checkpoint)`` over jobs; results come back in job order."""

    remote: bool  # True when jobs run in other processes (then whole tensors are returned)

    def map(
        self,
        fn: JobFn,
        jobs: Iterable[Any],
        inputs: Mapping[str, Checkpoint] | None = None,
        *,
        return_exceptions: bool = False,
    ) -> Iterator[Any]: ...


class LocalExecutor:
    """Runs jobs in this process, in order, on checkpoints the caller has open (``inputs``,
    keyed by ``str(path)``); a path not among them is opened for the call and closed after."""

    remote = False

    def map(
        self,
        fn: JobFn,
        jobs: Iterable[Any],
        inputs: Mapping[str, Checkpoint] | None = None,
        *,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        opened: dict[str, Checkpoint] = {}

        def open_checkpoint(path: str | Path) -> Checkpoint:
            key = str(path)
            if inputs is not None and key in inputs:
                return inputs[key]
            if key not in opened:
                opened[key] = Checkpoint(Path(key))
            return opened[key]

        try:
            for job in jobs:
                try:
                    yield fn(job, open_checkpoint)
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    yield exc
        finally:
            for ck in opened.values():
                ck.close()


def inputs_by_path(*checkpoints: Checkpoint) -> dict[str, Checkpoint]:
    """Open checkpoints keyed as jobs name them (``str(ck.path)``)."""
    return {str(ck.path): ck for ck in checkpoints}
