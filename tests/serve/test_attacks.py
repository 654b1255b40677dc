"""Black-box attacks on a live `composer serve` (a real subprocess of the CLI) of a
registry-backed build, with API keys on: each test tries what an adversarial client, a careless
operator or a failing registry would do, and asserts the safe behaviour.

The build (tests/serve/registry_builds.py): public base + alpha@1 (alpha@2 exists) + beta
renamed b2 + secret (restricted) + withdrawn (opted out after the build). docs/serving.md,
"Threat model", lists what each test covers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Cli
from tests.serve.registry_builds import guarded_build, set_policy
from tests.serve.server_fixtures import LOCKER, VLLM_TEST_ARGS, Server, free_port, launch

pytestmark = pytest.mark.slow

MODEL = "guarded"
PROMPT = [5, 6, 7, 8, 9, 10]
LONG = [(17 * i + 3) % 250 + 3 for i in range(80)]  # more than two 32-token KV blocks
MAX_STALENESS = 4.0
TTL = 0.5


@dataclass
class Live:
    server: Server
    cli: Cli
    db: Path
    keys: dict[str, str]  # key name -> secret

    def post(self, path: str, body: Any, key: str | None = "full", **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        if isinstance(body, bytes | str):
            headers["content-type"] = "application/json"
            return httpx.post(self.server.base_url + path, content=body, headers=headers, **kw)
        return httpx.post(self.server.base_url + path, json=body, headers=headers, timeout=60)

    def complete(self, experts: Any = None, key: str = "full", **extra: Any) -> httpx.Response:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.0, **extra}
        if experts is not None:
            body["experts"] = experts
        return self.post("/v1/completions", body, key)

    def set_policy(self, ref: str, policy: str) -> None:
        set_policy(self.cli, ref, policy)

    def wait_for(self, want: str, key: str = "full", within: float = 5.0) -> None:
        """Until a default request reports `want` as x-composer-experts."""
        t0 = time.monotonic()
        while (got := self.complete(key=key).headers.get("x-composer-experts")) != want:
            assert time.monotonic() - t0 < within, f"got {got!r}, want {want!r}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("attacks")
    db = root / "home" / "registry.db"
    cli = Cli(home=root / "home", db_url=f"sqlite:///{db}")
    cli("registry", "init")
    guarded_build(cli, root, max_positions=2048)
    cli("registry", "restrict", "secret", "--owner", "acme")
    cli("registry", "opt-out", "withdrawn", "--owner", "acme")
    keys = {}
    for name, allow in (("full", ["alpha", "beta", "secret", "withdrawn"]), ("plain", []),
                        ("doomed", [])):  # fmt: skip
        args = [a for e in allow for a in ("--allow", e)]
        keys[name] = json.loads(cli("keys", "create", name, *args, "--json").stdout)["key"]
    port = free_port()
    cmd = [
        sys.executable, "-m", "cli.main", "serve", MODEL, "--port", str(port),
        "--api-keys", "on", "--served-model-name", MODEL, "--policy-ttl", str(TTL),
        "--policy-max-staleness", str(MAX_STALENESS), "--",
        *VLLM_TEST_ARGS, "--max-model-len", "2048", "--enable-prompt-tokens-details",
    ]  # fmt: skip
    server = launch(cmd, port, root / "server.log", cli.env, timeout=300)
    yield Live(server, cli, db, keys)
    server.stop()


def test_the_build_is_served_under_its_registry_policy(live: Live) -> None:
    r = live.complete()
    assert r.status_code == 200
    assert r.headers["x-composer-experts"] == "public,alpha,b2,secret"  # withdrawn: opted out
    assert live.complete(key="plain").headers["x-composer-experts"] == "public,alpha,b2"
    health = httpx.get(live.server.base_url + "/health").json()
    assert health["policy"]["fresh"] and health["policy"]["max_staleness_s"] == MAX_STALENESS
    assert health["moe_backend"] == "vllm"  # auto on CPU: vLLM's fused MoE, measured faster


def test_beam_search_is_refused_not_run_with_every_expert(live: Live) -> None:
    """vLLM runs beam search with fresh sampling params that carry no mask."""
    r = live.complete({"include": ["public"]}, use_beam_search=True, n=2)
    assert r.status_code == 400 and r.json()["error"]["field"] == "use_beam_search"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4, "use_beam_search": True}  # fmt: skip
    r = live.post("/v1/chat/completions", chat)
    assert r.status_code == 400 and r.json()["error"]["field"] == "use_beam_search"
    assert live.complete({"include": ["public"]}).status_code == 200


def test_an_opt_out_reaches_an_expert_the_spec_renamed(live: Live) -> None:
    live.set_policy("beta", "opt_out")
    try:
        live.wait_for("public,alpha,secret")
        assert live.complete({"include": ["b2"]}).status_code == 403
    finally:
        live.set_policy("beta", "opt_in")
        live.wait_for("public,alpha,b2,secret")


def test_policies_bind_to_the_version_the_build_used(live: Live) -> None:
    live.set_policy("alpha@2", "opt_out")  # the newest version, which the build did not use
    try:
        time.sleep(3 * TTL)
        assert live.complete().headers["x-composer-experts"] == "public,alpha,b2,secret"
        live.set_policy("alpha@2", "opt_in")
        live.set_policy("alpha@1", "opt_out")  # the version the build used
        live.wait_for("public,b2,secret")
    finally:
        live.set_policy("alpha", "opt_in")
        live.wait_for("public,alpha,b2,secret")


def test_a_client_salt_cannot_plant_cache_blocks_for_another_mask(live: Live) -> None:
    """The old server salted a mask with `composer-experts-` + a hash of its names, and passed a
    client's salt verbatim for full-model requests: a client could pre-fill that mask's KV
    blocks with every expert active. Now the server's keyed salt always comes first."""
    guesses = [
        "composer-experts-" + hashlib.sha256(b"public").hexdigest()[:16],
        "composer-experts-" + hashlib.sha256(b"0").hexdigest()[:16],
    ]
    live.set_policy("withdrawn", "opt_in")  # the attacker's key now reaches every expert
    try:
        live.wait_for("public,alpha,b2,secret,withdrawn")
        body = {"model": MODEL, "prompt": LONG + [1], "max_tokens": 2, "temperature": 0.0}
        for salt in guesses:
            assert live.post("/v1/completions", {**body, "cache_salt": salt}).status_code == 200
        victim = {**body, "prompt": LONG + [2], "experts": {"include": ["public"]}}
        first = live.post("/v1/completions", victim).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # The same mask still shares its own blocks (the salt separates, it does not disable).
        again = live.post("/v1/completions", {**victim, "prompt": LONG + [3]}).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    finally:
        live.set_policy("withdrawn", "opt_out")
        live.wait_for("public,alpha,b2,secret")


def test_errors_reveal_no_expert_the_key_cannot_use(live: Live) -> None:
    answers = {}
    for name in ("secret", "withdrawn", "nosuch"):
        for field in ("include", "exclude"):
            r = live.complete({field: [name]}, key="plain")
            assert "secret" not in r.text.replace(name, "X")
            assert "withdrawn" not in r.text.replace(name, "X")
            answers[name, field] = (r.status_code, r.text.replace(name, "X"))
    for field in ("include", "exclude"):
        assert answers["secret", field] == answers["nosuch", field] == answers["withdrawn", field]
        assert answers["nosuch", field][0] == 403


def test_the_experts_header_obeys_the_same_policy(live: Live) -> None:
    """X-Composer-Experts (for clients that cannot add body fields) has the body's rules."""
    headers = {"Authorization": f"Bearer {live.keys['plain']}"}
    url = live.server.base_url + "/v1/completions"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.0}

    def with_header(value: str) -> httpx.Response:
        return httpx.post(url, json=body, headers={**headers, "X-Composer-Experts": value})

    r = with_header("include=public,alpha")
    assert r.status_code == 200 and r.headers["x-composer-experts"] == "public,alpha"
    field = live.complete({"include": ["public", "alpha"]}, key="plain").json()
    assert r.json()["choices"] == field["choices"]
    for name in ("secret", "withdrawn", "nosuch"):  # restricted, opted out, unknown: one answer
        r = with_header(f"include={name}")
        assert r.status_code == 403 and name not in str(r.json()["error"]["available"])
    assert with_header("exclude=b2").headers["x-composer-experts"] == "public,alpha"


@pytest.mark.parametrize(
    "body, status",
    [
        ({"vllm_xargs": {"kv_transfer_params": "x"}}, 400),
        ({"kv_transfer_params": "x"}, 400),
        ({"vllm_xargs": {"composer_allowed_experts": [0, 1, 2, 3, 4]}}, 400),
        ({"request_id": "fixed-id"}, 400),
        ({"logits_processors": ["builtins.print"]}, 400),
    ],
)
def test_smuggled_fields_are_refused(live: Live, body: dict[str, Any], status: int) -> None:
    r = live.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, **body})
    assert r.status_code == status and "field" in r.json()["error"]


def test_hostile_bodies_get_4xx_and_the_server_stays_up(live: Live) -> None:
    deep = b'{"model": "guarded", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert live.post("/v1/completions", deep, timeout=60).status_code == 400
    huge = json.dumps({"model": MODEL, "prompt": "w9 " * (4 << 20)})  # 12 MiB
    assert live.post("/tokenize", huge, timeout=60).status_code == 413
    assert live.post("/v1/chat/completions", huge, timeout=60).status_code == 413
    assert live.post("/tokenize", {"model": MODEL, "prompt": "hello world"}).status_code == 200
    assert live.complete().status_code == 200


def test_a_revoked_key_is_refused(live: Live) -> None:
    assert live.complete(key="doomed").status_code == 200
    live.cli("keys", "revoke", "doomed")
    t0 = time.monotonic()
    while live.complete(key="doomed").status_code != 401:
        assert time.monotonic() - t0 < 5.0
        time.sleep(0.2)


def _metrics(server: Server) -> dict[str, float]:
    """vLLM's Prometheus samples, summed per name (+ `{finished_reason}` for request_success)."""
    out: dict[str, float] = {}
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        m = re.match(r"^(vllm:\w+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if not m:
            continue
        name = m[1]
        reason = re.search(r'finished_reason="(\w+)"', m[2] or "")
        if reason:
            name += "{" + reason[1] + "}"
        out[name] = out.get(name, 0.0) + float(m[3])
    return out


def test_a_client_that_leaves_stops_its_generation(live: Live) -> None:
    """A streamed and a plain request whose clients leave are aborted: vLLM stops running them
    (its client aborts are not counted in request_success), they never finish by length, and
    far fewer tokens are generated than the two requests asked for."""
    before = _metrics(live.server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1900, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {live.keys['full']}"}
    with httpx.stream("POST", live.server.base_url + "/v1/completions", headers=headers,
                      json={**body, "stream": True}, timeout=60) as r:  # fmt: skip
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # generation runs; now the client leaves
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.server.base_url + "/v1/completions", json=body, headers=headers,
                   timeout=1.0)  # fmt: skip
    t0 = time.monotonic()
    while _metrics(live.server)["vllm:num_requests_running"] > 0:
        assert time.monotonic() - t0 < 5.0, "abandoned requests still running"
        time.sleep(0.2)
    time.sleep(2.0)
    after = _metrics(live.server)
    assert after["vllm:num_requests_running"] == 0
    assert (
        after["vllm:request_success_total{length}"] == before["vllm:request_success_total{length}"]
    )
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < 1900, generated  # two requests of 1900 tokens each, both cut short


async def _burst(live: Live, n: int) -> list[tuple[int, float]]:
    headers = {"Authorization": f"Bearer {live.keys['full']}"}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0.0}
    async with httpx.AsyncClient(base_url=live.server.base_url, timeout=120) as client:

        async def one() -> tuple[int, float]:
            t0 = time.monotonic()
            r = await client.post("/v1/completions", json=body, headers=headers)
            return r.status_code, time.monotonic() - t0

        return await asyncio.gather(*(one() for _ in range(n)))


def test_a_locked_registry_neither_stalls_requests_nor_serves_stale_policy(live: Live) -> None:
    """The registry is locked by another process for 10 s while 16 requests arrive: none waits
    on it; past the staleness limit the server answers 503 naming the cause, and recovers."""
    healthy = asyncio.run(_burst(live, 16))
    assert all(s == 200 for s, _ in healthy)
    one_generation = max(t for _, t in healthy)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(live.db), "10"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        locked_at = time.monotonic()
        during = asyncio.run(_burst(live, 16))
        assert all(s == 200 for s, _ in during), during  # the last good policy still decides
        assert max(t for _, t in during) < 2.0 + one_generation  # reader timeout + a generation
        while (r := live.complete()).status_code != 503:
            assert time.monotonic() - locked_at < MAX_STALENESS + 3.0, "stale policy still used"
            time.sleep(0.2)
        assert "policy registry unreachable" in r.json()["error"]["message"]
        assert "locked" in r.json()["error"]["message"]
        health = httpx.get(live.server.base_url + "/health")
        assert health.status_code == 503 and not health.json()["policy"]["fresh"]
    finally:
        locker.wait(timeout=30)
    t0 = time.monotonic()
    while live.complete().status_code != 200:
        assert time.monotonic() - t0 < 5.0, "no recovery after the registry came back"
        time.sleep(0.2)
    assert httpx.get(live.server.base_url + "/health").status_code == 200
