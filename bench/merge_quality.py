"""Merge quality on SmolLM2-135M: held-out perplexity per domain for every merge method.

    .venv/bin/python bench/merge_quality.py            # ~20-25 min on 2 CPU cores
    .venv/bin/python bench/merge_quality.py --smoke    # tiny step counts: checks the pipeline
    .venv/bin/python bench/merge_quality.py --steps 300 --layers all --eval-chunks 64  # larger

1. SmolLM2-135M-Instruct is exported as safetensors (composer.smollm2).
2. Three FlexOlmo experts are trained against it on local text (code: the Python standard
   library; legal: licence and copyright texts; manuals: man pages), in a subset of layers.
3. Dense merges of the three experts are built through composer.merging (linear, task
   arithmetic, TIES, DARE, Expert Merging, Expert Merging++), and the FlexOlmo composition
   through the compose build.
4. MoE merging: the base is upcycled to an MoE (method upcycle), its MoE layers briefly trained
   on mixed-domain text, then reduced to half its experts by M-SMoE and by uniform averaging.
5. Held-out perplexity (files the experts never saw, split by path hash) of every model on every
   domain goes into one markdown table and a PNG bar plot under docs/.

Trained experts, the exported model and the upcycled MoE are cached in --work; builds are redone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from composer.demo import DOMAINS  # noqa: E402  (the demo's owners' text, after sys.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    work = Path(tempfile.gettempdir()) / "composer-merge-quality"
    p.add_argument("--work", type=Path, default=work, help="cache of experts and builds")
    p.add_argument("--docs", type=Path, default=REPO / "docs")
    p.add_argument("--smoke", action="store_true", help="tiny step counts (pipeline check only)")
    p.add_argument("--layers", default="every:3", help="expert / MoE layers (all, every:N, 0,3)")
    p.add_argument("--steps", type=int, default=60, help="expert training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-chunks", type=int, default=16, help="held-out chunks per domain")
    p.add_argument("--density", type=float, default=0.5, help="TIES / DARE density")
    p.add_argument("--lambda", dest="lambda_", type=float, default=1.0, help="task-vector scale")
    p.add_argument("--em-steps", type=int, default=15, help="Expert Merging steps (per stage)")
    p.add_argument("--em-tokens", type=int, default=1024, help="calibration tokens per expert")
    p.add_argument(
        "--em-curve",
        default="",
        help="extra Expert Merging rows, STEPS:TOKENS,... (e.g. 5:512,30:4096,100:8192), and a "
        "plot of the curve against DARE (TIES)",
    )
    p.add_argument("--tune-steps", type=int, default=10, help="FlexOlmo router tuning steps")
    p.add_argument(
        "--keep-builds", action="store_true", help="reuse a finished build whose spec is unchanged"
    )
    p.add_argument("--moe-experts", type=int, default=4, help="experts of the upcycled MoE")
    p.add_argument("--moe-steps", type=int, default=30, help="MoE training steps (0: untrained)")
    p.add_argument("--moe-tokens", type=int, default=2048, help="M-SMoE calibration tokens")
    p.add_argument("--no-moe", action="store_true", help="skip the M-SMoE part")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.batch_size, a.seq_len, a.eval_chunks = 3, 2, 64, 2
        a.em_steps, a.em_tokens, a.moe_steps, a.moe_tokens = 2, 128, 2, 256
        a.work = a.work.with_name(a.work.name + "-smoke")
    return a


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ inputs


def train_experts(a: argparse.Namespace, public: Path) -> dict[str, Path]:
    from composer.train.expert import train_expert

    out = {}
    for d, paths in DOMAINS.items():
        dest = a.work / "experts" / d
        if not (dest / "config.json").is_file():
            log(f"train expert {d} ({a.steps} steps, layers {a.layers})")
            res = train_expert(
                public, paths, dest, domain=d, layers=a.layers, steps=a.steps,
                seq_len=a.seq_len, batch_size=a.batch_size, seed=0, progress=False,
                max_heldout_chunks=a.eval_chunks,
            )  # fmt: skip
            log(f"  {d}: {res.train_s:.0f} s; public ppl {res.public_ppl:.2f} -> "
                f"{res.expert_ppl:.2f} (public + expert)")  # fmt: skip
        out[d] = dest
    return out


def calibration_files(a: argparse.Namespace, max_chars: int = 60_000) -> dict[str, Path]:
    """One text file per domain from *training-side* files (never the held-out ones)."""
    from composer.train.data import collect_files, is_heldout, read_document

    out = {}
    (a.work / "cal").mkdir(parents=True, exist_ok=True)
    for d, paths in DOMAINS.items():
        dest = a.work / "cal" / f"{d}.txt"
        if not dest.is_file():
            text = ""
            for f in collect_files(paths):
                if len(text) >= max_chars:
                    break
                if not is_heldout(f, 0.1):
                    text += (read_document(f) or "") + "\n"
            dest.write_text(text[:max_chars])
        out[d] = dest
    return out


def heldout_chunks(a: argparse.Namespace, public: Path) -> dict[str, torch.Tensor]:
    from composer.text import HFTokenizer, load_token_chunks

    tok = HFTokenizer(public)
    return {
        d: load_token_chunks(
            paths, tok, a.seq_len, max_train_chunks=1, max_heldout_chunks=a.eval_chunks
        ).heldout  # fmt: skip
        for d, paths in DOMAINS.items()
    }


# ------------------------------------------------------------------------------------ builds


def build_spec(a: argparse.Namespace, name: str, text: str) -> Path:
    """Write the spec into work/specs and build it."""
    from composer.build import build
    from composer.inputs import LocalPathResolver
    from composer.spec_load import load_spec

    spec_path = a.work / "specs" / f"{name}.yaml"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    out = a.work / "builds" / name
    same = spec_path.is_file() and spec_path.read_text() == text
    if a.keep_builds and same and (out / "composition.json").is_file():
        log(f"kept {name} (same spec, --keep-builds)")
        return out
    spec_path.write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    spec = load_spec(spec_path)
    resolver = LocalPathResolver(a.work, hash_inputs=False)
    t0 = time.perf_counter()
    build(spec, out, resolver, progress=False)
    log(f"built {name} in {time.perf_counter() - t0:.1f} s")
    return out


def merge_specs(a: argparse.Namespace) -> dict[str, str]:
    head = "method: merge\nbase: smollm2\nexperts: [experts/code, experts/legal, experts/manuals]\n"
    cal = "calibration: [../cal/code.txt, ../cal/legal.txt, ../cal/manuals.txt]"
    em = f"steps: {a.em_steps}, seq_len: {a.seq_len}, max_calibration_tokens: {a.em_tokens}"
    dl = f"density: {a.density}, lambda: {a.lambda_}"
    mean_lambda = f"lambda: {a.lambda_ / 3:.4f}"  # lambda times the mean task vector
    return {
        "linear": head + "parameters: {method: linear}\n",
        "task arithmetic": head + f"parameters: {{method: task_arithmetic, {mean_lambda}}}\n",
        "TIES": head + f"parameters: {{method: ties, {dl}}}\n",
        "DARE (linear)": head
        + f"parameters: {{method: dare_linear, density: {a.density}, {mean_lambda}}}\n",
        "DARE (TIES)": head + f"parameters: {{method: dare_ties, {dl}}}\n",
        "Expert Merging": head + f"parameters: {{method: expert_merging, {em}, {cal}}}\n",
        "Expert Merging++": head
        + f"parameters: {{method: expert_merging++, {em}, steps_stage2: {a.em_steps}, {cal}}}\n",
    }


def em_curve_specs(a: argparse.Namespace) -> dict[str, str]:
    """Expert Merging at each STEPS:TOKENS of --em-curve (closer to the paper's budgets)."""
    head = "method: merge\nbase: smollm2\nexperts: [experts/code, experts/legal, experts/manuals]\n"
    cal = "calibration: [../cal/code.txt, ../cal/legal.txt, ../cal/manuals.txt]"
    out = {}
    for item in filter(None, a.em_curve.split(",")):
        steps, tokens = (int(x) for x in item.split(":"))
        em = f"steps: {steps}, seq_len: {a.seq_len}, max_calibration_tokens: {tokens}"
        out[f"Expert Merging ({steps} steps, {tokens} tokens)"] = (
            head + f"parameters: {{method: expert_merging, {em}, {cal}}}\n"
        )
    return out


def tune_yaml(a: argparse.Namespace) -> str:
    proxy = "{code: ../cal/code.txt, legal: ../cal/legal.txt, manuals: ../cal/manuals.txt}"
    return f", tune: {{proxy: {proxy}, steps: {a.tune_steps}, lr: 0.01, max_chunks: 128}}"


def plot_em_curve(
    results: dict[str, dict[str, float]], path: Path, default: tuple[int, int]
) -> None:
    """Mean held-out perplexity of Expert Merging against its steps (``default``: the steps and
    tokens of the plain "Expert Merging" row), the other methods as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = {k: sum(v.values()) / len(v) for k, v in results.items()}
    points: dict[int, list[tuple[int, float]]] = {}
    if "Expert Merging" in mean:
        points.setdefault(default[1], []).append((default[0], mean["Expert Merging"]))
    for label, m in mean.items():
        if label.startswith("Expert Merging (") and "tokens)" in label:
            steps, tokens = (int(w) for w in label.split("(")[1].replace(",", "").split()[::2])
            points.setdefault(tokens, []).append((steps, m))
    fig, ax = plt.subplots(figsize=(6, 4))
    for tokens, pts in sorted(points.items()):
        pts.sort()
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], "o-", label=f"Expert Merging, {tokens} tok"
        )
    refs = ("DARE (TIES)", "TIES", "FlexOlmo composition (router tuned)", "task arithmetic")
    for ref, colour in zip(refs, ("C3", "C2", "C4", "C7"), strict=True):
        if ref in mean:
            ax.axhline(mean[ref], linestyle="--", label=ref, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("coefficient steps (per stage)")
    ax.set_ylabel("mean held-out perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layers_yaml(a: argparse.Namespace, n_layers: int) -> str:
    from router_train.layers import parse_layers

    return json.dumps(parse_layers(a.layers, n_layers))


def train_moe(
    a: argparse.Namespace, src: Path, dest: Path, public: Path, layers: list[int]
) -> Path:
    """A few AdamW steps on the MoE blocks (experts + routers) of ``layers`` of the upcycled
    model, on text of all three domains, so that the identical upcycled experts diverge. Other
    layers stay frozen: their zero-router copies must keep computing the dense FFN."""
    from transformers import AutoModelForCausalLM

    from composer.text import HFTokenizer, load_token_chunks

    if (dest / "config.json").is_file():
        return dest
    if a.moe_steps == 0:
        shutil.copytree(src, dest)
        return dest
    tok = HFTokenizer(public)
    per = max(1, a.moe_steps * a.batch_size // len(DOMAINS))
    chunks = torch.cat([
        load_token_chunks(p, tok, a.seq_len, max_train_chunks=per, max_heldout_chunks=0,
                          seed=1).train
        for p in DOMAINS.values()
    ])  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    params = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        layer = int(parts[2]) if parts[1] == "layers" and parts[2].isdigit() else None
        p.requires_grad_(layer in layers and (".mlp." in name or ".block_sparse_moe." in name))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for step in range(a.moe_steps):
        idx = torch.randint(len(chunks), (a.batch_size,), generator=gen)
        loss = model(input_ids=chunks[idx], labels=chunks[idx], use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == a.moe_steps - 1:
            log(f"  moe step {step}: loss {float(loss):.3f}")
    log(f"trained the upcycled MoE for {a.moe_steps} steps in {time.perf_counter() - t0:.0f} s")
    model.eval()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in src.iterdir():  # tokenizer files and the composition record
        if f.is_file() and not (tmp / f.name).exists():
            shutil.copyfile(f, tmp / f.name)
    tmp.rename(dest)
    return dest


# ------------------------------------------------------------------------------------ report


def evaluate(
    models: dict[str, Path], chunks: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    from composer.train.evaluate import perplexity

    out: dict[str, dict[str, float]] = {}
    for label, path in models.items():
        t0 = time.perf_counter()
        row = {d: perplexity(path, c, batch_size=4) for d, c in chunks.items()}
        row["mean"] = sum(row.values()) / len(row)
        out[label] = row
        log(f"ppl {label}: " + ", ".join(f"{d} {v:.2f}" for d, v in row.items())
            + f" ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return out


def markdown(results: dict[str, dict[str, float]], a: argparse.Namespace, cmd: str,
             notes: list[str], wall: float) -> str:  # fmt: skip
    cols = [*DOMAINS, "mean"]
    lines = [
        "# Merge quality on SmolLM2-135M (held-out perplexity, lower is better)",
        "",
        f"Made by `{cmd}` in {wall / 60:.1f} min (2 CPU cores).",
        "",
        "| model | " + " | ".join(cols) + " |",
        "| --- | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for label, row in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    settings.pop("work"), settings.pop("docs")
    lines += ["", "Settings: `" + json.dumps(settings, sort_keys=True) + "`", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    domains = list(DOMAINS)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 4.5))
    width = 0.8 / len(domains)
    for j, d in enumerate(domains):
        xs = [i + (j - (len(domains) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [results[m][d] for m in labels], width, label=d)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    cmd = ".venv/bin/python bench/merge_quality.py " + shlex.join(argv if argv is not None
                                                                  else sys.argv[1:])  # fmt: skip
    from composer.smollm2 import export_smollm2

    a.work.mkdir(parents=True, exist_ok=True)
    public = export_smollm2(a.work / "smollm2")
    n_layers = int(json.loads((public / "config.json").read_text())["num_hidden_layers"])
    experts = train_experts(a, public)
    calibration_files(a)
    chunks = heldout_chunks(a, public)
    notes = [
        "Held-out text: files whose path hash puts them in the 10 % held-out split; the experts "
        "and all calibration text come from the other 90 %.",
        f"Experts: FlexOlmo FFN experts trained {a.steps} steps in layers {a.layers} "
        "(composer.train.expert); 'expert X' rows are the dense checkpoint with X's FFN in place "
        "of the public one, which is what the dense merges combine.",
        f"Task arithmetic and DARE (linear) scale the summed task vectors by lambda/3 = "
        f"{a.lambda_ / 3:.3f} (the mean task vector times lambda: with lambda 1 task arithmetic "
        "equals the linear average exactly, as experts share the base); TIES and DARE (TIES) use "
        f"lambda {a.lambda_} with normalisation of the disjoint merge; density {a.density}.",
    ]

    models: dict[str, Path] = {"base (SmolLM2-135M)": public}
    models.update({f"expert {d}": p for d, p in experts.items()})
    for label, text in merge_specs(a).items():
        models[label] = build_spec(a, label.lower().replace(" ", "_").replace("+", "p")
                                   .replace("(", "").replace(")", ""), text)  # fmt: skip
    em_curve = em_curve_specs(a)
    for label, text in em_curve.items():
        models[label] = build_spec(a, label.split(" (")[0].lower().replace(" ", "_")
                                   + "_" + label.split("(")[1].split(" ")[0], text)  # fmt: skip
    layers = layers_yaml(a, n_layers)
    for label, tune in (("as trained", ""), ("router tuned", tune_yaml(a))):
        name = "flexolmo_" + label.replace(" ", "_")
        models[f"FlexOlmo composition ({label})"] = build_spec(a, name, (
            "method: compose\nstyle: flexolmo\nbase: smollm2\n"
            "experts: [experts/code, experts/legal, experts/manuals]\n"
            f"top_k: 2\nmoe_layers: {layers}\n"
            f"router: {{init: trained, expert_bias: true{tune}}}\n"
        ))  # fmt: skip
    notes.append(
        "FlexOlmo composition: each expert's router row and bias as its owner trained them "
        f"(as trained), then rows and biases tuned {a.tune_steps} steps (lr 0.01) on the owners' "
        "training-side calibration text (router tuned), as examples/flexmix.yaml does; scored "
        "with the router bias applied (composer.train.evaluate.load_causal_lm)."
    )
    if em_curve:
        notes.append(
            "Expert Merging curve: the same method with more coefficient steps (per stage) and "
            "calibration tokens per expert; `em_curve.png` plots mean perplexity against steps."
        )

    if not a.no_moe:
        up = a.work / "upcycled"
        if not (up / "config.json").is_file():
            spec = (
                f"method: upcycle\nbase: smollm2\nnum_experts: {a.moe_experts}\ntop_k: 2\n"
                f"moe_layers: {layers}\nrouter: {{init: random}}\nseed: 0\n"
            )
            built = build_spec(a, "upcycle", spec)
            shutil.rmtree(up, ignore_errors=True)
            shutil.move(built, up)
        moe_layers = json.loads(layers)
        trained = train_moe(a, up, a.work / "upcycled-trained", public, moe_layers)
        half = max(2, a.moe_experts // 2)
        cal = "[../cal/code.txt, ../cal/legal.txt, ../cal/manuals.txt]"
        tok = f"seq_len: {a.seq_len}, max_calibration_tokens: {a.moe_tokens}"
        label = f"upcycled MoE ({a.moe_experts} experts, trained {a.moe_steps} steps)"
        models[label] = trained
        models[f"M-SMoE -> {half} experts"] = build_spec(a, "m_smoe", (
            "method: moe_merge\nbase: upcycled-trained\n"
            f"parameters: {{method: m_smoe, num_experts: {half}, calibration: {cal}, {tok}}}\n"
        ))  # fmt: skip
        models[f"uniform -> {half} experts"] = build_spec(a, "uniform", (
            "method: moe_merge\nbase: upcycled-trained\n"
            f"parameters: {{method: uniform, num_experts: {half}}}\n"
        ))  # fmt: skip
        notes.append(
            f"MoE merging: SmolLM2 upcycled to {a.moe_experts} experts (top-2, random router) in "
            f"layers {a.layers}, then its MoE blocks trained {a.moe_steps} AdamW steps (lr 1e-4, "
            "mixed-domain text) so the copies diverge; the other layers' experts stay identical "
            "copies of the dense FFN. M-SMoE and uniform averaging both keep half the experts."
        )
    results = evaluate(models, chunks)
    wall = time.perf_counter() - t_start
    if a.smoke:
        notes.insert(0, "SMOKE RUN: tiny step counts and 2 held-out chunks per domain; the "
                     "figures check the pipeline, not the methods.")  # fmt: skip
    suffix = "_smoke" if a.smoke else ""
    a.docs.mkdir(parents=True, exist_ok=True)
    md = a.docs / f"merge_quality{suffix}.md"
    png = a.docs / f"merge_quality{suffix}.png"
    md.write_text(markdown(results, a, cmd, notes, wall) + f"\n![plot]({png.name})\n")
    plot(results, png, f"held-out perplexity per domain ({'smoke' if a.smoke else 'bench'})")
    if em_curve:
        em_png = a.docs / f"merge_quality_em_curve{suffix}.png"
        plot_em_curve(results, em_png, (a.em_steps, a.em_tokens))
    (a.work / "results.json").write_text(json.dumps(results, indent=2))
    print(md.read_text())
    log(f"wrote {md} and {png} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
