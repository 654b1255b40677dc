"""A real local Ray cluster for the tests in tests/ray, one per test file.

``ray_cluster`` (module scope) starts it with ``ray.init(num_cpus=2)`` in the test process and
returns its address (``host:port`` of the GCS), so a test can also point a ``composer``
subprocess at it (``--ray-address``). Tests in the same process simply use Ray: it is
initialised. At the end of the file it is shut down, and the fixture fails if any process
the cluster started (GCS, raylet, workers) is still running: ``make test`` leaves no Ray
processes behind. The cluster gets the settings `composer serve --replicas` gives its own
(serve/ray_app.py CLUSTER_ENV).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest

from serve.ray_app import CLUSTER_ENV

RAY_ENV = {
    # What `composer serve --replicas` sets for its own cluster: Serve's proxy timeouts, and
    # replicas and their engines at the niceness of the other xdist worker's engines rather than
    # Ray's 15 (starved, they took minutes to start).
    **CLUSTER_ENV,
    "RAY_USAGE_STATS_ENABLED": "0",
    # The raylet registers within 30 s by default; on a loaded 2-core machine it took longer.
    "RAY_raylet_start_wait_time_s": "180",
    # ... and the raylet's wait for the dashboard agent's ports (its crash under load).
    "RAY_agent_register_timeout_ms": "300000",
}


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


# Module scope: a cluster idles at about a fifth of a core (GCS, raylet, Serve's controller and
# proxy, idle workers), which the rest of a 2-core test session would pay for minutes.
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    import ray

    os.environ.update(RAY_ENV)
    os.environ.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
    if ray.is_initialized():
        ray.shutdown()
    # Only what ray.init starts is the cluster's: this worker may already hold other session
    # fixtures' processes (vLLM engines, PostgreSQL), whose own teardown comes later.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        # "local": a new cluster even when another one on this machine is the latest started.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        address = str(ray.get_runtime_context().gcs_address)
    finally:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    try:
        yield address
    finally:
        for p in _alive(started):  # and what they started since: workers, Serve replicas' engines
            started += p.children(recursive=True)
        ray.shutdown()
        deadline = time.monotonic() + 30
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(started)
        for p in left:  # leave the machine clean, then fail
            p.kill()
        assert not left, f"Ray processes left after shutdown: {[p.name() for p in left]}"
