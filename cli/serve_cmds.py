"""`composer serve BUILD_OR_PATH`: vLLM's OpenAI-compatible server with per-request expert masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from cli.errors import handles_errors
from cli.output import err_console
from registry.errors import ComposerError


def resolve_model(target: str) -> tuple[Path, str | None]:
    """(checkpoint folder, registry URL or None) for a folder path or a recorded build."""
    path, url, _ = resolve_target(target)
    return path, url


def resolve_target(target: str) -> tuple[Path, str | None, int | None]:
    """(checkpoint folder, registry URL or None, recorded build id or None) for a folder path or
    a build name / `#id`; a folder is matched to the newest build written there."""
    from registry.errors import NotInitialisedError
    from registry.eval_runs import build_for_folder
    from registry.service import RegistryService
    from registry.settings import database_url

    path = Path(target)
    if (path / "config.json").is_file():
        try:
            service = RegistryService()
        except NotInitialisedError:
            return path, None, None
        try:
            return path, database_url(), build_for_folder(service.registry, path)
        finally:
            service.close()
    try:
        service = RegistryService()
    except NotInitialisedError:
        msg = f"{target}: not a checkpoint folder, and there is no registry to find a build in"
        raise ComposerError(msg) from None
    try:
        build = service.find_build(target)
    finally:
        service.close()
    out = Path(build["output_path"])
    if not (out / "config.json").is_file():
        raise ComposerError(f"build {target!r} was written to {out}, which has no config.json")
    return out, database_url(), int(build["id"])


def serving_dtype() -> str:
    """vLLM's --dtype when the user gives none: bfloat16 only where the device computes it
    natively (vLLM's own default on CPU is bfloat16, 27x slower than float32 on AVX2-only CPUs).
    The choice is logged by composer.precision."""
    import torch

    from composer.precision import choose, dtype_name

    return dtype_name(choose("auto", "cuda" if torch.cuda.is_available() else "cpu"))


def replica_plan(replicas: int | None, ray_address: str | None, **ray_options: Any) -> Any:
    """The ReplicaPlan of `--replicas N` and its options, or None for the single server (whose
    path never imports Ray); Ray options without --replicas are refused, not ignored."""
    given = {"ray_address": ray_address, **ray_options}
    if replicas is None:
        named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if named:
            raise ComposerError(f"{', '.join(named)} only apply with --replicas N")
        return None
    from pydantic import ValidationError

    from serve.replica_plan import ReplicaPlan

    try:
        return ReplicaPlan(
            replicas=replicas, **{k: v for k, v in ray_options.items() if v is not None}
        )
    except ValidationError as e:
        error = e.errors()[0]
        where = "".join(f"--{str(part).replace('_', '-')}: " for part in error["loc"])
        raise ComposerError(where + error["msg"].removeprefix("Value error, ")) from None


@handles_errors
def serve(
    target: Annotated[
        str, typer.Argument(metavar="BUILD_OR_PATH", help="Checkpoint folder, or build name / #id.")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_keys: Annotated[
        Literal["on", "off"],
        typer.Option("--api-keys", help="on: every request needs a registry API key."),
    ] = "off",
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients use (default: the folder path).")
    ] = None,
    policy_ttl: Annotated[
        float, typer.Option(help="Seconds between background reads of the registry's policies.")
    ] = 2.0,
    policy_max_staleness: Annotated[
        float,
        typer.Option(
            help="Seconds without a good policy read after which requests get 503 (fail closed)."
        ),
    ] = 30.0,
    adapters: Annotated[
        str | None,
        typer.Option(
            help="Registered LoRA adapters to serve on the dense base BUILD_OR_PATH (a folder or "
            "a registered base), e.g. code,legal@2; a request picks one by `model` or `experts`."
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            help="Run N engine replicas on Ray Serve behind one endpoint (docs/ray.md).", min=1
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (with --replicas); default: start a local one."),
    ] = None,
    min_replicas: Annotated[
        int | None, typer.Option(help="Autoscaling lower bound (with --replicas).", min=0)
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option(help="Autoscaling upper bound (with --replicas).", min=1)
    ] = None,
    cpus_per_replica: Annotated[
        float | None,
        typer.Option(help="Ray CPUs reserved per replica (with --replicas; default 1).", min=0),
    ] = None,
    gpus_per_replica: Annotated[
        float | None,
        typer.Option(help="Ray GPUs reserved per replica (with --replicas; default 0).", min=0),
    ] = None,
    request_timeout_s: Annotated[
        float | None,
        typer.Option(
            help="Seconds after which the Ray proxy answers 408 to an unanswered request (with "
            "--replicas; default 600).",
        ),
    ] = None,
    vllm_args: Annotated[
        list[str] | None, typer.Argument(help="Extra vLLM server arguments, after `--`.")
    ] = None,
) -> None:
    """Serve a composed model behind an OpenAI-compatible endpoint.

    Each request may choose experts with `"experts": {"include": [...]}` or `{"exclude": [...]}`;
    experts whose owners opted out in the registry are never used. With --adapters, a request
    runs the base or one adapter, under the same policies.
    """
    plan = replica_plan(
        replicas, ray_address=ray_address, min_replicas=min_replicas, max_replicas=max_replicas,
        cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica,
        request_timeout_s=request_timeout_s,
    )  # fmt: skip
    if plan is not None and adapters is not None:
        raise ComposerError("--adapters with --replicas is not supported yet: serve one of them")
    adapter_set = None
    if adapters is not None:
        from serve.adapters import serve_adapters

        model_path, adapter_set, registry_url = serve_adapters(target, adapters, served_model_name)
    else:
        model_path, registry_url = resolve_model(target)
    if api_keys == "on" and registry_url is None:
        raise ComposerError("--api-keys on needs a registry (run `composer registry init`)")
    if registry_url is None:
        err_console.print("no registry: serving without data-use policies (all experts allowed)")
    extra = list(vllm_args or [])
    if not any(a == "--dtype" or a.startswith("--dtype=") for a in extra):
        extra += ["--dtype", serving_dtype()]
    err_console.print(f"serving {model_path} on http://{host}:{port}/v1")
    options: dict[str, Any] = dict(
        host=host,
        port=port,
        api_keys=api_keys == "on",
        registry_url=registry_url,
        served_model_name=served_model_name,
        policy_ttl=policy_ttl,
        policy_max_staleness=policy_max_staleness,
        extra_args=extra,
    )
    if plan is not None:
        from serve.ray_app import run_replicas  # imports ray: only here

        run_replicas(model_path, plan, ray_address=ray_address, **options)
        return
    from serve.server import run_server

    run_server(model_path, adapters=adapter_set, **options)
