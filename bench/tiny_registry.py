"""A registry holding tiny stand-ins for everything examples/*.yaml names, made in seconds.

    .venv/bin/python bench/tiny_registry.py HOME EXAMPLES_COPY

What `make demo` registers takes minutes to train; this makes the same names from tiny random
models with the real `composer` CLI, so that bench/build_identity.py --tiny can build every
example spec (every build method) quickly:
- base `smollm2`: a tiny Llama with a word-level tokenizer;
- FlexOlmo experts `code`, `legal`, `manuals` owned by `acme`: trained for a few steps by
  `composer expert train` on examples/calibration text, repeated (so each carries its router
  row, bias and domain embedding), with proxy samples under HOME/proxy/<name>/;
- dense experts `smollm2-code-ft`, `smollm2-legal-ft` and the folder
  EXAMPLES_COPY/checkpoints/smollm2-manuals-ft (examples/btx.yaml names it by path);
- base `smollm2-upcycled-8x`: examples/upcycle.yaml built with 8 experts and registered.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOMAINS = ("code", "legal", "manuals")

UPCYCLE_8X = """\
name: smollm2-upcycled-8x
method: upcycle
base: smollm2
num_experts: 8
top_k: 2
router: {init: random}
output: {dtype: float32}
seed: 0
"""


def composer(home: Path, *args: str) -> None:
    env = {**os.environ, "COMPOSER_HOME": str(home), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cli.main", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"composer {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def make(home: Path, examples: Path) -> None:
    """Register the tiny stand-ins in ``home``; ``examples`` is the copy the specs are read from."""
    sys.path.insert(0, str(REPO))
    from composer.tiny_models import make_tiny_llama, perturb_weights
    from composer.tiny_moe import write_tiny_tokenizer

    work = home / "tiny-sources"
    base = make_tiny_llama(work / "smollm2", seed=0)
    write_tiny_tokenizer(base)
    composer(home, "registry", "init")
    composer(home, "registry", "add-base", str(base), "--name", "smollm2")
    composer(home, "registry", "add-owner", "acme")
    calibration = examples / "calibration"
    for i, domain in enumerate(DOMAINS):
        # The calibration texts are a few dozen words: repeated, they make a training set.
        text = work / "text" / f"{domain}.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text("\n".join([(calibration / f"{domain}.txt").read_text()] * 40))
        out = work / f"expert-{domain}"
        composer(home, "expert", "train", str(base), str(text), "--out", str(out),
                 "--domain", domain, "--layers", "every:4", "--steps", "4", "--seq-len", "32",
                 "--batch-size", "2", "--seed", str(i), "--bf16", "false", "--json")  # fmt: skip
        composer(home, "registry", "add-expert", str(out), "--name", domain, "--owner", "acme",
                 "--base", "smollm2", "--domain", domain)  # fmt: skip
        proxy = home / "proxy" / domain
        proxy.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(text, proxy / f"{domain}.txt")
    for seed, name in ((11, "smollm2-code-ft"), (12, "smollm2-legal-ft")):
        dense = perturb_weights(base, work / name, seed=seed)
        composer(home, "registry", "add-expert", str(dense), "--name", name, "--owner", "acme",
                 "--base", "smollm2", "--domain", name, "--kind", "dense")  # fmt: skip
    perturb_weights(base, examples / "checkpoints" / "smollm2-manuals-ft", seed=13)
    spec = work / "upcycle8.yaml"
    spec.write_text(UPCYCLE_8X)
    upcycled = work / "smollm2-upcycled-8x"
    composer(home, "build", str(spec), "--out", str(upcycled), "--no-record", "--json")
    composer(home, "registry", "add-base", str(upcycled), "--name", "smollm2-upcycled-8x")


if __name__ == "__main__":
    make(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
