"""Local build vs the same build on a local Ray cluster with 1 and 2 workers, side by side.

    .venv/bin/python bench/ray_build.py --inputs DIR [--workers 1 2] [--only ties flexolmo]

DIR holds checkpoint folders `base`, `code`, `legal`, `manuals` (the demo's public SmolLM2
export and its three FlexOlmo-style experts: copy `.demo/<run>/models/smollm2` and
`.demo/<run>/experts/*`). Two specs are built: a TIES merge of the three experts (per-tensor
tasks) and a FlexOlmo compose of them with their trained routers, every 4th layer MoE
(per-tensor tasks, no router tuning). Each build runs in a fresh child process: `local`
(composer build as it is), then `ray:N` (a new `ray.init(num_cpus=N)` cluster; its start-up
is timed apart from the build). Prints per build: wall seconds, ratio to local, Ray tasks,
tensor bytes that came back through the object store, and whether every output file has the
local build's sha256. Outputs are deleted after hashing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPECS = {
    "ties": """\
method: merge
base: base
experts: [code, legal, manuals]
parameters: {method: ties, density: 0.5, lambda: 1.0}
output: {dtype: float32}
""",
    "flexolmo": """\
method: compose
style: flexolmo
base: base
experts: [code, legal, manuals]
top_k: 2
moe_layers: {every: 4}
router: {init: trained, expert_bias: true}
output: {dtype: float32}
""",
}


def one(inputs: Path, name: str, mode: str, out: Path) -> dict[str, object]:
    """Build ``name`` in this process (mode ``local`` or ``ray:N``); JSON-ready figures."""
    sys.path.insert(0, str(REPO))
    from composer.build import build
    from composer.inputs import LocalPathResolver
    from composer.spec_load import load_spec

    spec_path = inputs / f"bench-{name}.yaml"
    spec_path.write_text(SPECS[name])
    executor, start_s = None, 0.0
    if mode.startswith("ray:"):
        import ray

        from composer.distributed.ray_exec import RayExecutor

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=int(mode[4:]), include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
        executor = RayExecutor()
        start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = build(load_spec(spec_path), out, LocalPathResolver(inputs), progress=False,
                   executor=executor)  # fmt: skip
    wall = time.perf_counter() - t0
    files = {
        str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(out.rglob("*"))
        if f.is_file()
    }
    doc: dict[str, object] = {
        "wall_s": round(wall, 2),
        "cluster_start_s": round(start_s, 2),
        "files": files,
        "peak_rss_mb": result.peak_rss_bytes >> 20,
    }
    if executor is not None:
        doc.update(tasks=executor.stats.tasks, bytes_returned=executor.stats.bytes_returned)
    shutil.rmtree(out)
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    p.add_argument("--only", nargs="*", default=list(SPECS))
    p.add_argument("--one", nargs=3, metavar=("NAME", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    inputs = args.inputs.resolve()
    if args.one:
        print(json.dumps(one(inputs, args.one[0], args.one[1], Path(args.one[2]))))
        return 0
    same_all = True
    print(f"{'build':10s} {'mode':7s} {'wall s':>8s} {'vs local':>8s} {'cluster s':>9s} "
          f"{'tasks':>6s} {'MiB back':>9s} {'RSS MiB':>8s}  bytes")  # fmt: skip
    for name in args.only:
        local: dict[str, object] = {}
        for mode in ["local", *(f"ray:{n}" for n in args.workers)]:
            out = inputs / f"out-{name}-{mode.replace(':', '')}"
            cmd = [sys.executable, __file__, "--inputs", str(inputs), "--one", name, mode, str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name} {mode} failed:\n{proc.stderr[-3000:]}")
                return 1
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
            if mode == "local":
                local = doc
            same = doc["files"] == local["files"]
            same_all &= same
            ratio = float(doc["wall_s"]) / float(local["wall_s"])  # type: ignore[arg-type]
            back = int(doc.get("bytes_returned", 0)) / 2**20  # type: ignore[call-overload]
            verdict = "same" if same else "DIFFER"
            print(f"{name:10s} {mode:7s} {doc['wall_s']:8.1f} {ratio:8.2f} "
                  f"{doc['cluster_start_s']:9.1f} {doc.get('tasks', '-'):>6} {back:9.0f} "
                  f"{doc['peak_rss_mb']:8d}  {verdict}", flush=True)  # fmt: skip
    return 0 if same_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
