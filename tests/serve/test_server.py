"""The real server (vLLM OpenAI server + experts middleware) in a subprocess, with a real
SQLite registry: openai client, raw HTTP, streaming, policy, errors and a bounded load test."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from composer.tiny_moe import make_tiny_moe
from registry.models import Policy
from tests.serve.server_fixtures import KEYS, Server, make_registry, set_policy, start_server

pytestmark = pytest.mark.slow

ALL = ["public", "code", "legal", "math"]
PROMPTS = [[5, 6, 7, 8, 9, 10], [30, 31, 32, 33], [100, 101, 102], [7, 9, 11, 13, 15, 17, 19]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_moe(root / "flexmix", "flexolmo")
    url = make_registry(root / "registry.db", model)
    server = start_server(model, root / "server.log", api_keys=True, registry_url=url)
    yield server, url
    server.stop()


def post(server: Server, path: str, body: Any, key: str | None = "alice") -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[key]}"} if key else {}
    if isinstance(body, bytes | str):
        headers["content-type"] = "application/json"
        return httpx.post(server.base_url + path, content=body, headers=headers, timeout=60)
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


def complete(server: Server, prompt: list[int], experts: Any = None, key: str = "alice") -> Any:
    body: dict[str, Any] = {"model": "flexmix", "prompt": prompt, "max_tokens": 8}
    body["temperature"] = 0.0
    if experts is not None:
        body["experts"] = experts
    return post(server, "/v1/completions", body, key)


def test_openai_client_completions_and_streaming_chat(stack: tuple[Server, str]) -> None:
    from openai import OpenAI

    server, _ = stack
    client = OpenAI(base_url=server.base_url + "/v1", api_key=KEYS["alice"])
    assert [m.id for m in client.models.list().data] == ["flexmix"]
    raw = client.completions.with_raw_response.create(
        model="flexmix", prompt=PROMPTS[0], max_tokens=8, temperature=0,
        extra_body={"experts": {"exclude": ["legal"]}},
    )  # fmt: skip
    assert raw.headers["x-composer-experts"] == "public,code,math"
    resp = raw.parse()
    assert resp.experts == ["public", "code", "math"]  # type: ignore[attr-defined]
    assert resp.usage is not None and resp.usage.completion_tokens == 8
    # Same mask spelled with include: same answer.
    inc = client.completions.create(
        model="flexmix", prompt=PROMPTS[0], max_tokens=8, temperature=0,
        extra_body={"experts": {"include": ["public", "code", "math"]}},
    )  # fmt: skip
    assert inc.choices[0].text == resp.choices[0].text

    stream = client.chat.completions.create(
        model="flexmix", messages=[{"role": "user", "content": "hello world"}],
        max_tokens=6, temperature=0, stream=True, extra_body={"experts": {"include": ["code"]}},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks and all(c.experts == ["code"] for c in chunks)  # type: ignore[attr-defined]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="flexmix", messages=[{"role": "user", "content": "hello world"}],
        max_tokens=6, temperature=0, extra_body={"experts": {"include": ["code"]}},
    )  # fmt: skip
    assert whole.experts == ["code"]  # type: ignore[attr-defined]
    assert whole.choices[0].message.content == streamed


def test_masks_change_the_answer(stack: tuple[Server, str]) -> None:
    server, _ = stack
    texts = {
        tuple(m): [
            complete(server, p, {"include": m}).json()["choices"][0]["text"] for p in PROMPTS
        ]
        for m in (ALL, ["public"], ["code", "math"])
    }
    assert len({tuple(v) for v in texts.values()}) == 3


def test_bad_requests_get_4xx_and_the_server_stays_up(stack: tuple[Server, str]) -> None:
    server, _ = stack
    r = complete(server, PROMPTS[0], {"exclude": ["nope"]})
    assert r.status_code == 403
    assert r.json()["error"]["unavailable"] == ["nope"]
    assert r.json()["error"]["available"] == ALL
    assert complete(server, PROMPTS[0], {"exclude": ALL}).status_code == 400
    assert complete(server, PROMPTS[0], {"include": []}).status_code == 400
    assert complete(server, PROMPTS[0], {"only": ["code"]}).status_code == 400
    assert (
        complete(server, PROMPTS[0], {"include": ["code"], "exclude": ["legal"]}).status_code == 400
    )
    assert complete(server, PROMPTS[0], "code").status_code == 400
    assert post(server, "/v1/completions", b"{not json").status_code == 400
    assert post(server, "/v1/completions", b"[1, 2]").status_code == 400
    assert post(server, "/v1/completions", {"model": "flexmix", "prompt": 3}).status_code == 400
    body = {"model": "flexmix", "prompt": [1], "vllm_xargs": "x"}
    assert post(server, "/v1/completions", body).status_code == 400
    # Keys: missing or invalid -> 401, everywhere under /v1; /health and /metrics stay open.
    assert complete(server, PROMPTS[0], key=None).status_code == 401  # type: ignore[arg-type]
    bad = {"Authorization": "Bearer ck_wrong"}
    assert httpx.get(server.base_url + "/v1/models", headers=bad).status_code == 401
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert "vllm" in httpx.get(server.base_url + "/metrics").text
    # Endpoints that would run the model without the mask are not exposed.
    assert post(server, "/v1/responses", {"model": "flexmix", "input": "hello"}).status_code == 404
    assert complete(server, PROMPTS[0]).status_code == 200


def test_policy_is_enforced_by_the_server(stack: tuple[Server, str]) -> None:
    server, url = stack
    # alice's key lists the restricted "math"; bob's lists nothing, so no "math" for bob;
    # carol's lists only "code".
    assert complete(server, PROMPTS[1], key="alice").json()["experts"] == ALL
    assert complete(server, PROMPTS[1], key="bob").json()["experts"] == ["public", "code", "legal"]
    assert complete(server, PROMPTS[1], key="carol").json()["experts"] == ["public", "code"]
    r = complete(server, PROMPTS[1], {"include": ["code", "math"]}, key="bob")
    assert r.status_code == 403 and r.json()["error"]["unavailable"] == ["math"]
    assert r.json()["error"]["available"] == ["public", "code", "legal"]  # never "math"
    # A client cannot smuggle a mask past the policy through vllm_xargs: refused.
    body = {"model": "flexmix", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    smuggled = post(server, "/v1/completions", {**body, "vllm_xargs": {
        "composer_allowed_experts": [0, 1, 2, 3]}}, key="bob")  # fmt: skip
    assert smuggled.status_code == 400 and smuggled.json()["error"]["field"] == "vllm_xargs"
    # The owner of "legal" opts out: within 5 s nobody gets it, without a restart.
    set_policy(url, "legal", Policy.opt_out)
    try:
        _wait_for_experts(server, "alice", ["public", "code", "math"])
        bob_after = complete(server, PROMPTS[1], key="bob").json()
        assert bob_after["experts"] == ["public", "code"]
        explicit = complete(server, PROMPTS[1], {"include": ["public", "code"]}, key="alice")
        assert bob_after["choices"][0]["text"] == explicit.json()["choices"][0]["text"]
        r = complete(server, PROMPTS[1], {"include": ["legal"]}, key="alice")
        assert r.status_code == 403 and r.json()["error"]["unavailable"] == ["legal"]
        # Naming it at all is refused like a name that never existed (no oracle).
        assert complete(server, PROMPTS[1], {"exclude": ["legal"]}).status_code == 403
    finally:
        set_policy(url, "legal", Policy.opt_in)
        _wait_for_experts(server, "alice", ALL)


def _wait_for_experts(server: Server, key: str, want: list[str], within: float = 5.0) -> float:
    """Seconds until a plain request with `key` reports `want` (fails after `within`)."""
    t0 = time.monotonic()
    while complete(server, PROMPTS[1], key=key).json()["experts"] != want:
        assert time.monotonic() - t0 < within, f"policy not applied within {within} s"
        time.sleep(0.2)
    return time.monotonic() - t0


MASKS: list[dict[str, list[str]] | None] = [
    None, {"exclude": ["legal"]}, {"include": ["code"]}, {"include": ["public", "math"]},
    {"exclude": ["public", "code"]},
]  # fmt: skip
MALFORMED: list[Any] = [
    b"{oops", {"experts": {"exclude": ["nope"]}}, {"experts": {"exclude": ALL}},
    {"experts": {"include": ["code"], "exclude": ["math"]}}, {"experts": 5}, {"prompt": {}},
]  # fmt: skip


def test_load_200_requests_16_at_a_time(stack: tuple[Server, str]) -> None:
    server, _ = stack
    # Reference answers, one request at a time.
    want = {
        (p, m): complete(server, PROMPTS[p], MASKS[m]).json()["choices"][0]["text"]
        for p in range(len(PROMPTS))
        for m in range(len(MASKS))
    }
    rng = random.Random(0)
    jobs: list[tuple[str, Any]] = []
    for i in range(216):
        if i % 18 == 17:
            jobs.append(("bad", MALFORMED[(i // 18) % len(MALFORMED)]))
        else:
            jobs.append(("ok", (rng.randrange(len(PROMPTS)), rng.randrange(len(MASKS)))))
    results = asyncio.run(_fire(server, jobs, concurrency=16))
    n_ok = n_bad = 0
    for (kind, job), (status, body) in zip(jobs, results, strict=True):
        if kind == "ok":
            assert status == 200, body
            assert json.loads(body)["choices"][0]["text"] == want[job]
            n_ok += 1
        else:
            assert 400 <= status < 500, (job, status, body)
            n_bad += 1
    assert n_ok >= 200 and n_bad >= 12
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert server.proc.poll() is None


async def _fire(
    server: Server, jobs: list[tuple[str, Any]], concurrency: int
) -> list[tuple[int, bytes]]:
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:

        async def one(kind: str, job: Any) -> tuple[int, bytes]:
            if kind == "ok":
                p, m = job
                body: Any = {"model": "flexmix", "prompt": PROMPTS[p], "max_tokens": 8}
                body["temperature"] = 0.0
                if MASKS[m] is not None:
                    body["experts"] = MASKS[m]
                data = json.dumps(body).encode()
            elif isinstance(job, bytes):
                data = job
            else:
                data = json.dumps({"model": "flexmix", "prompt": [1, 2], **job}).encode()
            async with sem:
                r = await client.post("/v1/completions", content=data, headers=headers)
                return r.status_code, r.content

        return await asyncio.gather(*(one(k, j) for k, j in jobs))
