"""`composer serve --replicas N`: the single server's app, N times, as one Ray Serve application.

Each replica is a Ray actor that builds exactly the app `composer serve` runs: vLLM's OpenAI app
from the same arguments (`serve.server.vllm_argv`, hence `--middleware
serve.middleware.ExpertsMiddleware`), over an AsyncLLM whose engine core runs in a child process
of the actor (vLLM refuses its own Ray executor on CPU; the replica never needs it). Ray Serve's
HTTP proxy is the one endpoint: it only routes, so every request meets the same middleware
(fields, keys, policy, masks, cache salt, error codes) as on the single server.

Policy is refreshed per replica, by the middleware's own refresher: every replica reads the
registry every `policy_ttl` seconds, so an opt-out reaches all of them within one interval, and
a replica that cannot read fails closed (503) by itself. No mask crosses a process boundary that
a client could reach. Ray is imported only here, and only `--replicas` imports this module.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve as ray_serve

from registry.errors import ComposerError
from serve.middleware import ASGIApp, Receive, Scope, Send
from serve.replica_plan import ReplicaPlan
from serve.server import engine_env, prepare, vllm_argv

APP_NAME = "composer"
REPLICA_HEADER = b"x-composer-replica"
PROXY_START_ATTEMPTS = 3  # `serve.start` calls (each waits up to 60 s for the proxy)
# Settings of a cluster that serves; they reach Ray only through the environment of the process
# that starts the cluster (`ray start`, or this command's own local cluster). On a busy 2-core
# machine Serve's HTTP proxy misses its default 5 s readiness check and is killed. And Ray runs
# its workers at niceness 15, so replicas, their engines and the proxy would get a few percent of
# a core beside any ordinary process on the node (measured: 3 % each beside three busy
# processes; docs/ray.md).
CLUSTER_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_worker_niceness": "0",
}


def parse_vllm_args(argv: Sequence[str]) -> Any:
    """vLLM's own parsing and checks of its server arguments (the single server's path)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="composer serve"))
    args = parser.parse_args(list(argv))
    validate_parsed_serve_args(args)
    return args


class _ReplicaTag:
    """Names the replica that answered (`x-composer-replica`), for operators and tests."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER, self.replica)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged)


@ray_serve.ingress()
class ComposerReplica:
    """One replica: the single server's app and its engine, inside a Ray actor."""

    async def __init__(self, env: dict[str, str], argv: list[str]) -> None:
        # What the single server sets before vLLM starts: the middleware's settings and the MoE
        # backend, read by this process and inherited by the engine process it spawns.
        os.environ.update(env)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # vLLM loads general plugins in the processes it starts; this one it did not start.
        from serve.vllm_plugin import register

        register()
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        from vllm.entrypoints.launchers.app import build_app

        args = parse_vllm_args(argv)
        self._engine_cm = contextlib.AsyncExitStack()
        engine = await self._engine_cm.enter_async_context(build_async_engine_client(args))
        self.engine = engine
        tasks = await engine.get_supported_tasks()
        app = build_app(args, tasks, engine.model_config)
        await init_app_state(engine, app.state, args, tasks)
        replica = ray_serve.get_replica_context().replica_id.unique_id
        self._app = _ReplicaTag(app, replica)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self._app

    async def check_health(self) -> None:
        """Serve replaces a replica whose engine died (EngineDeadError here)."""
        await self.engine.check_health()

    async def __del__(self) -> None:
        if hasattr(self, "_engine_cm"):
            await self._engine_cm.aclose()  # shuts the engine process down


def run_replicas(
    model_path: str | Path,
    plan: ReplicaPlan,
    *,
    ray_address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: bool = False,
    registry_url: str | None = None,
    served_model_name: str | None = None,
    policy_ttl: float = 2.0,
    policy_max_staleness: float = 30.0,
    extra_args: Sequence[str] = (),
) -> None:
    """Serve `model_path` with `plan`'s replicas until SIGINT/SIGTERM. Blocks.

    Without `ray_address` a local cluster is started and torn down with the command; with one,
    the application is added to that cluster and deleted from it on exit (the cluster and its
    Serve instance stay).
    """
    settings = prepare(
        model_path,
        api_keys=api_keys,
        registry_url=registry_url,
        policy_ttl=policy_ttl,
        policy_max_staleness=policy_max_staleness,
        device_type="cuda" if plan.gpus_per_replica else None,
    )
    argv = vllm_argv(
        settings.model_path,
        host=host,
        port=port,
        served_model_name=served_model_name,
        extra_args=extra_args,
    )
    try:
        parse_vllm_args(argv)  # a bad vLLM argument fails here once, not in every replica
    except SystemExit as e:
        raise ComposerError(f"invalid vLLM server arguments: {' '.join(extra_args)}") from e
    import ray

    own = ray_address is None
    for name, value in CLUSTER_ENV.items():
        os.environ.setdefault(name, value)
    _stop_on_signals()  # from here on, a stop always cleans up
    deployed = False
    try:
        if own:
            wanted = math.ceil(plan.highest * plan.cpus_per_replica)
            ray.init(  # "local": a new cluster, even when another one runs on this machine
                address="local", num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=False
            )
        else:
            ray.init(address=ray_address)
        _stop_on_signals()  # Ray installs its own SIGTERM handler, which would abort the process
        _start_serve(plan.http_options(host, port))
        if APP_NAME in ray_serve.status().applications:
            raise ComposerError(
                f"Ray cluster {ray_address} already runs a `{APP_NAME}` application: Serve has "
                f"one HTTP endpoint per cluster, so one composer server per cluster"
            )
        app = ray_serve.deployment(ComposerReplica).options(**plan.deployment_options())
        deployed = True
        try:
            ray_serve.run(app.bind(engine_env(settings), argv), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise ComposerError(f"the replicas did not start: {str(e).splitlines()[0]}") from e
        _stop_on_signals()
        _wait_for_proxy(host, port)
        print(
            f"composer serve: {plan.replicas} replicas of {settings.model_path} on "
            f"http://{host}:{port}/v1 (Ray {ray.get_runtime_context().gcs_address})",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if deployed:
            with contextlib.suppress(Exception):
                ray_serve.delete(APP_NAME)
        if own:
            with contextlib.suppress(Exception):
                ray_serve.shutdown()
        ray.shutdown()


def _start_serve(http_options: dict[str, Any]) -> None:
    """Start Serve (controller and HTTP proxy) or join the cluster's running one.

    `serve.start` waits a fixed 60 s for the proxy and then raises, while on a busy machine the
    proxy takes longer (docs/ray.md). The controller and the proxy go on starting after that
    error, and the next `serve.start` joins that controller at once; `_wait_for_proxy` then
    waits for the proxy itself.
    """
    for attempt in range(1, PROXY_START_ATTEMPTS + 1):
        try:
            ray_serve.start(http_options=http_options)
            break
        except TimeoutError as e:
            if attempt == PROXY_START_ATTEMPTS:
                raise ComposerError(
                    f"Ray Serve's HTTP proxy did not start within {attempt} minutes"
                ) from e
            print(
                f"composer serve: Ray Serve's HTTP proxy is still starting ({attempt} min)",
                file=sys.stderr,
                flush=True,
            )
    _check_running_options(http_options)


def _check_running_options(wanted: dict[str, Any]) -> None:
    """Refuse a cluster whose Serve already runs with other proxy options: Serve keeps the first
    ones and only logs a warning, so this command would announce the wrong endpoint, or a request
    timeout the proxy does not apply."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    differ = {k: getattr(running, k) for k, v in wanted.items() if getattr(running, k) != v}
    if differ:
        have = ", ".join(f"{k}={v!r}" for k, v in differ.items())
        asked = ", ".join(f"{k}={wanted[k]!r}" for k in differ)
        raise ComposerError(
            f"this Ray cluster's Serve already runs with {have}, not {asked}: pass those options "
            f"to composer serve, or restart Serve on the cluster (`serve shutdown`)"
        )


def _wait_for_proxy(host: str, port: int, timeout: float = 600.0) -> None:
    """Until Serve's proxy answers its health route: the endpoint is up before it is announced."""
    import httpx

    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{local}:{port}/-/healthz"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ComposerError(f"Ray Serve's HTTP proxy does not answer on {url}")
        time.sleep(1)


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread: the command deletes its
    application (and stops its own cluster) and exits 0."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
