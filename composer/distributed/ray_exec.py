"""Build jobs as Ray tasks: the Ray implementation of composer.tensor_jobs.TensorExecutor.

Each job (a few names, paths and parameters) becomes one task. The task opens the input
checkpoints by path (every node must see the same paths: shared storage), runs the job's
function, the same one local builds run, and returns its tensors through the object store; the
driver takes the results in job order and writes them (the writer stays on the driver, so the
shard layout and bytes are those of a local build). At most ``window`` tasks are in flight, so
the driver holds at most that many results that it has not written yet.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from composer.checkpoint import Checkpoint
from composer.tensor_jobs import JobFn
from registry.errors import ComposerError

# Input checkpoints a worker process keeps open between tasks (their shards' file handles).
_OPEN_LIMIT = 8
_open: dict[str, Checkpoint] = {}


class RayError(ComposerError):
    """No Ray cluster at the address given, or Ray is not installed."""


def _open_checkpoint(path: str | Path) -> Checkpoint:
    """The worker process's open checkpoint of ``path`` (kept for the next task)."""
    key = str(path)
    ck = _open.pop(key, None)
    if ck is None:
        ck = Checkpoint(Path(key))
        while len(_open) >= _OPEN_LIMIT:
            _open.pop(next(iter(_open))).close()
    _open[key] = ck  # most recently used last
    return ck


def _run_job(fn: JobFn, job: Any) -> Any:
    """What one task runs: one torch thread, as the local dense merge's workers use (a task
    takes one CPU; intra-op threads would only contend with the node's other tasks)."""
    torch.set_num_threads(1)
    return fn(job, _open_checkpoint)


def result_bytes(result: Any) -> int:
    """Tensor bytes inside a job's result (what comes back through the object store)."""
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, dict):
        return sum(result_bytes(v) for v in result.values())
    if isinstance(result, list | tuple):
        return sum(result_bytes(v) for v in result)
    return 0


@dataclass
class RayStats:
    tasks: int = 0
    bytes_returned: int = 0  # tensor bytes the driver fetched from the object store


class RayExecutor:
    """Runs jobs as Ray tasks on the cluster at ``address``.

    ``address`` None: RAY_ADDRESS if set, else the cluster last started on this machine with
    ``ray start``, else a new local cluster that ``close`` stops (Ray's own rules). A process
    already connected (``ray.is_initialized()``) keeps its connection.
    """

    remote = True

    def __init__(self, address: str | None = None, *, window: int | None = None) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is a dependency
            raise RayError("--ray: the ray package is not installed") from None
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            addr = address or os.environ.get("RAY_ADDRESS") or None
            try:
                ray.init(address=addr, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = addr or "(a new local cluster)"
                raise RayError(f"--ray {where}: cannot connect to a Ray cluster: {e}") from None
            self._owns = addr is None
        self.address = str(ray.get_runtime_context().gcs_address)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = window or max(2, 2 * cpus)
        self.stats = RayStats()
        self._task = ray.remote(num_cpus=1, max_retries=0)(_run_job)

    def map(
        self,
        fn: JobFn,
        jobs: Iterable[Any],
        inputs: Mapping[str, Checkpoint] | None = None,
        *,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """Submit up to ``window`` tasks ahead and yield results in job order (``inputs``, the
        driver's open checkpoints, are of no use to other processes and are ignored)."""
        ray = self._ray
        fn_ref = ray.put(fn)
        pending: deque[Any] = deque()
        it = iter(jobs)
        try:
            while True:
                while len(pending) < self.window:
                    job = next(it, _END)
                    if job is _END:
                        break
                    pending.append(self._task.remote(fn_ref, job))
                    self.stats.tasks += 1
                if not pending:
                    return
                ref = pending.popleft()
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    # The task's own exception (a BuildError stays a BuildError: exit 2).
                    cause = getattr(exc, "cause", None)
                    err = cause if isinstance(cause, Exception) else exc
                    if not return_exceptions:
                        raise err from None
                    yield err
                    continue
                self.stats.bytes_returned += result_bytes(result)
                del ref
                yield result
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        """Stop the cluster if this executor started it."""
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns = False


_END = object()
