"""`composer serve --replicas 2` on a real local Ray cluster: a `composer serve` subprocess runs a
2-replica Ray Serve application of a tiny registry-governed FlexOlmo (keys on), and the tests
talk to its one endpoint.

Covered: masked == pruned on both replicas; 200 mixed requests 16 at a time without a failure;
a replica killed mid-load is restarted by Ray and every request either gets the right answer
or a clean 5xx or the proxy's 408 (its request timeout, which `--replicas` always sets); a second
server's options that the running proxy does not have are refused; an opt-out reaches every
replica within the refresh interval, and a registry that cannot be read fails closed (503) on
every replica; attacks get the single server's exact answers (the same middleware, run
in-process here for reference). The cluster is tests/ray/conftest.py's `ray_cluster`: at the end
no process it started, replicas and engines included, is left. One cluster and one application;
the pruned model's reference tokens come from plain transformers.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from composer.tiny_moe import make_tiny_moe, prune_expert
from registry.models import Policy
from serve.ray_app import APP_NAME, REPLICA_HEADER
from serve.replica_plan import DEPLOYMENT
from tests.serve.server_fixtures import (
    KEYS,
    LOCKER,
    REPO,
    VLLM_TEST_ARGS,
    free_port,
    greedy_tokens,
    make_registry,
    set_policy,
)

pytestmark = [pytest.mark.slow, pytest.mark.replicas]

ALL = ["public", "code", "legal", "math"]
PROMPTS = [[5, 6, 7, 8, 9, 10], [30, 31, 32, 33], [100, 101, 102], [7, 9, 11, 13, 15, 17, 19]]
MASKS: list[dict[str, list[str]] | None] = [
    None, {"exclude": ["legal"]}, {"include": ["code"]}, {"include": ["public", "math"]},
    {"exclude": ["public", "code"]},
]  # fmt: skip
TTL = 0.5
MAX_STALENESS = 4.0
# The proxy's request timeout: below the client's 180 s, so a request a killed replica held gets
# the proxy's 408 rather than a client-side timeout (CI once saw one such request wait 180 s).
REQUEST_TIMEOUT = 90.0
REPLICA = REPLICA_HEADER.decode()


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    registry_url: str
    model: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any, key: str | None = "alice") -> httpx.Response:
        headers = _auth(key)
        if isinstance(body, bytes):
            headers["content-type"] = "application/json"
            return httpx.post(self.base_url + path, content=body, headers=headers, timeout=120)
        return httpx.post(self.base_url + path, json=body, headers=headers, timeout=120)

    def complete(self, prompt: list[int], experts: Any = None, key: str = "alice") -> Any:
        return self.post("/v1/completions", _body(prompt, experts), key)


def _body(prompt: list[int], experts: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "flexmix", "prompt": prompt, "max_tokens": 8}
    body["temperature"] = 0.0
    if experts is not None:
        body["experts"] = experts
    return body


@pytest.fixture(scope="module")
def app(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    root = tmp_path_factory.mktemp("replicas")
    model = make_tiny_moe(root / "flexmix", "flexolmo")
    url = make_registry(root / "registry.db", model)
    port = free_port()
    cmd = [
        sys.executable, "-m", "cli.main", "serve", str(model), "--replicas", "2",
        "--ray-address", ray_cluster, "--port", str(port), "--api-keys", "on",
        "--served-model-name", "flexmix", "--policy-ttl", str(TTL),
        "--policy-max-staleness", str(MAX_STALENESS), "--request-timeout-s", str(REQUEST_TIMEOUT),
        "--", *VLLM_TEST_ARGS,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "COMPOSER_HOME": str(root / "home"),
           "COMPOSER_DATABASE_URL": url}  # fmt: skip
    log = root / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    served = App(proc, port, log, url, model)
    try:
        _wait_ready(served, timeout=600)
        yield served
    finally:
        proc.terminate()  # SIGTERM: the app is deleted from the cluster, engines shut down
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    assert code == 0, log.read_text()[-4000:]


def _wait_ready(served: App, timeout: float) -> None:
    """Until the command says every replica runs (it prints that after `serve.run`)."""
    deadline = time.monotonic() + timeout
    while "replicas of" not in served.log.read_text(errors="replace"):
        if served.proc.poll() is not None:
            raise RuntimeError(f"exited {served.proc.returncode}:\n{_tail(served)}")
        assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{_tail(served)}"
        time.sleep(1)


def _tail(served: App) -> str:
    return served.log.read_text(errors="replace")[-4000:]


async def _fire(
    served: App,
    jobs: list[tuple[list[int], Any]],
    concurrency: int = 16,
    extra: dict[str, Any] | None = None,
) -> list[tuple[int, str, str]]:
    """(status, replica, body) of each job (prompt, experts, plus the `extra` fields),
    `concurrency` at a time; a transport error is status 0."""
    sem = asyncio.Semaphore(concurrency)
    headers = _auth("alice")
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=served.base_url, timeout=180, limits=limits) as client:

        async def one(prompt: list[int], experts: Any) -> tuple[int, str, str]:
            async with sem:
                try:
                    r = await client.post(
                        "/v1/completions",
                        json={**_body(prompt, experts), **(extra or {})},
                        headers=headers,
                    )
                except httpx.TransportError as e:
                    return 0, "", repr(e)
                return r.status_code, r.headers.get(REPLICA, ""), r.text

        return await asyncio.gather(*(one(p, e) for p, e in jobs))


def _text(body: str) -> str:
    return json.loads(body)["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(app: App) -> dict[tuple[int, int], str]:
    """Each (prompt, mask) answered alone."""
    out = {}
    for p, prompt in enumerate(PROMPTS):
        for m, mask in enumerate(MASKS):
            r = app.complete(prompt, mask)
            assert r.status_code == 200, r.text
            out[p, m] = r.json()["choices"][0]["text"]
    return out


def test_masked_equals_pruned_on_both_replicas(app: App, tmp_path: Path) -> None:
    """Excluding `legal` gives, on each replica, the greedy tokens of the checkpoint built
    without it (plain transformers, float32: tests/builds/test_load.py shows a float32 engine
    gives transformers' greedy tokens on these tiny models)."""
    from transformers import AutoModelForCausalLM

    pruned_dir = prune_expert(app.model, tmp_path / "no_legal", "legal")
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    want = [greedy_tokens(pruned, prompt, 8) for prompt in PROMPTS]
    tokens = {"return_token_ids": True, "ignore_eos": True}
    seen: dict[str, set[int]] = {}
    for _ in range(8):  # until both replicas have answered every prompt
        jobs = [(prompt, {"exclude": ["legal"]}) for prompt in PROMPTS] * 2
        results = asyncio.run(_fire(app, jobs, 8, tokens))
        for (prompt, _), (status, replica, body) in zip(jobs, results, strict=True):
            assert status == 200, body
            answer = json.loads(body)
            assert answer["experts"] == ["public", "code", "math"]
            assert answer["choices"][0]["token_ids"] == want[PROMPTS.index(prompt)], replica
            seen.setdefault(replica, set()).add(PROMPTS.index(prompt))
        if len(seen) == 2 and all(len(v) == len(PROMPTS) for v in seen.values()):
            break
    assert len(seen) == 2 and all(len(v) == len(PROMPTS) for v in seen.values()), seen
    # The mask matters: the full model answers differently somewhere.
    full = asyncio.run(_fire(app, [(prompt, None) for prompt in PROMPTS], 8, tokens))
    assert [json.loads(body)["choices"][0]["token_ids"] for _, _, body in full] != want


def test_200_mixed_requests_16_at_a_time_without_a_failure(
    app: App, reference: dict[tuple[int, int], str]
) -> None:
    rng = random.Random(0)
    picks = [(rng.randrange(len(PROMPTS)), rng.randrange(len(MASKS))) for _ in range(200)]
    results = asyncio.run(_fire(app, [(PROMPTS[p], MASKS[m]) for p, m in picks]))
    per_replica: Counter[str] = Counter()
    for pick, (status, replica, body) in zip(picks, results, strict=True):
        assert status == 200, body
        assert _text(body) == reference[pick]
        per_replica[replica] += 1
    assert len(per_replica) == 2 and min(per_replica.values()) >= 20, per_replica


def test_an_opt_out_reaches_every_replica_within_the_refresh_interval(app: App) -> None:
    """After the owner's opt-out, each replica stops using the expert within one refresh
    interval (plus a registry read and a request); the last answer that still used it is
    timed per replica."""
    set_policy(app.registry_url, "legal", Policy.opt_out)
    changed = time.monotonic()
    try:
        last_with: dict[str, float] = {}
        last_seen: dict[str, float] = {}
        while time.monotonic() - changed < 3.0 or len(last_seen) < 2:
            assert time.monotonic() - changed < 60, f"replicas seen: {last_seen}"
            for status, replica, body in asyncio.run(_fire(app, [(PROMPTS[1], None)] * 8, 8)):
                assert status == 200, body
                now = time.monotonic() - changed
                last_seen[replica] = now
                if "legal" in json.loads(body)["experts"]:
                    last_with[replica] = now
        assert len(last_seen) == 2
        assert max(last_with.values(), default=0.0) < TTL + 1.5, last_with
        r = app.complete(PROMPTS[1], {"include": ["legal"]})
        assert r.status_code == 403 and r.json()["error"]["unavailable"] == ["legal"]
    finally:
        set_policy(app.registry_url, "legal", Policy.opt_in)
    deadline = time.monotonic() + 10
    while True:  # both replicas use it again
        got = asyncio.run(_fire(app, [(PROMPTS[1], None)] * 8, 8))
        if {json.loads(b)["experts"] == ALL for _, _, b in got} == {True}:
            break
        assert time.monotonic() < deadline


def test_an_unreadable_registry_fails_closed_on_every_replica(app: App) -> None:
    db = app.registry_url.removeprefix("sqlite:///")
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, db, str(MAX_STALENESS + 8)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        time.sleep(MAX_STALENESS + 1.5)
        refused: Counter[str] = Counter()
        for status, replica, body in asyncio.run(_fire(app, [(PROMPTS[0], None)] * 16, 8)):
            assert status == 503, body
            assert "policy registry unreachable" in json.loads(body)["error"]["message"]
            refused[replica] += 1
        assert len(refused) == 2, refused
    finally:
        locker.wait(timeout=60)
    deadline = time.monotonic() + 15
    while {s for s, _, _ in asyncio.run(_fire(app, [(PROMPTS[0], None)] * 8, 8))} != {200}:
        assert time.monotonic() < deadline, "no recovery after the registry came back"
        time.sleep(0.5)


# Requests the middleware refuses before vLLM sees them: (path, body, key, extra headers). The
# headers are those Ray Serve's proxy itself acts on (no timeout, no abort on disconnect, one
# replica): the proxy has read them, and the replica's middleware refuses the request.
ATTACKS: list[tuple[str, Any, str | None, dict[str, str]]] = [
    ("/v1/completions", {**_body(PROMPTS[0]), "vllm_xargs": {"composer_allowed_experts": [0]}},
     "bob", {}),
    ("/v1/completions", {**_body(PROMPTS[0]), "use_beam_search": True, "n": 2}, "alice", {}),
    ("/v1/completions", _body(PROMPTS[0], {"include": ["code", "math"]}), "bob", {}),
    ("/v1/completions", _body(PROMPTS[0], {"include": ["nosuch"]}), "bob", {}),
    ("/v1/completions", _body(PROMPTS[0], {"exclude": ALL}), "alice", {}),
    ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "alice", {}),
    ("/v1/completions", _body(PROMPTS[0]), None, {}),
    ("/v1/models", None, None, {}),
    ("/v1/responses", {"model": "flexmix", "input": "hello"}, "alice", {}),
    ("/v1/completions", _body(PROMPTS[0]), "alice", {"x-request-timeout-seconds": "0"}),
    ("/v1/completions", _body(PROMPTS[0]), "alice", {"x-request-disconnect-disabled": "?1"}),
    ("/v1/completions", _body(PROMPTS[0]), "alice", {"serve_multiplexed_model_id": "m"}),
]  # fmt: skip


async def _send(
    client: httpx.AsyncClient, path: str, body: Any, key: str | None, extra: dict[str, str]
) -> httpx.Response:
    headers = {**_auth(key), **extra}
    if body is None:
        return await client.get(path, headers=headers)
    if isinstance(body, bytes):
        headers["content-type"] = "application/json"
        return await client.post(path, content=body, headers=headers)
    return await client.post(path, json=body, headers=headers)


def test_attacks_get_the_single_servers_answers(app: App) -> None:
    """Each refused request gets, through Ray, the status and body that the middleware gives
    in-process (what the single server answers), byte for byte; a restricted expert and an
    unknown one get the same 403."""
    from serve.middleware import ExpertsMiddleware, ServeSettings

    async def engine(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError(f"{scope['path']} reached the engine")

    settings = ServeSettings(model_path=str(app.model), api_keys=True,
                             registry_url=app.registry_url, policy_ttl=TTL,
                             policy_max_staleness=MAX_STALENESS)  # fmt: skip
    local = ExpertsMiddleware(engine, settings)

    async def both() -> list[tuple[httpx.Response, httpx.Response]]:
        transport = httpx.ASGITransport(app=local)  # type: ignore[arg-type]
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://x") as in_process,
            httpx.AsyncClient(base_url=app.base_url, timeout=120) as through_ray,
        ):
            return [
                (await _send(in_process, *attack), await _send(through_ray, *attack))
                for attack in ATTACKS
            ]

    try:
        answers = asyncio.run(both())
    finally:
        assert local.policy is not None
        local.policy.stop()
    for (path, _, _, extra), (want, got) in zip(ATTACKS, answers, strict=True):
        assert 400 <= want.status_code < 500, (path, want.text)
        assert (got.status_code, got.content) == (want.status_code, want.content), (path, extra)
    restricted = app.complete(PROMPTS[0], {"include": ["math"]}, key="bob")
    unknown = app.complete(PROMPTS[0], {"include": ["nosuch"]}, key="bob")
    assert restricted.status_code == unknown.status_code == 403
    assert restricted.text.replace("math", "X") == unknown.text.replace("nosuch", "X")


def test_a_second_server_on_the_cluster_is_refused(app: App) -> None:
    """Serve has one endpoint per cluster, and it keeps the options it was started with (a later
    `serve.start` only logs a warning): the proxy has the command's request timeout, and a second
    `composer serve --replicas` that asks for another port or timeout is refused before it
    announces an endpoint or a timeout the proxy does not have. Checked against the running
    cluster with the command's own check (a subprocess would cost an import of vLLM and Ray)."""
    from ray.serve.context import _get_global_client

    from registry.errors import ComposerError
    from serve.ray_app import _check_running_options
    from serve.replica_plan import ReplicaPlan

    assert _get_global_client().http_config.request_timeout_s == REQUEST_TIMEOUT
    same = ReplicaPlan(replicas=1, request_timeout_s=REQUEST_TIMEOUT)
    _check_running_options(same.http_options("127.0.0.1", app.port))  # the fixture's: accepted
    with pytest.raises(ComposerError) as refused:
        _check_running_options(ReplicaPlan(replicas=1).http_options("127.0.0.1", app.port + 1))
    assert (
        f"already runs with port={app.port}, request_timeout_s={REQUEST_TIMEOUT}, not "
        f"port={app.port + 1}, request_timeout_s=600.0" in str(refused.value)
    )
    # The running application and its two replicas were left alone.
    assert _replica_states() == {"RUNNING": 2}
    assert app.complete(PROMPTS[0]).status_code == 200


def _replica_states() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states)


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}"} if key else {}


def test_a_killed_replica_is_restarted_and_no_answer_is_wrong(
    app: App, reference: dict[tuple[int, int], str]
) -> None:
    """One replica's actor is killed while 16 requests at a time are in flight: each request
    gets the right answer, a clean 5xx or the proxy's 408 (counted), and Ray starts a new replica
    that then answers correctly. Runs last in this file: it costs an engine start."""
    import ray

    replicas = {r for _, r, _ in asyncio.run(_fire(app, [(PROMPTS[0], None)] * 16, 8))}
    assert len(replicas) == 2
    victim = sorted(replicas)[0]
    name = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#{victim}"
    actor = ray.get_actor(name, namespace="serve")
    rng = random.Random(1)
    picks = [(rng.randrange(len(PROMPTS)), rng.randrange(len(MASKS))) for _ in range(160)]

    async def load_and_kill() -> list[tuple[int, str, str]]:
        task = asyncio.ensure_future(_fire(app, [(PROMPTS[p], MASKS[m]) for p, m in picks]))
        await asyncio.sleep(1.5)  # requests are in flight on both replicas
        ray.kill(actor, no_restart=True)  # as a crash: Serve's controller replaces the replica
        return await task

    results = asyncio.run(load_and_kill())
    outcome: Counter[str] = Counter()
    for pick, (status, replica, body) in zip(picks, results, strict=True):
        if status == 200:
            assert _text(body) == reference[pick], (pick, replica)
            outcome["ok"] += 1
        else:  # 408: the proxy's request timeout ended a request the killed replica held
            clean = status == 408 or 500 <= status < 600
            assert clean and '"choices"' not in body, (status, body)
            outcome[f"{status}"] += 1
    print(f"requests while a replica was killed: {dict(outcome)}")
    assert outcome["ok"] >= len(picks) // 2, outcome
    # Ray brings a new replica up; every answer meanwhile comes right, from either replica.
    jobs = [(PROMPTS[p], MASKS[m]) for p in range(len(PROMPTS)) for m in range(len(MASKS))]
    picks = [(p, m) for p in range(len(PROMPTS)) for m in range(len(MASKS))]
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + 600
    while len(seen.keys() - {victim}) < 2:
        assert time.monotonic() < deadline, f"no replacement replica: {seen}"
        results = asyncio.run(_fire(app, jobs, 8))
        for pick, (status, replica, body) in zip(picks, results, strict=True):
            if status != 200:  # the proxy may still be learning that the victim is gone
                assert status == 408 or 500 <= status < 600, (status, body)
                outcome[f"{status} after"] += 1
                continue
            assert _text(body) == reference[pick], (pick, replica)
            seen[replica] += 1
        time.sleep(1)
    assert victim not in seen, seen
    print(f"until the new replica answered: {dict(outcome)}")
    assert _replica_states() == {"RUNNING": 2}
