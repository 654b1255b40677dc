"""Same spec, same inputs, another copy of the code: are the builds the same bytes?

    .venv/bin/python bench/build_identity.py --reference main~5 [--home .demo] [--only flexmix]
    .venv/bin/python bench/build_identity.py --reference main~5 --tiny

Builds every example spec (examples/*.yaml, or --only NAMES) twice against one registry: a
copy of --home (default .demo, as `make demo` leaves it) in which every expert is opted in
again by its owner (the demo ends with an opt-out); with this checkout and with
--reference, a git revision (exported with `git archive`) or a folder holding another copy of
the project. Each build runs in a fresh child process with that copy first on sys.path and
`--no-record`, so the registry is only read. Prints, per spec, whether every output file has the
same sha256, and the files that differ. Exit status 1 if any differs.

`--tiny` builds instead against tiny stand-ins for everything the examples name
(bench/tiny_registry.py, made with this checkout's CLI in about a minute): every example,
every build method, no `make demo` needed.

What it shows: a refactor left every build byte-identical (docs/ and ARCHITECTURE.md say which
run; the registry must hold what the examples name: `make demo` registers it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export(reference: str, dest: Path) -> Path:
    """A folder holding the project at `reference` (a folder, or a revision of this repo)."""
    if Path(reference).is_dir():
        return Path(reference).resolve()
    archive = dest / "ref.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), reference], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "code", filter="data")
    return dest / "code"


def build(code: Path, spec: Path, out: Path, home: Path) -> tuple[dict[str, str], float]:
    env = {**os.environ, "PYTHONPATH": str(code), "COMPOSER_HOME": str(home)}
    cmd = [sys.executable, "-m", "cli.main", "build", str(spec), "--out", str(out), "--json",
           "--no-record"]  # fmt: skip
    t0 = time.perf_counter()
    # From the spec's folder: an expert named by a relative path (examples/btx.yaml) is found.
    proc = subprocess.run(cmd, cwd=spec.parent, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{code}: build of {spec.name} failed:\n{proc.stderr[-3000:]}")
    hashes = {
        str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(out.rglob("*"))
        if f.is_file()
    }
    return hashes, time.perf_counter() - t0


def opted_in_copy(home: Path, dest: Path) -> Path:
    """A copy of the registry home with every expert version opted in by its owner."""
    from registry.service import RegistryService

    shutil.copytree(home, dest, ignore=shutil.ignore_patterns("builds", "checkouts", "*.log"))
    service = RegistryService(f"sqlite:///{dest / 'registry.db'}", dest)
    try:
        for e in service.list()["experts"]:
            service.set_policy(e["ref"], owner=e["owner"], policy="opt_in")
    finally:
        service.close()
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reference", required=True, help="git revision or folder of the other copy")
    p.add_argument("--home", type=Path, default=REPO / ".demo", help="COMPOSER_HOME to build in")
    p.add_argument("--only", nargs="*", help="example names (file stems) to build")
    p.add_argument("--tiny", action="store_true", help="tiny stand-in registry (no make demo)")
    args = p.parse_args()
    differ = 0
    with tempfile.TemporaryDirectory(prefix="build-identity-") as tmp:
        ref = export(args.reference, Path(tmp))
        if args.tiny:
            from tiny_registry import make  # bench/, beside this file

            examples = Path(tmp) / "examples"
            shutil.copytree(REPO / "examples", examples)
            home = Path(tmp) / "home"
            t0 = time.perf_counter()
            make(home, examples)
            print(f"tiny registry in {time.perf_counter() - t0:.0f} s", flush=True)
        else:
            examples = REPO / "examples"
            home = opted_in_copy(args.home.resolve(), Path(tmp) / "home")
        specs = sorted(examples.glob("*.yaml"))
        if args.only:
            specs = [s for s in specs if s.stem in args.only]
        for spec in specs:
            # Both copies build the same spec file: the one of this checkout.
            ours, t_ours = build(REPO, spec, Path(tmp) / "ours" / spec.stem, home)
            theirs, t_ref = build(ref, spec, Path(tmp) / "ref" / spec.stem, home)
            bad = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            differ += bool(bad)
            verdict = "same bytes" if not bad else f"DIFFER: {', '.join(bad)}"
            print(f"{spec.stem:28s} {len(ours):3d} files  {verdict}  "
                  f"({t_ours:.0f} s / {t_ref:.0f} s)", flush=True)  # fmt: skip
            for side in ("ours", "ref"):
                shutil.rmtree(Path(tmp) / side / spec.stem, ignore_errors=True)
    summary = {"specs": len(specs), "differ": differ, "reference": args.reference}
    print(json.dumps({**summary, "tiny": args.tiny}))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
