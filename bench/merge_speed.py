"""Merge speed and memory on full fine-tunes, side by side with mergekit.

    .venv/bin/python bench/merge_speed.py                          # Composer only
    .venv/bin/python bench/merge_speed.py --mergekit /tmp/mkvenv/bin/mergekit-yaml \\
        --reference-code /tmp/main-src --docs docs/performance.md  # the table of the docs

1. SmolLM2-135M-Instruct is exported as safetensors (composer.smollm2) and --experts full
   perturbed copies are written: every float tensor plus seeded Gaussian noise of --scale times
   its mean magnitude, so every tensor differs from the base (mergekit's common case). For
   M-SMoE the base is upcycled to a 4-expert Mixtral (method upcycle) whose experts are
   perturbed the same way.
2. Each build runs in a fresh child process; wall time is the child's whole life (interpreter
   start and imports included, as for mergekit-yaml), peak RSS its ru_maxrss (os.wait4). The
   interpreter's own footprint, a child that only imports torch and the tool, is subtracted.
3. mergekit (never a dependency of the project: install it in its own venv) runs the same merge
   on the same files when found: --mergekit (mergekit-yaml or a python that has mergekit), else
   $MERGEKIT_PYTHON, else mergekit-yaml on PATH.
4. --reference-code DIR (e.g. `git archive main | tar -x -C DIR`) also builds every method with
   that code and says whether the weights came out as the same bytes.

The machine is shared and noisy: compare the columns of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- merge_speed:begin -->", "<!-- merge_speed:end -->"

# Composer's build in a child: this file's imports must not leak into the measured process.
CHILD = """
import json, sys, time
from composer.inputs import LocalPathResolver
from composer.build import build
from composer.spec_load import load_spec
spec = load_spec(sys.argv[1])
t0 = time.perf_counter()
build(spec, sys.argv[2], LocalPathResolver(sys.argv[3], hash_inputs=False), progress=False)
import composer
print(json.dumps({"build_s": time.perf_counter() - t0, "code": composer.__file__}))
"""
BASELINE = {
    "composer": "import torch, composer.build",
    # M-SMoE runs the model (transformers' Mixtral modules): part of its interpreter.
    "composer + transformers": "import torch, composer.build, transformers.models.mixtral."
    "modeling_mixtral; from transformers import AutoModelForCausalLM, AutoTokenizer",
    "mergekit": "import torch, mergekit.merge",
}


@dataclass
class Run:
    wall_s: float
    peak: int  # bytes, ru_maxrss of the child
    build_s: float | None = None
    digest: str | None = None  # sha256 over the weight files


@dataclass
class Row:
    label: str
    inputs: int  # bytes of the weight files read
    largest: int  # bytes of the largest input tensor
    baseline: str = "composer"  # which interpreter footprint to subtract (BASELINE)
    runs: dict[str, Run] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------- inputs


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model*.safetensors"))


def largest_tensor(folder: Path) -> int:
    from composer.checkpoint import Checkpoint

    ck = Checkpoint(folder)
    try:
        sizes = []
        for k in ck.tensor_names():
            dtype, shape = ck.meta(k)
            n = dtype.itemsize
            for d in shape:
                n *= d
            sizes.append(n)
        return max(sizes)
    finally:
        ck.close()


def make_inputs(a: argparse.Namespace) -> tuple[Path, list[Path]]:
    from composer.smollm2 import export_smollm2
    from composer.tiny_models import perturb_weights

    base = export_smollm2(a.work / "smollm2")
    experts = []
    for i in range(a.experts):
        dest = a.work / f"full{i + 1}"
        if not (dest / "done").is_file():
            log(f"writing full perturbed copy {dest.name} (scale {a.scale})")
            shutil.rmtree(dest, ignore_errors=True)
            perturb_weights(base, dest, seed=i + 1, scale=a.scale, relative=True)
            (dest / "done").write_text("ok\n")
        experts.append(dest)
    return base, experts


def make_moe(a: argparse.Namespace, base: Path) -> Path:
    """SmolLM2 upcycled to a 4-expert top-2 Mixtral, its experts perturbed so they differ."""
    from composer.build import build
    from composer.inputs import LocalPathResolver
    from composer.spec_load import parse_spec
    from composer.tiny_models import perturb_weights

    dest = a.work / "moe4"
    if (dest / "done").is_file():
        return dest
    log("upcycling SmolLM2 to a 4-expert Mixtral")
    shutil.rmtree(dest, ignore_errors=True)
    up = a.work / "moe4-upcycled"
    shutil.rmtree(up, ignore_errors=True)
    spec = parse_spec(
        f"method: upcycle\nbase: {base.name}\nnum_experts: 4\ntop_k: 2\nmoe_layers: all\n"
        "router: {init: random}\nseed: 0\noutput: {dtype: float32}\n"
    )
    build(spec, up, LocalPathResolver(a.work, hash_inputs=False), progress=False)
    perturb_weights(
        up, dest, seed=7, scale=a.scale, relative=True, select=lambda n: ".experts." in n
    )
    shutil.rmtree(up)
    cal = a.work / "cal"
    shutil.copytree(REPO / "examples" / "calibration", cal, dirs_exist_ok=True)
    (dest / "done").write_text("ok\n")
    return dest


# ------------------------------------------------------------------------------------- specs


def composer_spec(method: str, base: Path, experts: list[Path], density: float) -> str:
    if method == "m_smoe":
        cal = "[cal/code.txt, cal/legal.txt, cal/manuals.txt]"
        return (
            f"method: moe_merge\nbase: {base.name}\nparameters: {{method: m_smoe, "
            f"num_experts: 2, calibration: {cal}, max_calibration_tokens: 2048}}\n"
            "output: {dtype: float32}\n"
        )
    params = {
        "linear": "{method: linear}",
        "task_arithmetic": "{method: task_arithmetic}",
        "ties": f"{{method: ties, density: {density}}}",
        "dare_ties": f"{{method: dare_ties, density: {density}}}",
    }[method]
    names = ", ".join(e.name for e in experts)
    return (
        f"method: merge\nbase: {base.name}\nexperts: [{names}]\nparameters: {params}\n"
        "output: {dtype: float32}\nseed: 0\n"
    )


def mergekit_config(method: str, base: Path, experts: list[Path], density: float) -> str:
    """The same merge in mergekit's terms (weights 1, lambda 1; TIES/DARE normalised)."""
    lines = [f"merge_method: {method}", "dtype: float32"]
    if method != "linear":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for e in experts:
        p = "{weight: 1.0" + (f", density: {density}" if method in ("ties", "dare_ties") else "")
        lines.append(f"  - model: {e}\n    parameters: {p}}}")
    if method in ("ties", "dare_ties"):
        lines.append("parameters: {normalize: true}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- runs


def measured(cmd: list[str], *, env: dict[str, str], cwd: Path, logfile: Path) -> Run:
    """Run ``cmd`` to completion; wall time and its own peak RSS (os.wait4)."""
    t0 = time.perf_counter()
    with logfile.open("ab") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}); see {logfile}")
    run = Run(wall_s=wall, peak=usage.ru_maxrss * 1024)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if last.startswith("{"):
        run.build_s = json.loads(last).get("build_s")
    return run


def fastest(row: Row, tool: str, run: Run) -> None:
    """Keep the fastest run of ``tool`` (noise on a shared machine only adds time) and the
    highest peak (memory does not depend on load)."""
    old = row.runs.get(tool)
    if old is None:
        row.runs[tool] = run
        return
    if old.digest is not None and run.digest != old.digest:
        raise RuntimeError(f"{row.label}: {tool} wrote different bytes on a repeat")
    peak = max(old.peak, run.peak)
    row.runs[tool] = run if run.wall_s < old.wall_s else old
    row.runs[tool].peak = peak


def digest(folder: Path) -> str:
    """sha256 over the weight files and the index (not composition.json: it names paths)."""
    h = hashlib.sha256()
    for f in [*weight_files(folder), folder / "model.safetensors.index.json"]:
        if f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


def composer_env(code: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code)
    env.pop("COMPOSER_HOME", None)
    return env


def run_composer(a: argparse.Namespace, code: Path, method: str, spec: str, tag: str) -> Run:
    spec_path = a.work / f"spec-{method}.yaml"
    spec_path.write_text(spec)
    out = a.work / "out" / f"{tag}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", CHILD, str(spec_path), str(out), str(a.work)]
    run = measured(cmd, env=composer_env(code), cwd=a.work, logfile=a.work / "log.txt")
    run.digest = digest(out)
    shutil.rmtree(out)
    return run


def find_mergekit(a: argparse.Namespace) -> list[str] | None:
    """The mergekit-yaml command: a mergekit-yaml script or a python that has mergekit."""
    given = a.mergekit or os.environ.get("MERGEKIT_PYTHON") or shutil.which("mergekit-yaml")
    if not given:
        return None
    if Path(given).name.startswith("mergekit-yaml"):
        return [given]
    return [given, "-c", "from mergekit.scripts.run_yaml import main; main()"]


def mergekit_python(cmd: list[str]) -> str:
    if len(cmd) > 1:
        return cmd[0]
    shebang = Path(cmd[0]).read_text().splitlines()[0]
    return shebang[2:].strip() if shebang.startswith("#!") else "python3"


def run_mergekit(a: argparse.Namespace, mk: list[str], method: str, config: str) -> Run:
    cfg = a.work / f"mergekit-{method}.yaml"
    cfg.write_text(config)
    out = a.work / "out" / f"mergekit-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*mk, str(cfg), str(out), "--random-seed", "0", "--quiet"]
    run = measured(cmd, env=dict(os.environ), cwd=a.work, logfile=a.work / "log.txt")
    shutil.rmtree(out)
    return run


def baseline(cmd: list[str], env: dict[str, str], a: argparse.Namespace) -> int:
    return measured(cmd, env=env, cwd=a.work, logfile=a.work / "log.txt").peak


# ------------------------------------------------------------------------------------- report


def table(rows: list[Row], base_rss: dict[str, int], have_mk: bool, have_ref: bool) -> str:
    def gb(x: float) -> str:
        return f"{x / 1e9:.2f}"

    head = ["merge", "Composer wall (s)"]
    if have_mk:
        head += ["mergekit wall (s)", "wall ratio (target <= 0.5)"]
    head += ["Composer peak above interpreter (GB)", "bound (GB)", "within bound"]
    if have_mk:
        head += ["mergekit peak above interpreter (GB)"]
    if have_ref:
        head += ["main's wall (s)", "main's peak above interpreter (GB)", "same bytes as main"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        new = r.runs["composer"]
        above = new.peak - base_rss[r.baseline]
        bound = 0.25 * r.inputs + r.largest
        cells = [r.label, f"{new.wall_s:.1f}"]
        if have_mk:
            mk = r.runs.get("mergekit")
            cells += [f"{mk.wall_s:.1f}", f"{new.wall_s / mk.wall_s:.2f}"] if mk else ["-", "-"]
        cells += [gb(above), gb(bound), "yes" if above <= bound else "**no**"]
        if have_mk:
            mk = r.runs.get("mergekit")
            cells += [gb(mk.peak - base_rss["mergekit"]) if mk else "-"]
        if have_ref:
            old = r.runs.get("main")
            if old:
                same = "yes" if old.digest == new.digest else "no"
                cells += [f"{old.wall_s:.1f}", gb(old.peak - base_rss[r.baseline]), same]
            else:
                cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "composer-merge-speed"
    )
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--scale", type=float, default=0.01, help="noise / mean |weight| per tensor")
    p.add_argument("--density", type=float, default=0.5, help="TIES / DARE density")
    p.add_argument(
        "--methods",
        default="linear,task_arithmetic,ties,dare_ties,m_smoe",
        help="comma-separated subset",
    )
    p.add_argument("--mergekit", help="mergekit-yaml, or a python with mergekit installed")
    p.add_argument("--reference-code", type=Path, help="also build with this copy of Composer")
    p.add_argument("--docs", type=Path, help="write the table into this markdown file")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool (fastest kept)")
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(a: argparse.Namespace) -> dict[str, object]:
    """Inputs and facts about them; runs in a child so the measuring parent stays small (Linux
    carries a forked parent's peak RSS over into the child's ru_maxrss)."""
    import torch

    sys.path.insert(0, str(REPO))
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    base, experts = make_inputs(a)
    moe = make_moe(a, base) if "m_smoe" in methods else None
    return {
        "base": str(base),
        "experts": [str(e) for e in experts],
        "moe": str(moe) if moe else None,
        "dense_inputs": sum(f.stat().st_size for d in (base, *experts) for f in weight_files(d)),
        "dense_largest": largest_tensor(base),
        "moe_inputs": sum(f.stat().st_size for f in weight_files(moe)) if moe else 0,
        "moe_largest": largest_tensor(moe) if moe else 0,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores "
        f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}",
    }


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.prepare:
        print(json.dumps(prepare(a)))
        return
    cmd = ".venv/bin/python bench/merge_speed.py " + shlex.join(argv if argv is not None
                                                                else sys.argv[1:])  # fmt: skip
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "out").mkdir(exist_ok=True)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    child = [sys.executable, __file__, "--prepare", *(argv if argv is not None else sys.argv[1:])]
    proc = subprocess.run(child, env=composer_env(REPO), check=True, stdout=subprocess.PIPE)
    info = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    base, experts = Path(info["base"]), [Path(e) for e in info["experts"]]
    moe = Path(info["moe"]) if info["moe"] else None
    mk = find_mergekit(a)
    log(f"mergekit: {shlex.join(mk) if mk else 'not found (Composer only)'}")

    base_rss = {k: baseline([sys.executable, "-c", BASELINE[k]], composer_env(REPO), a)
                for k in ("composer", "composer + transformers")}  # fmt: skip
    if mk:
        base_rss["mergekit"] = baseline(
            [mergekit_python(mk), "-c", BASELINE["mergekit"]], dict(os.environ), a
        )
    log("interpreter baselines: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in base_rss.items()))

    dense_inputs = int(info["dense_inputs"])
    rows = []
    for method in methods:
        if method == "m_smoe":
            assert moe is not None
            row = Row("M-SMoE (4 -> 2 experts)", int(info["moe_inputs"]), int(info["moe_largest"]),
                      "composer + transformers")  # fmt: skip
            spec = composer_spec(method, moe, [], a.density)
        else:
            label = {"linear": "linear", "task_arithmetic": "task arithmetic",
                     "ties": f"TIES (density {a.density})",
                     "dare_ties": f"DARE-TIES (density {a.density})"}[method]  # fmt: skip
            row = Row(label, dense_inputs, int(info["dense_largest"]))
            spec = composer_spec(method, base, experts, a.density)
        for i in range(a.repeat):  # interleaved: a change of load hits both tools alike
            tag = f" (run {i + 1}/{a.repeat})" if a.repeat > 1 else ""
            run = run_composer(a, REPO, method, spec, "new")
            log(f"{method}: Composer {run.wall_s:.1f} s, peak {run.peak / 1e9:.2f} GB{tag}")
            fastest(row, "composer", run)
            if mk and method != "m_smoe":
                config = mergekit_config(method, base, experts, a.density)
                run = run_mergekit(a, mk, method, config)
                log(f"{method}: mergekit {run.wall_s:.1f} s, peak {run.peak / 1e9:.2f} GB{tag}")
                fastest(row, "mergekit", run)
        if a.reference_code:
            row.runs["main"] = run_composer(a, a.reference_code, method, spec, "ref")
            log(f"{method}: reference code {row.runs['main'].wall_s:.1f} s")
        rows.append(row)

    md = table(rows, base_rss, bool(mk), bool(a.reference_code))
    section = "\n".join([
        f"Made by `{cmd}` on {time.strftime('%Y-%m-%d')}: {info['machine']}"
        + (", mergekit 0.1.5" if mk else "") + ".",
        "",
        f"Inputs: SmolLM2-135M float32 and {a.experts} full perturbed copies (noise "
        f"{a.scale} x mean magnitude on every tensor), {dense_inputs / 1e9:.2f} GB of weights; "
        "M-SMoE: the base upcycled to 4 experts (perturbed), merged to 2, calibration "
        "examples/calibration/*.txt (2048 tokens). Interpreter baselines (torch and the tool "
        "imported; for M-SMoE also transformers' Mixtral model classes): "
        + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in base_rss.items())
        + ". Bound: 0.25 x the inputs + the largest tensor.",
        "",
        md,
        "",
        f"Wall time: the fastest of {a.repeat} interleaved runs per tool; peak: the highest. "
        "main's code ran once."
        if a.repeat > 1 else "Wall time and peak: one run per tool.",
    ])  # fmt: skip
    print(section)
    if a.docs:
        write_docs(a.docs, section)
        log(f"wrote {a.docs}")


if __name__ == "__main__":
    main()
