"""The experts middleware in process, in front of a real Starlette app that echoes what it got.

Checks the exact body vLLM would receive (mask, salt, stripped client xargs) and the response
rewriting, including server-sent events split at awkward places."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve.experts import cache_salt
from serve.masking import MASK_KEY
from serve.middleware import ExpertsMiddleware, ServeSettings

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


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    (tmp_path / "config.json").write_text(json.dumps({"composer_experts": NAMES}))
    app = Starlette(routes=[Route("/v1/completions", echo, methods=["POST"])])
    settings = ServeSettings(model_path=str(tmp_path))
    return TestClient(ExpertsMiddleware(app, settings))


def test_body_carries_mask_and_salt_and_drops_client_masks(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={
            "prompt": [1],
            "experts": {"exclude": ["legal"]},
            "vllm_xargs": {MASK_KEY: [2], "other": 1},
            "cache_salt": "mine",
        },
    )
    assert r.status_code == 200
    got = r.json()["received"]
    assert "experts" not in got
    assert got["vllm_xargs"] == {MASK_KEY: [0, 1, 3], "other": 1}
    assert got["cache_salt"] == f"{cache_salt(NAMES, ['public', 'code', 'math'])}:mine"
    assert r.json()["experts"] == ["public", "code", "math"]
    assert r.headers["x-composer-experts"] == "public,code,math"


def test_full_model_needs_no_mask_and_client_masks_are_still_dropped(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": [1], "vllm_xargs": {MASK_KEY: [2]}})
    assert r.json()["received"] == {"prompt": [1]}
    assert r.json()["experts"] == NAMES


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
    assert r.status_code == 400 and r.json()["error"]["valid"] == NAMES


def test_endpoints_that_would_bypass_the_mask_are_closed(client: TestClient) -> None:
    for path in ("/v1/responses", "/v1/messages", "/inference/v1/generate"):
        assert client.post(path, json={"input": "x"}).status_code == 404
