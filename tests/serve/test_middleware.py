"""The experts middleware in process, in front of a real Starlette app that echoes what it got.

Checks the exact body vLLM would receive (explicit mask, keyed salt), the allow-list of request
fields, body limits, policy staleness (503, /health), disconnects reaching the app, and the
response rewriting, including server-sent events split at awkward places."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from registry.composition import SlotBinding
from registry.models import Policy
from registry.policy_snapshot import PolicySnapshot, VersionPolicy
from serve.experts import cache_salt
from serve.masking import MASK_KEY
from serve.middleware import MAX_BODY, ExpertsMiddleware, ServeSettings
from serve.policy import PolicyRefresher

NAMES = ["public", "code", "legal", "math"]


async def echo(request: Request) -> Response:
    body = await request.json()
    if not body.get("stream"):
        return JSONResponse({"received": body})
    events = (
        b"".join(b"data: " + json.dumps({"i": i}).encode() + b"\n\n" for i in range(3))
        + b"data: [DONE]\n\n"
    )

    async def pieces():  # type: ignore[no-untyped-def]
        for start in range(0, len(events), 7):  # cuts events mid-line
            yield events[start : start + 7]

    return StreamingResponse(pieces(), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return Response(status_code=200)


ROUTES = [
    Route("/v1/completions", echo, methods=["POST"]),
    Route("/v1/chat/completions", echo, methods=["POST"]),
    Route("/tokenize", echo, methods=["POST"]),
    Route("/health", health),
]


def _middleware(tmp_path: Path) -> ExpertsMiddleware:
    (tmp_path / "config.json").write_text(json.dumps({"composer_experts": NAMES}))
    settings = ServeSettings(model_path=str(tmp_path), moe_backend="vllm")
    return ExpertsMiddleware(Starlette(routes=ROUTES), settings)


@pytest.fixture
def mw(tmp_path: Path) -> ExpertsMiddleware:
    return _middleware(tmp_path)


@pytest.fixture
def client(mw: ExpertsMiddleware) -> TestClient:
    return TestClient(mw)


def test_body_carries_explicit_mask_and_keyed_salt(
    client: TestClient, mw: ExpertsMiddleware
) -> None:
    r = client.post(
        "/v1/completions",
        json={"prompt": [1], "experts": {"exclude": ["legal"]}, "cache_salt": "mine"},
    )
    assert r.status_code == 200
    got = r.json()["received"]
    assert "experts" not in got
    assert got["vllm_xargs"] == {MASK_KEY: [0, 1, 3]}
    assert got["cache_salt"] == f"{cache_salt([0, 1, 3], mw.salt_secret)}:mine"
    assert r.json()["experts"] == ["public", "code", "math"]
    assert r.headers["x-composer-experts"] == "public,code,math"


def test_the_full_model_is_an_explicit_mask_too(client: TestClient, mw: ExpertsMiddleware) -> None:
    got = client.post("/v1/completions", json={"prompt": [1]}).json()
    assert got["received"]["vllm_xargs"] == {MASK_KEY: [0, 1, 2, 3]}
    assert got["received"]["cache_salt"] == cache_salt([0, 1, 2, 3], mw.salt_secret)
    assert got["experts"] == NAMES


def test_every_stream_event_reports_the_experts(client: TestClient) -> None:
    r = client.post(
        "/v1/completions", json={"prompt": [1], "stream": True, "experts": {"include": ["code"]}}
    )
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:]) for e in events[:-1]] == [
        {"i": i, "experts": ["code"]} for i in range(3)
    ]


def test_errors_are_json_and_never_reach_the_app(client: TestClient) -> None:
    r = client.post(
        "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = client.post("/v1/completions", json={"experts": {"exclude": ["x"]}})
    assert r.status_code == 403 and r.json()["error"]["available"] == NAMES


@pytest.mark.parametrize(
    "name, value",
    [
        ("x-request-timeout-seconds", "0"),
        ("X-Request-Disconnect-Disabled", "?1"),
        ("x_request_disconnect_disabled", "?1"),
        ("serve-multiplexed-model-id", "a"),
        ("x-session-id", "sticky"),
    ],
)
def test_headers_that_steer_the_proxy_are_refused(
    client: TestClient, name: str, value: str
) -> None:
    """Ray Serve's proxy would act on these (no timeout, no abort on disconnect, one replica):
    every server refuses them by name, whatever the spelling, before the app sees the request."""
    for path in ("/v1/completions", "/tokenize"):
        r = client.post(path, json={"prompt": [1]}, headers={name: value})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["header"] == name.lower()
        assert "received" not in r.json()
    assert client.post("/v1/completions", json={"prompt": [1]},
                       headers={"x-request-id": "mine"}).status_code == 200  # fmt: skip


def test_endpoints_that_would_bypass_the_mask_are_closed(client: TestClient) -> None:
    for path in ("/v1/responses", "/v1/messages", "/inference/v1/generate", "/v1/completions/"):
        assert client.post(path, json={"input": "x"}).status_code == 404


@pytest.mark.parametrize(
    "path, extra, field",
    [
        ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
        ("/v1/chat/completions", {"use_beam_search": True}, "use_beam_search"),
        ("/v1/completions", {"kv_transfer_params": "x"}, "kv_transfer_params"),
        ("/v1/completions", {"ec_transfer_params": {}}, "ec_transfer_params"),
        ("/v1/completions", {"vllm_xargs": {MASK_KEY: [0, 1, 2, 3]}}, "vllm_xargs"),
        ("/v1/completions", {"vllm_xargs": {"other": 1}}, "vllm_xargs"),
        ("/v1/completions", {"vllm_xargs": "x"}, "vllm_xargs"),
        ("/v1/completions", {"prompt_embeds": "AAAA"}, "prompt_embeds"),
        ("/v1/completions", {"request_id": "fixed"}, "request_id"),
        ("/v1/chat/completions", {"chat_template": "{{ 1 }}"}, "chat_template"),
        ("/v1/completions", {"logits_processors": ["os.system"]}, "logits_processors"),
        ("/v1/completions", {"cache_salt": ""}, "cache_salt"),
        ("/v1/completions", {"cache_salt": 5}, "cache_salt"),
        ("/tokenize", {"chat_template": "x"}, "chat_template"),
    ],
)
def test_fields_outside_the_allow_list_are_refused_by_name(
    client: TestClient, path: str, extra: dict[str, Any], field: str
) -> None:
    base = {"/v1/chat/completions": {"messages": []}}.get(path, {"prompt": [1]})
    r = client.post(path, json={"model": "m", **base, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field
    assert field in r.json()["error"]["message"]


def test_use_beam_search_false_is_harmless(client: TestClient) -> None:
    assert client.post("/v1/completions", json={"prompt": [1], "use_beam_search": False}).is_success


def test_deeply_nested_json_is_a_400_not_a_500(client: TestClient) -> None:
    for depth in (40, 100_000):
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        r = client.post("/v1/completions", content=body)
        assert r.status_code == 400, depth


def test_bodies_over_the_limit_are_refused_on_every_post_path(client: TestClient) -> None:
    big = json.dumps({"model": "m", "prompt": "x" * (MAX_BODY + 1)})
    for path in ("/tokenize", "/v1/completions", "/v1/chat/completions"):
        assert client.post(path, content=big).status_code == 413
    # Streamed without a length: counted as it arrives.
    chunks = iter([big[i : i + 65536].encode() for i in range(0, len(big), 65536)])
    assert client.post("/tokenize", content=chunks).status_code == 413


def test_tokenize_bodies_are_checked_and_passed_on(client: TestClient) -> None:
    r = client.post("/tokenize", json={"model": "m", "prompt": "hi"})
    assert r.status_code == 200 and r.json() == {"received": {"model": "m", "prompt": "hi"}}


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _governed(mw: ExpertsMiddleware, read: Any, clock: _Clock) -> PolicyRefresher:
    """Bind `code` to registry version 11 and put a refresher with a fake clock in front."""
    mw.bindings = [
        SlotBinding(0, "public", "base"),
        SlotBinding(1, "code", "ffn", version_id=11, sha256="c" * 64),
        SlotBinding(2, "legal", "unbound"),
        SlotBinding(3, "math", "unbound"),
    ]
    mw.policy = PolicyRefresher(read, interval=1.0, max_staleness=5.0, clock=clock)
    mw.policy.refresh()
    return mw.policy


def test_stale_policy_fails_closed_with_503_and_unhealthy(mw: ExpertsMiddleware) -> None:
    clock, state = _Clock(), {"fail": False}

    def read() -> PolicySnapshot:
        if state["fail"]:
            raise OSError("database is locked")
        v = VersionPolicy(11, 1, "code@1", "c" * 64, Policy.opt_in)
        return PolicySnapshot(versions={11: v})

    policy = _governed(mw, read, clock)
    client = TestClient(mw)
    h = client.get("/health")
    assert (
        h.status_code == 200 and h.json()["policy"]["fresh"] and h.json()["moe_backend"] == "vllm"
    )
    state["fail"] = True
    clock.now += 4.0
    assert not policy.refresh()
    # Within the staleness limit the last good snapshot still decides.
    assert client.post("/v1/completions", json={"prompt": [1]}).json()["experts"] == NAMES
    clock.now += 2.0
    r = client.post("/v1/completions", json={"prompt": [1]})
    assert r.status_code == 503
    assert "limit 5 s" in r.json()["error"]["message"] and "database is locked" in r.text
    h = client.get("/health")
    assert (
        h.status_code == 503 and h.json()["policy"]["last_error"] == "OSError: database is locked"
    )
    state["fail"] = False
    assert policy.refresh()
    assert client.post("/v1/completions", json={"prompt": [1]}).status_code == 200
    assert client.get("/health").status_code == 200


def test_no_successful_read_means_503_not_all_experts(mw: ExpertsMiddleware) -> None:
    def read() -> PolicySnapshot:
        raise OSError("no such table")

    _governed(mw, read, _Clock())
    assert TestClient(mw).post("/v1/completions", json={"prompt": [1]}).status_code == 503


def test_retries_back_off_up_to_a_quarter_of_the_staleness_limit() -> None:
    def read() -> PolicySnapshot:
        raise OSError("down")

    p = PolicyRefresher(read, interval=1.0, max_staleness=20.0)
    delays = []
    for _ in range(6):
        p.refresh()
        delays.append(p._delay())
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_a_disconnect_after_the_body_reaches_the_app(mw: ExpertsMiddleware) -> None:
    """vLLM aborts a request when its `receive` reports http.disconnect; the rewritten body
    must not hide that message."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((await receive())["type"])
        seen.append((await receive())["type"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw.app = app
    messages = iter([
        {"type": "http.request", "body": b'{"prompt": [1]}', "more_body": False},
        {"type": "http.disconnect"},
    ])  # fmt: skip

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": []}
    asyncio.run(mw(scope, receive, send))
    assert seen == ["http.request", "http.disconnect"]


def test_the_experts_header_follows_the_body_field_rules(client: TestClient) -> None:
    def post(header: str | list[str] | None, body: dict[str, Any] | None = None) -> Any:
        headers = [("x-composer-experts", h) for h in ([header] if isinstance(header, str) else
                   header or [])]  # fmt: skip
        return client.post("/v1/completions", json={"prompt": [1], **(body or {})},
                           headers=headers)  # fmt: skip

    r = post("include=code, math")
    assert r.status_code == 200 and r.json()["experts"] == ["code", "math"]
    assert r.json()["received"]["vllm_xargs"] == {MASK_KEY: [1, 3]}
    assert post("EXCLUDE=legal").json()["experts"] == ["public", "code", "math"]
    # The same refusals as the field: unknown names, nothing left, malformed.
    assert post("include=nope").status_code == 403
    assert post("include=").status_code == 400
    assert post("exclude=public,code,legal,math").status_code == 400
    for bad in ("code", "only=code", "include"):
        r = post(bad)
        assert r.status_code == 400 and "X-Composer-Experts" in r.json()["error"]["message"]
    # Given twice (two headers, or header and field): refused rather than guessed.
    assert post(["include=code", "include=math"]).status_code == 400
    assert post("include=code", {"experts": {"include": ["code"]}}).status_code == 400
