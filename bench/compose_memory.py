"""Memory benchmark: compose four SmolLM2-sized models (FlexOlmo style) and report peak RSS.

    .venv/bin/python bench/compose_memory.py [--workdir DIR] [--dtype float32]

Writes a random public model (SmolLM2-135M shapes: hidden 576, 30 layers, 9 heads, 3 KV heads,
FFN 1536, vocab 49152) and three FFN experts of it once into DIR, then builds the composition in
a fresh child process and prints wall time and peak RSS above the child's baseline (interpreter
with torch and composer imported), as a fraction of the summed input size. Target: < 0.25.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2 = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}
EXPERTS = ("code", "legal", "manuals")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(root: Path) -> None:
    """Public model + three experts in the shared FlexOlmo expert format (once)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from composer.tiny_models import perturb_ffn

    if (root / "done").is_file():
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    model.save_pretrained(root / "public")
    del model
    for k, name in enumerate(EXPERTS):
        out = perturb_ffn(root / "public", root / name, seed=k + 1)
        gen = torch.Generator().manual_seed(100 + k)
        tensors = {}
        for i in range(SMOLLM2["num_hidden_layers"]):
            tensors[f"model.layers.{i}.domain_embedding"] = torch.randn(576, generator=gen)
            tensors[f"model.layers.{i}.router_row"] = torch.randn(576, generator=gen)
            tensors[f"model.layers.{i}.router_bias"] = torch.tensor(-1.0)
        meta = {"composer_format": "flexolmo-expert/1", "domain": name, "layers": "all"}
        save_file(tensors, out / "composer_expert.safetensors", metadata=meta)
    (root / "done").write_text("ok\n")


def child(root: Path, out: Path, dtype: str) -> None:
    """Runs in a fresh process so that the peak is the build's alone."""
    import torch  # noqa: F401  (part of the baseline)

    from composer.build import build
    from composer.inputs import LocalPathResolver
    from composer.spec_load import parse_spec

    baseline = _rss()
    spec = parse_spec(
        "method: compose\nstyle: flexolmo\nbase: public\n"
        f"experts: [{', '.join(EXPERTS)}]\noutput:\n  dtype: {dtype}\n  max_shard_size: 500MB\n"
    )
    t0 = time.perf_counter()
    res = build(spec, out, LocalPathResolver(root, hash_inputs=False), progress=False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "wall_s": wall, "files": len(res.files)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "composer-bench")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.dtype)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    make_inputs(args.workdir)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s under {args.workdir}")
    input_bytes = sum(
        f.stat().st_size
        for d in ("public", *EXPERTS)
        for f in (args.workdir / d).iterdir()
        if f.name.startswith("model") and f.suffix == ".safetensors"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = Path(tmp) / "composed"
        cmd = [
            sys.executable,
            __file__,
            "--dtype",
            args.dtype,
            "--child",
            str(args.workdir),
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out_bytes = sum(f.stat().st_size for f in out.iterdir())
    above = r["peak"] - r["baseline"]
    print(f"inputs: 4 models, {input_bytes / 1e9:.2f} GB; output {out_bytes / 1e9:.2f} GB")
    print(f"wall time: {r['wall_s']:.1f} s")
    print(f"peak RSS above baseline: {above / 1e6:.0f} MB (baseline {r['baseline'] / 1e6:.0f} MB)")
    print(f"fraction of summed input size: {above / input_bytes:.3f} (target < 0.25)")


if __name__ == "__main__":
    main()
