"""LoRA experts on SmolLM2-135M: dense merges of the adapters vs merges into one adapter.

    .venv/bin/python bench/lora_merge.py                    # ~10 min on 2 busy CPU cores
    .venv/bin/python bench/lora_merge.py --eval-chunks 4    # quicker, noisier perplexities

Inputs: the adapters in --adapters (default /work/lora-adapters: code/, legal/, manuals/, used
when its READY file exists), else seeded random rank-16 FFN adapters on the public model (then
perplexity only shows that a merge keeps the model intact, nothing about quality). Every build
runs in its own process (`--one`), so its wall time and peak RSS are its own; the RSS is shown
with what the build added over the interpreter with torch, transformers and peft imported.
Output size is the bytes written (weights, config, tokenizer). Held-out perplexity per domain
(the demo's text, the files its experts never trained on) through
composer.train.evaluate.perplexity; an adapter is scored on the base after PeftModel's
merge_and_unload.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from composer.demo import DOMAINS  # noqa: E402  (the demo's owners' text, after sys.path)

PUBLIC = REPO / ".demo" / "avx2-refactor" / "models" / "smollm2"
if not PUBLIC.is_dir():
    PUBLIC = Path("/work/main/.demo/avx2-refactor/models/smollm2")

# label -> (parameters, output) of a merge spec over the three adapters; W = the weight list.
BUILDS = {
    "dense task_arithmetic": ("{method: task_arithmetic, weight: W}", ""),
    "dense ties (density 0.5)": ("{method: ties, density: 0.5, weight: W}", ""),
    "dense dare_ties (density 0.5)": ("{method: dare_ties, density: 0.5, weight: W}", ""),
    "lora cat": ("{combination: cat, weight: W}", "lora"),
    "lora svd (rank 16)": ("{combination: svd, rank: 16, weight: W}", "lora"),
    "lora linear": ("{combination: linear, weight: W}", "lora"),
    "lora ties_svd (density 0.5)": ("{combination: ties_svd, density: 0.5, weight: W}", "lora"),
    "lora dare_ties (density 0.5)": ("{combination: dare_ties, density: 0.5, weight: W}", "lora"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--public", type=Path, default=PUBLIC, help="the public model (read only)")
    p.add_argument("--adapters", type=Path, default=Path("/work/lora-adapters"))
    p.add_argument("--work", type=Path, default=Path("/tmp/lora-merge/bench"))
    p.add_argument("--weight", type=float, default=1.0, help="every adapter's weight")
    p.add_argument("--rank", type=int, default=16, help="rank of the random adapters")
    p.add_argument("--scale", type=float, default=0.02, help="std of the random factors")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-chunks", type=int, default=8, help="held-out chunks per domain")
    p.add_argument("--one", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_one(spec_path: str, out: str) -> None:
    """Child process: build one spec with local paths, print wall time and peak RSS as JSON."""
    import peft  # noqa: F401  (imported up front: the baseline RSS below includes them)
    import transformers  # noqa: F401

    from composer.build import build
    from composer.inputs import LocalPathResolver
    from composer.spec_load import load_spec

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    res = build(load_spec(spec_path), out, LocalPathResolver(hash_inputs=False), progress=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    doc = {"wall_s": time.perf_counter() - t0, "peak_rss": rss, "rss_before": before}
    print(json.dumps({**doc, "files": res.files}))


def adapters(a: argparse.Namespace) -> tuple[dict[str, Path], bool]:
    """(domain -> adapter folder, trained?)."""
    if (a.adapters / "READY").is_file():
        return {d: a.adapters / d for d in DOMAINS}, True
    from composer.tiny_models import make_tiny_lora

    out = {}
    for i, d in enumerate(DOMAINS):
        dest = a.work / "adapters" / d
        if not (dest / "adapter_config.json").is_file():
            log(f"random rank-{a.rank} FFN adapter '{d}' (seed {i + 1})")
            make_tiny_lora(a.public, dest, seed=i + 1, rank=a.rank, alpha=2.0 * a.rank,
                           scale=a.scale)  # fmt: skip
        out[d] = dest
    return out, False


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def run_builds(a: argparse.Namespace, inputs: dict[str, Path]) -> dict[str, dict]:
    weights = "[" + ", ".join(str(a.weight) for _ in inputs) + "]"
    experts = "\n".join(f"  - {{ref: {p}, name: {d}}}" for d, p in inputs.items())
    results = {}
    for i, (label, (params, fmt)) in enumerate(BUILDS.items()):
        out = a.work / "builds" / f"b{i}"
        shutil.rmtree(out, ignore_errors=True)
        spec = a.work / f"b{i}.yaml"
        output = "output: {format: lora}\n" if fmt else "output: {dtype: float32}\n"
        spec.write_text(
            f"method: merge\nbase: {a.public}\nexperts:\n{experts}\n"
            f"parameters: {params.replace('W', weights)}\n{output}"
        )
        proc = subprocess.run(
            [sys.executable, __file__, "--one", str(spec), str(out)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"{label}: build failed:\n{proc.stderr[-3000:]}")
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        doc.update(out=out, fmt=fmt or "checkpoint", size_mb=size_mb(out))
        doc["extra_mib"] = (doc["peak_rss"] - doc["rss_before"]) / 2**20
        log(f"{label}: {doc['wall_s']:.1f} s, peak RSS {doc['peak_rss'] / 2**20:.0f} MiB "
            f"(+{doc['extra_mib']:.0f} over imports), {doc['size_mb']:.1f} MB")  # fmt: skip
        results[label] = doc
    return results


def evaluate(a: argparse.Namespace, models: dict[str, tuple[Path, bool]]) -> dict[str, dict]:
    """label -> {domain: perplexity}; (path, is_adapter) per label."""
    import torch

    from composer.text import HFTokenizer, load_token_chunks
    from composer.train.evaluate import load_causal_lm, perplexity

    tok = HFTokenizer(a.public)
    held = {
        d: load_token_chunks(
            paths, tok, a.seq_len, max_train_chunks=1, max_heldout_chunks=a.eval_chunks
        ).heldout  # fmt: skip
        for d, paths in DOMAINS.items()
    }
    out = {}
    for label, (path, is_adapter) in models.items():
        if is_adapter:
            from peft import PeftModel

            base = load_causal_lm(a.public)
            model = PeftModel.from_pretrained(base, str(path)).merge_and_unload().eval()
        else:
            model = load_causal_lm(path)
        with torch.no_grad():
            out[label] = {d: perplexity(model, held[d], bf16=False) for d in DOMAINS}
        log(f"  {label}: " + ", ".join(f"{d} {v:.3f}" for d, v in out[label].items()))
        del model
    return out


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.one:
        build_one(*a.one)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    inputs, trained = adapters(a)
    log(f"adapters: {'trained (' + str(a.adapters) + ')' if trained else 'seeded random'}")
    builds = run_builds(a, inputs)
    models = {"public": (a.public, False)}
    models.update({f"adapter {d} alone": (p, True) for d, p in inputs.items()})
    models.update({k: (v["out"], v["fmt"] == "lora") for k, v in builds.items()})
    log("held-out perplexity")
    ppl = evaluate(a, models)
    lines = [
        "| model | output | build s | peak RSS MiB (+ over imports) | size MB | "
        + " | ".join(DOMAINS)
        + " |",
        "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in DOMAINS) + " |",
    ]
    for label, p in ppl.items():
        b = builds.get(label)
        cells = (
            [b["fmt"], f"{b['wall_s']:.1f}",
             f"{b['peak_rss'] / 2**20:.0f} (+{b['extra_mib']:.0f})", f"{b['size_mb']:.1f}"]
            if b else ["-", "-", "-", f"{size_mb(models[label][0]):.1f}"]
        )  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{p[d]:.3f}" for d in DOMAINS) + " |")  # fmt: skip
    print("\n".join(lines))
    report = {"trained_adapters": trained, "builds": {k: {x: v[x] for x in
              ("wall_s", "peak_rss", "extra_mib", "size_mb", "fmt")} for k, v in builds.items()},
              "perplexity": ppl}  # fmt: skip
    (a.work / "report.json").write_text(json.dumps(report, indent=2))
    (a.work / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
