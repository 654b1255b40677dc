"""ASGI middleware in front of vLLM's OpenAI server: API keys, the `experts` field, policy.

For /v1/completions and /v1/chat/completions it turns the client's `experts` choice plus the
registry's policy into the engine's mask (`vllm_xargs`) and prefix-cache salt (`cache_salt`),
and reports the experts used (`experts` in the JSON or every stream chunk, and the
`x-composer-experts` header). vLLM loads it with `--middleware serve.middleware.ExpertsMiddleware`,
so it is configured from the environment (see `ServeSettings`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from serve.experts import SelectionError, engine_fields, parse_experts_field, select_experts
from serve.masking import MASK_KEY
from serve.policy import PolicySnapshot, PolicySource, hash_key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("composer.serve")

GENERATE_PATHS = {"/v1/completions", "/v1/chat/completions"}
OPEN_PATHS = {"/health", "/metrics", "/ping", "/version"}
# Everything else vLLM offers (responses, messages, generate, ...) would run the model without
# our mask, so it is not exposed: an allow-list keeps new vLLM endpoints closed too.
KEYED_PATHS = GENERATE_PATHS | {"/v1/models", "/tokenize", "/detokenize"}
HEADER = b"x-composer-experts"
MAX_BODY = 8 << 20

ENV_MODEL = "COMPOSER_SERVE_MODEL"
ENV_API_KEYS = "COMPOSER_SERVE_API_KEYS"
ENV_REGISTRY = "COMPOSER_SERVE_REGISTRY_URL"
ENV_POLICY_TTL = "COMPOSER_SERVE_POLICY_TTL"


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_path: str
    api_keys: bool = False
    registry_url: str | None = None
    policy_ttl: float = 2.0

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(
            model_path=os.environ[ENV_MODEL],
            api_keys=os.environ.get(ENV_API_KEYS, "0") == "1",
            registry_url=os.environ.get(ENV_REGISTRY) or None,
            policy_ttl=float(os.environ.get(ENV_POLICY_TTL, "2.0")),
        )

    def to_env(self) -> dict[str, str]:
        env = {
            ENV_MODEL: self.model_path,
            ENV_API_KEYS: "1" if self.api_keys else "0",
            ENV_POLICY_TTL: str(self.policy_ttl),
        }
        if self.registry_url:
            env[ENV_REGISTRY] = self.registry_url
        return env


def expert_names(model_path: str | Path) -> list[str]:
    """Router-order expert names from config.json (`composer_experts`, which `composer build`
    writes), else expert_<i>."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    names = config.get("composer_experts")
    if names:
        return [str(n) for n in names]
    n = config.get("num_local_experts") or config.get("num_experts") or 0
    return [f"expert_{i}" for i in range(int(n))]


def _error(status: int, message: str, **extra: Any) -> tuple[int, bytes]:
    kind = {401: "authentication_error", 403: "permission_error"}.get(status, "invalid_request")
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    return status, json.dumps(body).encode()


class ExpertsMiddleware:
    def __init__(self, app: ASGIApp, settings: ServeSettings | None = None) -> None:
        self.app = app
        self.settings = settings or ServeSettings.from_env()
        self.names = expert_names(self.settings.model_path)
        self.policy = PolicySource(self.settings.registry_url, ttl=self.settings.policy_ttl)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] not in KEYED_PATHS:
            if scope["type"] == "http":
                await _respond(send, *_error(404, f"{scope['path']} is not served"))
            elif scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return  # websockets: refused by not accepting
        try:
            snapshot = await asyncio.to_thread(self.policy.snapshot)
            key = self._authenticate(scope, snapshot)
        except SelectionError as e:
            await _respond(send, *_error(e.status, str(e)))
            return
        except Exception:
            log.exception("policy lookup failed")
            await _respond(send, *_error(503, "policy registry unavailable"))
            return
        if scope["path"] not in GENERATE_PATHS or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        try:
            raw = await _read_body(receive)
            body, allowed = self._rewrite(raw, snapshot.permitted(self.names, key))
        except SelectionError as e:
            await _respond(send, *_error(e.status, str(e), **_extra(e)))
            return
        data = json.dumps(body).encode()
        scope = dict(scope)
        scope["headers"] = [
            (k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length",)
        ] + [(b"content-length", str(len(data)).encode())]
        await self.app(scope, _replay(data), _ReportingSend(send, list(allowed)))

    def _authenticate(self, scope: Scope, snapshot: PolicySnapshot) -> str | None:
        if not self.settings.api_keys:
            return None
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, secret = auth.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise SelectionError(401, "missing API key (Authorization: Bearer <key>)")
        digest = hash_key(secret.strip())
        if digest not in snapshot.keys:
            raise SelectionError(401, "invalid API key")
        return digest

    def _rewrite(self, raw: bytes, permitted: set[str]) -> tuple[dict[str, Any], tuple[str, ...]]:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise SelectionError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise SelectionError(400, "request body must be a JSON object")
        request = parse_experts_field(body.pop("experts", None))
        allowed = select_experts(self.names, request, permitted)
        xargs = body.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise SelectionError(400, "`vllm_xargs` must be an object")
        xargs = {k: v for k, v in (xargs or {}).items() if k != MASK_KEY}  # the server decides
        fields = engine_fields(self.names, allowed)
        xargs.update(fields.get("vllm_xargs", {}))
        if xargs:
            body["vllm_xargs"] = xargs
        else:
            body.pop("vllm_xargs", None)
        if "cache_salt" in fields:
            client_salt = body.get("cache_salt")
            salt = fields["cache_salt"]
            body["cache_salt"] = f"{salt}:{client_salt}" if isinstance(client_salt, str) else salt
        return body, allowed


def _extra(e: SelectionError) -> dict[str, Any]:
    return {k: v for k, v in e.detail.items() if k != "message"}


async def _read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise SelectionError(400, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise SelectionError(413, "request body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(data: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        return await asyncio.Event().wait()  # type: ignore[func-returns-value]

    return receive


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _ReportingSend:
    """Adds the header, and `experts` to the JSON body or to every server-sent event."""

    def __init__(self, send: Send, allowed: list[str]) -> None:
        self.send = send
        self.allowed = allowed
        self.mode = "pass"
        self.buffer = b""
        self.start: Message | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
            headers.append((HEADER, ",".join(self.allowed).encode()))
            ctype = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
            if message["status"] == 200 and ctype.startswith(b"application/json"):
                self.mode = "json"
            elif message["status"] == 200 and ctype.startswith(b"text/event-stream"):
                self.mode = "sse"
            if self.mode == "json":  # length changes: hold the start until the body is known
                self.start = {**message, "headers": headers}
                return
            await self.send({**message, "headers": headers})
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if more:
                return
            body = self._inject_json(self.buffer)
            assert self.start is not None
            headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self.send({**self.start, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        events, sep, rest = self.buffer.rpartition(b"\n\n")
        self.buffer = rest
        out = (
            b"".join(self._inject_event(e) + b"\n\n" for e in events.split(b"\n\n")) if sep else b""
        )
        if not more and self.buffer:
            out += self.buffer
            self.buffer = b""
        await self.send({"type": "http.response.body", "body": out, "more_body": more})

    def _inject_json(self, body: bytes) -> bytes:
        try:
            obj = json.loads(body)
        except ValueError:
            return body
        if isinstance(obj, dict):
            obj["experts"] = self.allowed
            return json.dumps(obj).encode()
        return body

    def _inject_event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return event
        if isinstance(obj, dict):
            obj["experts"] = self.allowed
        return b"data: " + json.dumps(obj).encode()
