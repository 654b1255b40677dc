"""A registry-backed build made the way a user makes one: tiny checkpoints registered with the
real `composer` CLI, then `composer build` of a FlexOlmo spec that pins a version and renames
an expert. Used by the policy-binding tests and the black-box attack suite."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from composer.tiny_models import make_tiny_llama, perturb_ffn
from composer.tiny_moe import write_tiny_tokenizer
from registry.service import RegistryService
from tests.conftest import Cli

# Router order of the build: the public base, alpha@1, beta (renamed b2), secret, withdrawn.
SLOTS = ["public", "alpha", "b2", "secret", "withdrawn"]

SPEC = """\
name: guarded
method: compose
style: flexolmo
base: tiny
experts:
  - alpha@1                      # pinned: alpha@2 exists too
  - {ref: beta, name: b2}        # policy must follow `beta`, not the display name
  - secret
  - withdrawn
top_k: 2
router: {init: random}
output: {dtype: float32}
seed: 0
"""

BTX_SPEC = """\
name: named-public
method: compose
style: btx
base: tiny
experts:
  - {ref: alpha@1, name: public}  # a registered expert that calls itself "public"
  - beta
top_k: 1
router: {init: random}
output: {dtype: float32}
"""


@dataclass
class GuardedBuild:
    cli: Cli
    out: Path  # the build's output folder


def register_experts(cli: Cli, root: Path, max_positions: int = 256) -> None:
    """Base `tiny` and experts alpha (versions 1 and 2), beta, secret, withdrawn, owned by acme.

    FFN noise is large so that experts differ visibly; every other tensor is the base's.
    """
    base = make_tiny_llama(root / "base", seed=0, max_position_embeddings=max_positions)
    write_tiny_tokenizer(base)
    cli("registry", "add-owner", "acme")
    cli("registry", "add-base", base, "--name", "tiny")
    for seed, (folder, name) in enumerate(
        [
            ("alpha1", "alpha"),
            ("alpha2", "alpha"),
            ("beta", "beta"),
            ("secret", "secret"),
            ("withdrawn", "withdrawn"),
        ],  # fmt: skip
        start=1,
    ):
        perturb_ffn(base, root / folder, seed=seed, scale=0.5)
        cli("registry", "add-expert", root / folder, "--name", name, "--owner", "acme",
            "--base", "tiny", "--domain", name)  # fmt: skip


def set_policy(cli: Cli, ref: str, policy: str) -> None:
    """An owner's policy change (in process: the CLI's own path is tested in tests/registry)."""
    service = RegistryService(cli.db_url, cli.home)
    try:
        service.set_policy(ref, owner="acme", policy=policy)
    finally:
        service.close()


def build(cli: Cli, root: Path, spec: str, name: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(spec)
    doc = json.loads(cli("build", path, "--out", root / name, "--json").stdout)
    return Path(doc["out_dir"])


def guarded_build(cli: Cli, root: Path, max_positions: int = 256) -> GuardedBuild:
    register_experts(cli, root, max_positions)
    return GuardedBuild(cli, build(cli, root, SPEC, "guarded"))
