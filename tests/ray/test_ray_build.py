"""`composer build --ray`: every build method family on a real local Ray cluster gives the same
bytes as the local build (sha256 of every output file), and the work really ran as tasks.

Inputs are tiny (composer.tiny_models: hidden 128, 2 layers): a Llama base, two FlexOlmo-style
experts (FFN perturbed), two full fine-tunes (BTX averages every shared tensor) and a 4-expert
Mixtral (moe_merge: uniform, and M-SMoE with routing statistics from calibration text).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer.build import build
from composer.distributed.ray_exec import RayExecutor
from composer.inputs import LocalPathResolver
from composer.spec_load import load_spec
from composer.tiny_models import make_tiny_llama, perturb_ffn, perturb_weights

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

SPECS = {
    "ties": """\
method: merge
base: base
experts: [code, {ref: legal, weight: 0.5}]
parameters: {method: ties, density: 0.5, lambda: 1.0}
output: {dtype: float32}
""",
    "moe_merge": """\
method: moe_merge
base: moe
parameters: {method: uniform, num_experts: 2}
""",
    "m_smoe": """\
method: moe_merge
base: moe
parameters: {method: m_smoe, num_experts: 2, calibration: [cal.txt], seq_len: 16,
             max_calibration_tokens: 64, align: true}
""",
    "flexolmo": """\
method: compose
style: flexolmo
base: base
experts: [code, legal]
moe_layers: [1]
router: {init: random}
output: {dtype: bfloat16}
""",
    "btx": """\
method: compose
style: btx
base: base
experts: [{ref: ft1, weight: 2}, ft2]
router: {init: random}
""",
    "upcycle": """\
method: upcycle
base: base
num_experts: 4
router: {init: random}
""",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("raybuild")
    make_tiny_llama(root / "base", seed=0)
    perturb_ffn(root / "base", root / "code", seed=1, scale=0.05)
    perturb_ffn(root / "base", root / "legal", seed=2, scale=0.05)
    perturb_weights(root / "base", root / "ft1", seed=3)
    perturb_weights(root / "base", root / "ft2", seed=4)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    MixtralForCausalLM(cfg).save_pretrained(root / "moe")
    (root / "cal.txt").write_text("def add(a, b):\n    return a + b\n" * 8)
    for name, text in SPECS.items():
        (root / f"{name}.yaml").write_text(text)
    return root


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _build(models: Path, name: str, out: Path, executor: RayExecutor | None = None) -> None:
    spec = load_spec(models / f"{name}.yaml")
    build(spec, out, LocalPathResolver(models), progress=False, executor=executor)


@pytest.mark.parametrize("name", list(SPECS))
def test_ray_build_is_byte_identical(
    ray_cluster: str, models: Path, tmp_path: Path, name: str
) -> None:
    _build(models, name, tmp_path / "local")
    executor = RayExecutor(ray_cluster)
    _build(models, name, tmp_path / "ray", executor)
    local, remote = hashes(tmp_path / "local"), hashes(tmp_path / "ray")
    assert local == remote
    assert any(k.endswith(".safetensors") for k in local)
    # The tensors came through the object store: one task per tensor (per MoE block for
    # moe_merge), and at least every merged byte of the weights came back to the driver.
    index = json.loads((tmp_path / "ray" / "model.safetensors.index.json").read_text())
    assert executor.stats.tasks > 0
    if name in ("moe_merge", "m_smoe"):  # M-SMoE: the routing statistics travel in the job
        assert executor.stats.tasks == 2  # two MoE blocks
    else:
        assert executor.stats.tasks <= len(index["weight_map"])
    if name in ("ties", "btx"):  # every output tensor is a task's result
        assert executor.stats.tasks == len(index["weight_map"])
        assert executor.stats.bytes_returned == index["metadata"]["total_size"]


def test_cli_build_ray_address(ray_cluster: str, models: Path, tmp_path: Path) -> None:
    """`composer build SPEC --ray-address ADDR` from another process attaches to the cluster."""
    _build(models, "ties", tmp_path / "local")
    env = {**os.environ, "PYTHONPATH": str(REPO), "COMPOSER_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "cli.main", "build", str(models / "ties.yaml"),
           "--out", str(tmp_path / "cli"), "--no-record", "--json",
           "--ray-address", ray_cluster]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=models)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["ray"]["address"] == ray_cluster and doc["ray"]["tasks"] > 0
    assert hashes(tmp_path / "cli") == hashes(tmp_path / "local")
