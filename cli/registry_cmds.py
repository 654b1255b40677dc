"""`composer registry ...` and `composer keys ...`: parse, call registry.service, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.errors import handles_errors
from cli.output import console, err_console, print_json, print_table

registry_app = typer.Typer(help="Register and inspect experts, bases and data-use policies.")
keys_app = typer.Typer(help="API keys for the serving endpoint.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
OwnerOpt = Annotated[str, typer.Option("--owner", help="The owner making the change.")]


def _service():  # noqa: ANN202 - imported lazily to keep `--help` fast
    from registry.service import RegistryService

    return RegistryService()


@registry_app.command("init")
@handles_errors
def init(json_out: JsonOpt = False) -> None:
    """Create or upgrade the registry database to the latest schema."""
    from registry.db import upgrade
    from registry.settings import composer_home, database_url

    composer_home().mkdir(parents=True, exist_ok=True)
    rev = upgrade()
    url = database_url()
    if json_out:
        print_json({"database": _safe_url(url), "revision": rev})
    else:
        console.print(f"registry ready at {_safe_url(url)} (schema revision {rev})")


@registry_app.command("add-owner")
@handles_errors
def add_owner(name: str, json_out: JsonOpt = False) -> None:
    """Register a data owner."""
    doc = _service().add_owner(name)
    print_json(doc) if json_out else console.print(f"owner '{name}' added")


@registry_app.command("add-base")
@handles_errors
def add_base(
    path: Path,
    name: Annotated[str, typer.Option("--name", help="Registry name of the public model.")],
    json_out: JsonOpt = False,
) -> None:
    """Register a public (base) model from a Hugging Face checkpoint folder."""
    doc = _service().add_base(path, name)
    if json_out:
        print_json(doc)
    else:
        console.print(
            f"base '{name}' added: {doc['architecture']}, fingerprint {doc['fingerprint'][:12]}"
        )


@registry_app.command("add-expert")
@handles_errors
def add_expert(
    path: Path,
    name: Annotated[str, typer.Option("--name")],
    owner: OwnerOpt,
    base: Annotated[
        str, typer.Option("--base", help="The registered base it was trained against.")
    ],
    domain: Annotated[str, typer.Option("--domain")],
    version: Annotated[str | None, typer.Option("--version", help="Default: next integer.")] = None,
    kind: Annotated[str, typer.Option("--kind", help="ffn | dense | lora")] = "ffn",
    json_out: JsonOpt = False,
) -> None:
    """Register an expert (checkpoint folder or PEFT adapter folder) with its owner and domain."""
    doc = _service().add_expert(
        path, name=name, owner=owner, base=base, domain=domain, kind=kind, version=version
    )
    print_json(doc) if json_out else console.print(
        f"expert '{doc['ref']}' added ({kind}, {domain})"
    )


@registry_app.command("list")
@handles_errors
def list_(json_out: JsonOpt = False) -> None:
    """List owners, bases and expert versions."""
    doc = _service().list()
    if json_out:
        print_json(doc)
        return
    print_table("bases", doc["bases"], ["name", "architecture", "fingerprint", "size"])
    print_table(
        "experts", doc["experts"], ["ref", "owner", "domain", "kind", "policy", "base", "sha256"]
    )


@registry_app.command("show")
@handles_errors
def show(ref: str, json_out: JsonOpt = False) -> None:
    """Show one expert version (NAME or NAME@VERSION; default the latest), or a build (#ID, or a
    name no expert has) with its eval runs."""
    service = _service()
    try:
        doc = _show_build(service, ref) if ref.startswith("#") else _show_expert(service, ref)
    finally:
        service.close()
    if json_out:
        print_json(doc)
    elif "eval_runs" in doc:
        _print_build(doc)
    else:
        _print_expert(doc)


def _show_expert(service: Any, ref: str) -> dict[str, Any]:
    """The expert version, else the build of that name; an error names both lookups."""
    from registry.errors import RegistryError

    try:
        return service.show(ref)
    except RegistryError as expert_error:
        try:
            return _show_build(service, ref)
        except RegistryError:
            raise RegistryError(f"{expert_error}; no build {ref!r} either") from None


def _show_build(service: Any, ref: str) -> dict[str, Any]:
    from registry.eval_runs import eval_runs

    doc = service.find_build(ref)
    return {**doc, "eval_runs": eval_runs(service.registry, doc["id"])}


def _print_expert(doc: dict[str, Any]) -> None:
    for k in ("ref", "owner", "domain", "kind", "policy", "base", "base_fingerprint", "sha256"):
        console.print(f"[bold]{k}[/bold]: {doc[k]}")
    if lora := doc.get("lora"):
        layers = ",".join(str(i) for i in lora["layers"]) or "-"
        style = "FFN only (composable FlexOlmo-style)" if lora["only_ffn"] else "not FFN only"
        console.print(
            f"[bold]lora[/bold]: rank {lora['rank']}, alpha {lora['alpha']:g}, targets "
            f"{','.join(lora['targets'])}, layers {layers}; {style}"
        )
    print_table("files", doc["files"], ["path", "sha256", "size"])
    print_table("policy history", doc["policy_history"], ["at", "actor", "from", "to"])


def _print_build(doc: dict[str, Any]) -> None:
    for k in ("id", "name", "method", "output_path", "spec_sha256"):
        console.print(f"[bold]{k}[/bold]: {doc[k]}")
    rows = [
        {"id": r["id"], "at": r["at"], "experts": ",".join(r["mask"]["used"]),
         "perplexity": " ".join(f"{d}={p:.3f}" for d, p in r["results"]["perplexity"].items()),
         "figures": ",".join(r["figures"])}
        for r in doc["eval_runs"]
    ]  # fmt: skip
    print_table("eval runs", rows, ["id", "at", "experts", "perplexity", "figures"])


def _set_policy(ref: str, owner: str, policy: str, json_out: bool) -> None:
    docs = _service().set_policy(ref, owner=owner, policy=policy)
    if json_out:
        print_json(docs)
    else:
        for d in docs:
            console.print(f"{d['ref']}: {d['policy']}")


@registry_app.command("opt-out")
@handles_errors
def opt_out(ref: str, owner: OwnerOpt, json_out: JsonOpt = False) -> None:
    """Withdraw an expert (all versions, or NAME@VERSION) from every build and every request."""
    _set_policy(ref, owner, "opt_out", json_out)


@registry_app.command("opt-in")
@handles_errors
def opt_in(ref: str, owner: OwnerOpt, json_out: JsonOpt = False) -> None:
    """Allow an expert to be used again."""
    _set_policy(ref, owner, "opt_in", json_out)


@registry_app.command("restrict")
@handles_errors
def restrict(ref: str, owner: OwnerOpt, json_out: JsonOpt = False) -> None:
    """Allow an expert only for API keys created with --allow naming it."""
    _set_policy(ref, owner, "restricted", json_out)


@registry_app.command("verify")
@handles_errors
def verify(ref: Annotated[str | None, typer.Argument()] = None, json_out: JsonOpt = False) -> None:
    """Re-hash stored blobs; exit 1 and name the expert if any bytes changed on disk."""
    checked, problems = _service().verify(ref)
    if json_out:
        print_json({"checked_blobs": checked, "ok": not problems,
                    "problems": [p.__dict__ for p in problems]})  # fmt: skip
    else:
        for p in problems:
            err_console.print(f"[red]corrupted[/red] {p}")
        console.print(f"{checked} blobs checked, {len(problems)} problems")
    if problems:
        raise typer.Exit(1)


@keys_app.command("create")
@handles_errors
def keys_create(
    name: str,
    allow: Annotated[
        list[str] | None, typer.Option("--allow", help="An expert it may use.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create an API key; its secret is printed once and only its hash is stored."""
    doc = _service().create_key(name, allow or [])
    if json_out:
        print_json(doc)
    else:
        console.print(f"key '{name}' created; allowed experts: {', '.join(doc['allow']) or '-'}")
        console.print(f"secret (shown once): {doc['key']}")


@keys_app.command("list")
@handles_errors
def keys_list(json_out: JsonOpt = False) -> None:
    """List API keys (names and prefixes, never secrets)."""
    docs = _service().list_keys()
    columns = ["name", "prefix", "allow", "revoked_at"]
    print_json(docs) if json_out else print_table("keys", docs, columns)


@keys_app.command("revoke")
@handles_errors
def keys_revoke(name: str, json_out: JsonOpt = False) -> None:
    """Revoke an API key; running servers refuse it from their next policy refresh."""
    doc = _service().revoke_key(name)
    if json_out:
        print_json(doc)
    else:
        console.print(f"key '{name}' revoked at {doc['revoked_at']}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
