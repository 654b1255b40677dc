"""LoRA experts against full-FFN experts on SmolLM2-135M: held-out perplexity and artifact size.

    .venv/bin/python bench/lora_train.py --ranks 16            # ~4 min per domain and rank here
    .venv/bin/python bench/lora_train.py --domains code legal --ranks 16 64

Each owner of the demo (composer/demo.py: code, legal, manuals) trains a LoRA expert
(`composer expert train --lora R`) with the demo's QUICK settings (layers, steps, seq_len, batch,
lr), and the artifact is scored as written: the public model + that expert, rebuilt from the PEFT
adapter and composer_expert.safetensors (composer.train.lora_model), on the demo's held-out
chunks. The full-FFN side is the demo run in --demo (its experts/ and perplexity.json, measured
on the same held-out chunks through the 'only-<domain>' builds; --recompute-full scores those
builds again here). Prints one table; writes it as JSON to --work/lora_train.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from composer.demo import DOMAINS, QUICK  # noqa: E402  (the demo's owners and settings)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--demo", type=Path, default=REPO / ".demo", help="a finished `make demo` home")
    p.add_argument("--work", type=Path, default=Path("/tmp/composer-lora-train"))
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    p.add_argument("--ranks", nargs="+", type=int, default=[16])
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lr", type=float, default=QUICK.lr, help="default: the demo's")
    p.add_argument("--steps", type=int, default=QUICK.steps, help="default: the demo's")
    p.add_argument("--bf16", default="false", help="auto, true, false (the demo's reference "
                   "figures were float32)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--recompute-full", action="store_true", help="score the demo's builds again")
    p.add_argument("--copy-to", type=Path, default=None, help="copy each domain's first-rank "
                   "adapter to DIR/<domain>/")  # fmt: skip
    return p.parse_args(argv)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from composer.precision import parse_bf16
    from composer.text import HFTokenizer, load_token_chunks
    from composer.train.evaluate import load_causal_lm, perplexity
    from composer.train.expert import train_expert
    from composer.train.lora_model import load_lora_pair_model

    S, bf16 = QUICK, parse_bf16(args.bf16)
    public = args.demo / "models" / "smollm2"
    full_ppl = json.loads((args.demo / "perplexity.json").read_text())
    tok = HFTokenizer(public)
    rows: list[dict[str, object]] = []
    for d in args.domains:
        heldout = load_token_chunks(
            DOMAINS[d], tok, S.seq_len, max_train_chunks=1, max_heldout_chunks=S.eval_chunks
        ).heldout
        full_dir = args.demo / "experts" / d
        full = full_ppl[f"expert {d}"][d]
        if args.recompute_full:
            full = perplexity(load_causal_lm(args.demo / "builds" / f"only-{d}"), heldout)
        rows.append({"domain": d, "expert": "public", "ppl": full_ppl["public"][d], "bytes": 0})
        rows.append({"domain": d, "expert": "full FFN (demo)", "ppl": full,
                     "bytes": folder_bytes(full_dir), "train_s": None})  # fmt: skip
        for r in args.ranks:
            out = args.work / f"{d}-r{r}"
            res = train_expert(
                public, DOMAINS[d], out, domain=d, layers=S.layers, steps=args.steps,
                seq_len=S.seq_len, batch_size=S.batch, lr=args.lr, seed=0, max_heldout_chunks=0,
                lora_rank=r, lora_alpha=args.alpha, bf16=bf16, overwrite=True,
                num_threads=args.threads,
            )  # fmt: skip
            ppl = perplexity(load_lora_pair_model(public, out), heldout, bf16=bf16)
            rows.append({"domain": d, "expert": f"LoRA r={r}", "ppl": ppl,
                         "bytes": folder_bytes(out), "train_s": round(res.train_s, 1),
                         "loss": [round(res.losses[0], 3), round(res.losses[-1], 3)]})  # fmt: skip
            print(f"{d} r={r}: ppl {ppl:.2f} (full FFN {full:.2f}), {folder_bytes(out)} bytes, "
                  f"{res.train_s:.0f} s", flush=True)  # fmt: skip
            if args.copy_to is not None and r == args.ranks[0]:
                dest = args.copy_to / d
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(out, dest)
    print_table(rows)
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {**S.__dict__, "lr": args.lr, "steps": args.steps, "bf16": args.bf16}
    settings["alpha"] = args.alpha or "2 x rank"
    doc = {"settings": settings, "rows": rows, "time": time.ctime()}
    (args.work / "lora_train.json").write_text(json.dumps(doc, indent=2))


def print_table(rows: list[dict[str, object]]) -> None:
    """Markdown: perplexity and size, each against the full-FFN expert of the same domain."""
    print("| domain | expert | held-out ppl | vs full FFN | artifact | vs full FFN |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    full = {r["domain"]: r for r in rows if r["expert"] == "full FFN (demo)"}
    for r in rows:
        f = full[r["domain"]]
        ppl, size = float(r["ppl"]), int(r["bytes"])  # type: ignore[arg-type]
        rel = f"{100 * (ppl / float(f['ppl']) - 1):+.1f}%"  # type: ignore[arg-type]
        ratio = f"{size / int(f['bytes']):.4f}x" if size else "-"  # type: ignore[arg-type]
        mb = f"{size / 1e6:.1f} MB" if size else "-"
        print(f"| {r['domain']} | {r['expert']} | {ppl:.2f} | {rel} | {mb} | {ratio} |")


if __name__ == "__main__":
    main()
