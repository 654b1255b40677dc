"""`composer build SPEC`: validate, plan and build a composition; record it in the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.errors import handles_errors
from cli.output import console, err_console, print_json


def _resolver() -> tuple[Any, Any]:
    """The registry resolver when a registry exists, else checkpoint folders only (whose
    errors say where the registry was looked for). A missing SQLite file is not created."""
    from composer.registry_resolver import NoRegistryResolver, RegistryResolver
    from registry.errors import NotInitialisedError
    from registry.service import RegistryService
    from registry.settings import composer_home, database_url, sqlite_path

    url = database_url()
    where = f"COMPOSER_HOME={composer_home()}"
    db_file = sqlite_path(url)
    if db_file is not None and not db_file.is_file():
        return NoRegistryResolver(f"no registry database at {db_file} ({where})"), None
    try:
        service = RegistryService()
    except NotInitialisedError as e:
        return NoRegistryResolver(f"{e} ({where})"), None
    return RegistryResolver(service), service


@handles_errors
def build(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="The YAML composition spec.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder (must not exist).")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Validate the spec, resolve every input and print the plan; reads no weights "
            "and writes nothing. Inputs must exist: registry names in the registry of "
            "$COMPOSER_HOME (or $COMPOSER_DATABASE_URL), paths as checkpoint folders, and "
            "any calibration or proxy files the spec names.",
        ),
    ] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Overrides the spec's seed.")] = None,
    record: Annotated[bool, typer.Option(help="Record the build in the registry.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run the per-tensor / per-layer work as Ray tasks: on the cluster at "
            "$RAY_ADDRESS, else on a new local one (stopped at the end). Inputs and output must "
            "be on storage every node sees. Same bytes as a local build (docs/ray.md).",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", metavar="ADDR", help="The Ray cluster (implies --ray)."),
    ] = None,
) -> None:
    """Build a standard Hugging Face checkpoint from a composition spec."""
    from composer.build import build as run_build
    from composer.build import plan_for
    from composer.spec_load import load_spec

    spec = load_spec(spec_path)
    resolver, service = _resolver()
    if check:
        plan = plan_for(spec, resolver)
        if json_out:
            print_json({"ok": True, "plan": str(plan).splitlines()})
        else:
            console.print(str(plan), markup=False, highlight=False)
        return
    out_dir = out or Path("out") / (spec.name or spec_path.stem)
    executor = ray_executor(ray, ray_address)
    try:
        result = run_build(
            spec, out_dir, resolver, seed=seed, progress=not json_out, executor=executor
        )
    finally:
        if executor is not None:
            executor.close()
    build_id = None
    if record and service is not None:
        build_id = service.record_build(
            name=spec.name,
            spec_sha256=result.spec_sha256,
            spec=spec.model_dump(mode="json"),
            method=result.plan.method if result.plan else spec.method,
            output_path=str(result.out_dir),
            inputs=[_input_doc(i) for i in result.inputs],
            outputs=result.files,
            metrics={},
            wall_s=result.wall_s,
            peak_rss_bytes=result.peak_rss_bytes,
        )
    doc: dict[str, Any] = {
        "build_id": build_id,
        "out_dir": str(result.out_dir),
        "spec_sha256": result.spec_sha256,
        "files": result.files,
        "wall_s": round(result.wall_s, 3),
        "peak_rss_bytes": result.peak_rss_bytes,
    }
    if executor is not None:
        doc["ray"] = {"address": executor.address, **vars(executor.stats)}
    if json_out:
        print_json(doc)
    else:
        err_console.print(
            f"built {result.out_dir} in {result.wall_s:.1f} s "
            f"(peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB)"
            + (f"; registry build #{build_id}" if build_id else "")
        )


def ray_executor(ray: bool, address: str | None) -> Any:
    """A RayExecutor when ``--ray`` / ``--ray-address`` ask for one (ray imported only then)."""
    if not ray and not address:
        return None
    from composer.distributed.ray_exec import RayExecutor

    return RayExecutor(address)


def _input_doc(i: Any) -> dict[str, Any]:
    keys = ("ref", "name", "kind", "registry_id", "version", "sha256", "owner", "policy", "domain")
    return {k: getattr(i, k) for k in keys}
