"""`composer serve`: vLLM's OpenAI-compatible server with the experts middleware in front.

`run_server` runs in the calling process (vLLM starts its engine in a child process).
`python -m serve.server MODEL --port N` is the same, for tests and scripts. `prepare`,
`engine_env` and `vllm_argv` are shared with the Ray Serve replicas (serve/ray_app.py), so both
servers make the same start-up checks and build the same app.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from registry.errors import ComposerError
from serve.adapters import AdapterSet
from serve.middleware import ServeSettings
from serve.policy import PolicyRefresher, load_bindings

MIDDLEWARE = "serve.middleware.ExpertsMiddleware"


def vllm_argv(
    model_path: str | Path,
    *,
    host: str,
    port: int,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """Arguments for vLLM's API server: our middleware, eager mode (masks are read per step)."""
    argv = [
        "--model", str(model_path),
        "--host", host,
        "--port", str(port),
        "--middleware", MIDDLEWARE,
        "--enforce-eager",
        "--enable-prefix-caching",
    ]  # fmt: skip
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return argv + list(extra_args)


def prepare(
    model_path: str | Path,
    *,
    api_keys: bool = False,
    registry_url: str | None = None,
    policy_ttl: float = 2.0,
    policy_max_staleness: float = 30.0,
    adapters: AdapterSet | None = None,
    device_type: str | None = None,
) -> ServeSettings:
    """The middleware's settings, after the start-up checks every server makes (one or many
    replicas): a checkpoint, keys only with a registry, slots bound to the registry, a registry
    that can be read now, and the MoE backend chosen once (logged)."""
    model_path = Path(model_path).resolve()
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path} has no config.json")
    if api_keys and not registry_url:
        raise ValueError("--api-keys on needs a registry (keys live there): give registry_url")
    settings = ServeSettings(
        model_path=str(model_path),
        api_keys=api_keys,
        registry_url=registry_url,
        policy_ttl=policy_ttl,
        policy_max_staleness=policy_max_staleness,
        adapters=adapters.to_json() if adapters else None,
    )
    # Fail at start, not on the first request: slots that cannot be bound to the registry, or a
    # registry that cannot be read.
    bindings = adapters.bindings() if adapters else load_bindings(model_path, registry_url)
    if registry_url:
        refresher = PolicyRefresher.for_registry(
            registry_url, bindings, interval=policy_ttl, max_staleness=policy_max_staleness
        )
        if not refresher.refresh():
            raise ComposerError(
                f"cannot read the policy registry: {refresher.status()['last_error']}"
            )
    from serve.moe_backend import moe_backend

    backend, why = moe_backend(device_type)  # None: the device vLLM sees in this process
    settings.moe_backend = backend
    print(f"composer serve: MoE backend {backend} ({why})", file=sys.stderr, flush=True)
    return settings


def engine_env(settings: ServeSettings) -> dict[str, str]:
    """What the process that builds the app and its engine needs in its environment: the
    middleware's settings (vLLM instantiates it without arguments) and the MoE backend."""
    from serve.moe_backend import BACKEND_ENV

    env = settings.to_env()
    # Adapters are the ones named at start, from the registry's checkout: never loaded at run
    # time (vLLM's load/unload endpoints and resolvers stay off).
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "0"
    if settings.moe_backend:
        env[BACKEND_ENV] = settings.moe_backend  # the engine builds the model with this choice
    return env


def run_server(
    model_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: bool = False,
    registry_url: str | None = None,
    served_model_name: str | None = None,
    policy_ttl: float = 2.0,
    policy_max_staleness: float = 30.0,
    extra_args: Sequence[str] = (),
    adapters: AdapterSet | None = None,
) -> None:
    """Serve `model_path` until interrupted. Blocks; returns when the server stops.

    With `adapters` (serve.adapters.resolve_adapters), `model_path` is their dense base and each
    request runs the base or one adapter; the base is served as `adapters.base_name`.
    """
    settings = prepare(
        model_path,
        api_keys=api_keys,
        registry_url=registry_url,
        policy_ttl=policy_ttl,
        policy_max_staleness=policy_max_staleness,
        adapters=adapters,
    )
    if adapters:
        served_model_name = adapters.base_name
        extra_args = [*extra_args, *adapters.vllm_args()]
    os.environ.update(engine_env(settings))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint: never ask the Hub
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    argv = vllm_argv(
        settings.model_path,
        host=host,
        port=port,
        served_model_name=served_model_name,
        extra_args=extra_args,
    )
    sys.argv = ["composer-serve", *argv]
    vllm_main()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-keys", choices=["on", "off"], default="off")
    parser.add_argument("--registry-url", default=None)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--policy-ttl", type=float, default=2.0)
    parser.add_argument("--policy-max-staleness", type=float, default=30.0)
    args, extra = parser.parse_known_args(argv)
    run_server(
        args.model_path,
        host=args.host,
        port=args.port,
        api_keys=args.api_keys == "on",
        registry_url=args.registry_url,
        served_model_name=args.served_model_name,
        policy_ttl=args.policy_ttl,
        policy_max_staleness=args.policy_max_staleness,
        extra_args=extra,
    )


if __name__ == "__main__":
    main()
