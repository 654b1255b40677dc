"""LoRA experts on SmolLM2: materialised (a) vs shared-base LoRA-MoE (b), side by side.

    PYTHONPATH=. .venv/bin/python bench/lora_compose.py [--workdir DIR] [--eval-chunks 8]

Inputs: the public SmolLM2 export of `make demo` (read-only) and three LoRA experts (code,
legal, manuals): lora-train's trained adapters when /work/lora-adapters/READY exists, else
seeded random rank-16 FFN adapters on the MoE layers, each given the demo expert's
composer_expert.safetensors (its trained router row and bias) so routing is the demo's. Both
builds compose the same spec (examples/flexmix.yaml's layers, router init `trained`), once with
`lora: materialised` and once with `lora: shared`. Each phase runs in its own child process:
build (wall time, peak RSS, checkpoint size), transformers (load + held-out perplexity on the
demo's domains, peak RSS), vLLM (greedy tokens/s over a batch, all experts allowed).
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
DEMO = REPO / ".demo" / "avx2-refactor"
TRAINED = Path("/work/lora-adapters")
DOMAINS = ("code", "legal", "manuals")
SPEC = """name: {name}
method: compose
style: flexolmo
base: {base}
experts: [code, legal, manuals]
top_k: 2
moe_layers: {{every: 4}}
router: {{init: trained, expert_bias: true}}
lora: {lora}
output: {{dtype: float32}}
"""


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _demo_home() -> Path:
    home = DEMO if DEMO.is_dir() else Path("/work/main/.demo/avx2-refactor")
    if not (home / "models" / "smollm2").is_dir():
        sys.exit(f"no SmolLM2 export under {home}: run `make demo` first")
    return home


def prepare(work: Path) -> str:
    """Adapters under work/adapters; returns which kind was used."""
    from composer.tiny_models import make_tiny_lora

    home = _demo_home()
    out = work / "adapters"
    if (TRAINED / "READY").is_file():
        for d in DOMAINS:
            if not (out / d).is_dir():
                shutil.copytree(TRAINED / d, out / d)
        return f"trained adapters from {TRAINED}"
    layers = list(range(0, 30, 4))
    for k, d in enumerate(DOMAINS):
        if (out / d / "adapter_model.safetensors").is_file():
            continue
        make_tiny_lora(
            home / "models" / "smollm2",
            out / d,
            seed=100 + k,
            rank=16,
            alpha=32.0,
            scale=0.01,
            layers_to_transform=layers,
        )
        shutil.copy(home / "experts" / d / "composer_expert.safetensors", out / d)
    return "seeded random rank-16 FFN adapters (alpha 32, factors N(0, 0.01^2), MoE layers)"


def phase_build(work: Path, lora: str) -> dict:
    from composer.build import build
    from composer.inputs import LocalPathResolver
    from composer.spec_load import load_spec

    base = _demo_home() / "models" / "smollm2"
    spec_path = work / f"{lora}.yaml"
    spec_path.write_text(SPEC.format(name=f"lora-{lora}", base=base, lora=lora))
    out = work / f"build-{lora}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    build(load_spec(spec_path), out, LocalPathResolver(work / "adapters"), progress=False)
    secs = time.perf_counter() - t
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"build_s": secs, "build_peak_mib": _peak_mib(), "size_mib": size / 2**20}


def phase_hf(work: Path, lora: str, eval_chunks: int) -> dict:
    import torch

    import models  # noqa: F401  (ComposerLoraMoeForCausalLM for AutoModelForCausalLM)
    from composer.demo import DOMAINS as PATHS
    from composer.text import HFTokenizer, load_token_chunks
    from composer.train.evaluate import load_causal_lm, perplexity

    torch.set_num_threads(2)
    out = work / f"build-{lora}"
    tok = HFTokenizer(out)
    held = {
        d: load_token_chunks(
            PATHS[d], tok, 128, max_train_chunks=1, max_heldout_chunks=eval_chunks
        ).heldout
        for d in DOMAINS
    }
    base_mib = _peak_mib()
    t = time.perf_counter()
    model = load_causal_lm(out)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    ppl = {d: perplexity(model, held[d], bf16=False) for d in DOMAINS}
    return {
        "load_s": load_s,
        "eval_s": time.perf_counter() - t,
        "hf_peak_mib": _peak_mib(),
        "hf_peak_over_start_mib": _peak_mib() - base_mib,
        **{f"ppl_{d}": v for d, v in ppl.items()},
    }


def phase_vllm(work: Path, lora: str) -> dict:
    from vllm import LLM, SamplingParams

    from serve.masking import MASK_KEY

    out = work / f"build-{lora}"
    t = time.perf_counter()
    llm = LLM(
        model=str(out), dtype="float32", max_model_len=512, enforce_eager=True,
        kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False, seed=0,
    )  # fmt: skip
    start_s = time.perf_counter() - t
    n = len(json.loads((out / "config.json").read_text())["composer_experts"])
    params = SamplingParams(
        max_tokens=64, temperature=0.0, ignore_eos=True, extra_args={MASK_KEY: list(range(n))}
    )
    prompts = [
        {"prompt_token_ids": [1 + (37 * i + j) % 40000 for j in range(32)]} for i in range(8)
    ]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    secs = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    first = list(outs[0].outputs[0].token_ids[:16])
    llm.llm_engine.engine_core.shutdown()
    return {"engine_start_s": start_s, "tokens_per_s": tokens / secs, "first_tokens": first}


def child(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    if args.phase == "prepare":
        res: dict = {"adapters": prepare(work)}
    elif args.phase == "build":
        res = phase_build(work, args.lora)
    elif args.phase == "hf":
        res = phase_hf(work, args.lora, args.eval_chunks)
    else:
        res = phase_vllm(work, args.lora)
    print("RESULT " + json.dumps(res), flush=True)


def run_child(args: argparse.Namespace, phase: str, lora: str = "") -> dict:
    cmd = [sys.executable, __file__, "--workdir", args.workdir, "--phase", phase]
    cmd += ["--lora", lora, "--eval-chunks", str(args.eval_chunks)] if lora else []
    print(f"[{time.strftime('%H:%M:%S')}] {phase} {lora}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{phase} {lora} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/lora-compose/bench")
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--phase", choices=["prepare", "build", "hf", "vllm"])
    p.add_argument("--lora", choices=["materialised", "shared"])
    args = p.parse_args()
    if args.phase:
        return child(args)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {"materialised": {}, "shared": {}}
    kind = run_child(args, "prepare")["adapters"]
    phases = ["build", "hf"] + ([] if args.no_vllm else ["vllm"])
    for phase in phases:
        for lora in results:
            results[lora].update(run_child(args, phase, lora))
    (Path(args.workdir) / "results.json").write_text(json.dumps(results, indent=2))
    a, b = results["materialised"], results["shared"]
    print(f"\nLoRA experts: {kind}")
    print(f"{'metric':<26}{'(a) materialised':>18}{'(b) shared':>14}{'b / a':>9}")
    for k, va in a.items():
        vb = b.get(k)
        if isinstance(va, float) and isinstance(vb, float):
            print(f"{k:<26}{va:>18.3f}{vb:>14.3f}{vb / va:>9.3f}")
    if "first_tokens" in a:
        same = a["first_tokens"] == b["first_tokens"]
        print(f"vLLM greedy tokens equal (first prompt, 16 tokens): {same}")


if __name__ == "__main__":
    main()
