"""ASGI middleware in front of vLLM's OpenAI server: API keys, the `experts` field, policy.

For /v1/completions and /v1/chat/completions it turns the client's choice of experts (the
`experts` body field, or the `X-Composer-Experts: include=...` request header) plus the
registry's policy into the engine's explicit mask (`vllm_xargs`) and prefix-cache salt
(`cache_salt`), and reports the experts used (`experts` in the JSON or every stream chunk, and
the `x-composer-experts` header). Every POST body is size-capped, depth-checked and matched
against the endpoint's allow-list (serve/request_fields.py) before vLLM sees it. vLLM loads it
with `--middleware serve.middleware.ExpertsMiddleware`, so it is configured from the environment
(see `ServeSettings`). docs/serving.md has the threat model.

Serving a dense base with LoRA adapters (serve/adapters.py), the same code picks at most one
adapter per request (`select_adapter`) and sets `model` to it, and GET /v1/models lists only the
names the caller may use. Every generation request's decision is logged on the
`composer.serve.audit` logger (key, path, status, experts or adapter used).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from registry.keys import hash_key
from registry.policy_snapshot import PolicySnapshot
from serve.adapters import AdapterSet
from serve.experts import (
    SelectionError,
    cache_salt,
    engine_fields,
    parse_experts_field,
    parse_experts_header,
    select_adapter,
    select_experts,
)
from serve.policy import PolicyRefresher, PolicyUnavailable, expert_names, load_bindings, permitted
from serve.request_fields import FIELDS, MAX_DEPTH, check_fields, check_headers, json_depth
from serve.responses import HEADER, ModelsFilter, ReportingSend

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("composer.serve")
audit = logging.getLogger("composer.serve.audit")

GENERATE_PATHS = {"/v1/completions", "/v1/chat/completions"}
HEALTH_PATH = "/health"
OPEN_PATHS = {"/metrics", "/ping", "/version"}
# Everything else vLLM offers (responses, messages, generate, ...) would run the model without
# our mask, so it is not exposed: an allow-list keeps new vLLM endpoints closed too.
KEYED_PATHS = set(FIELDS) | {"/v1/models"}
MAX_BODY = 1 << 20

ENV_MODEL = "COMPOSER_SERVE_MODEL"
ENV_API_KEYS = "COMPOSER_SERVE_API_KEYS"
ENV_REGISTRY = "COMPOSER_SERVE_REGISTRY_URL"
ENV_POLICY_TTL = "COMPOSER_SERVE_POLICY_TTL"
ENV_POLICY_MAX_STALENESS = "COMPOSER_SERVE_POLICY_MAX_STALENESS"
ENV_MOE_BACKEND = "COMPOSER_SERVE_MOE_BACKEND"
ENV_ADAPTERS = "COMPOSER_SERVE_ADAPTERS"


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_path: str
    api_keys: bool = False
    registry_url: str | None = None
    policy_ttl: float = 2.0  # seconds between background policy reads
    policy_max_staleness: float = 30.0  # older policy is not used: 503 until a read succeeds
    moe_backend: str | None = None  # as chosen at start-up, reported by /health
    adapters: str | None = None  # AdapterSet.to_json() when serving LoRA adapters on a base

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(
            model_path=os.environ[ENV_MODEL],
            api_keys=os.environ.get(ENV_API_KEYS, "0") == "1",
            registry_url=os.environ.get(ENV_REGISTRY) or None,
            policy_ttl=float(os.environ.get(ENV_POLICY_TTL, "2.0")),
            policy_max_staleness=float(os.environ.get(ENV_POLICY_MAX_STALENESS, "30.0")),
            moe_backend=os.environ.get(ENV_MOE_BACKEND) or None,
            adapters=os.environ.get(ENV_ADAPTERS) or None,
        )

    def to_env(self) -> dict[str, str]:
        env = {
            ENV_MODEL: self.model_path,
            ENV_API_KEYS: "1" if self.api_keys else "0",
            ENV_POLICY_TTL: str(self.policy_ttl),
            ENV_POLICY_MAX_STALENESS: str(self.policy_max_staleness),
        }
        if self.registry_url:
            env[ENV_REGISTRY] = self.registry_url
        if self.moe_backend:
            env[ENV_MOE_BACKEND] = self.moe_backend
        if self.adapters:
            env[ENV_ADAPTERS] = self.adapters
        return env


def _error(status: int, message: str, **extra: Any) -> tuple[int, bytes]:
    kind = {
        401: "authentication_error",
        403: "permission_error",
        413: "request_too_large",
        503: "service_unavailable",
    }.get(status, "invalid_request")
    body = {"error": {"message": message, "type": kind, "code": status, **extra}}
    return status, json.dumps(body).encode()


class ExpertsMiddleware:
    def __init__(self, app: ASGIApp, settings: ServeSettings | None = None) -> None:
        self.app = app
        self.settings = settings or ServeSettings.from_env()
        self.adapters: AdapterSet | None = None
        if self.settings.adapters:
            self.adapters = AdapterSet.from_json(self.settings.adapters)
            self.names = self.adapters.names
            self.bindings = self.adapters.bindings()
        else:
            self.names = expert_names(self.settings.model_path)
            self.bindings = load_bindings(self.settings.model_path, self.settings.registry_url)
        if not audit.handlers:  # vLLM configures only its own loggers
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
            audit.addHandler(handler)
            audit.setLevel(logging.INFO)
            audit.propagate = False
        # Keys the prefix-cache salts: clients can neither compute nor collide with them.
        self.salt_secret = secrets.token_bytes(32)
        self.policy: PolicyRefresher | None = None
        if self.settings.registry_url:
            self.policy = PolicyRefresher.for_registry(
                self.settings.registry_url,
                self.bindings,
                interval=self.settings.policy_ttl,
                max_staleness=self.settings.policy_max_staleness,
            ).start()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: refused by not accepting
        path = scope["path"]
        if path == HEALTH_PATH:
            await self._health(scope, receive, send)
            return
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if path not in KEYED_PATHS:
            await _respond(send, *_error(404, f"{path} is not served"))
            return
        try:
            snapshot = self._snapshot()
            key = self._authenticate(scope, snapshot)
            check_headers(scope["headers"])
        except PolicyUnavailable as e:
            await _respond(send, *_error(503, str(e)))
            return
        except SelectionError as e:
            await _respond(send, *_error(e.status, str(e), **_extra(e)))
            return
        if scope.get("method") != "POST":
            if path == "/v1/models" and self.adapters is not None:
                visible = permitted(self.bindings, snapshot, key)
                send = ModelsFilter(send, visible)
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_json(scope, receive)
            check_fields(path, body)
            allowed: tuple[str, ...] | None = None
            if path in GENERATE_PATHS:
                allowed = self._apply_experts(scope, body, permitted(self.bindings, snapshot, key))
            elif self.adapters is not None and "model" in body:
                body["model"] = self.names[0]  # (de)tokenizing never names, or probes, adapters
        except SelectionError as e:
            if path in GENERATE_PATHS:
                _audit(key, path, e.status, None)
            await _respond(send, *_error(e.status, str(e), **_extra(e)))
            return
        if allowed is not None:
            _audit(key, path, 200, allowed)
        data = json.dumps(body).encode()
        scope = dict(scope)
        scope["headers"] = [
            (k, v)
            for k, v in scope["headers"]
            if k.lower() not in (b"content-length", b"content-type")
        ] + [(b"content-length", str(len(data)).encode()), (b"content-type", b"application/json")]
        downstream = ReportingSend(send, list(allowed)) if allowed is not None else send
        await self.app(scope, _replay(data, receive), downstream)

    def _snapshot(self) -> PolicySnapshot:
        return self.policy.current() if self.policy is not None else PolicySnapshot()

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

    def _apply_experts(
        self, scope: Scope, body: dict[str, Any], allowed_names: set[str]
    ) -> tuple[str, ...]:
        """Replace the client's choice (the `experts` field or the X-Composer-Experts header)
        by the engine's mask and salt; the experts used."""
        field = body.pop("experts", None)
        headers = [v for k, v in scope["headers"] if k.lower() == HEADER]
        if headers:
            if len(headers) > 1 or field is not None:
                raise SelectionError(
                    400, "give experts once: the `experts` field or one X-Composer-Experts header"
                )
            field = parse_experts_header(headers[0].decode("latin-1"))
        request = parse_experts_field(field)
        body.pop("vllm_xargs", None)  # check_fields allows only an empty one
        if self.adapters is not None:
            allowed = select_adapter(self.names, request, body.get("model"), allowed_names)
            body["model"] = allowed[0]  # vLLM applies the adapter its `model` names, or none
            salt = cache_salt([self.names.index(allowed[0])], self.salt_secret)
            client = body.get("cache_salt")
            body["cache_salt"] = f"{salt}:{client}" if client else salt
            return allowed
        allowed = select_experts(self.names, request, allowed_names)
        body.update(engine_fields(self.names, allowed, self.salt_secret, body.get("cache_salt")))
        return allowed

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """vLLM's health, plus the policy's age and the MoE backend; 503 when policy is stale."""
        status = await _status_of(self.app, scope, receive)
        doc: dict[str, Any] = {"engine": "ok" if status == 200 else f"unhealthy ({status})"}
        if self.settings.moe_backend:
            doc["moe_backend"] = self.settings.moe_backend
        if self.policy is not None:
            doc["policy"] = self.policy.status()
            if not doc["policy"]["fresh"]:
                status = 503
        doc["status"] = "ok" if status == 200 else "unhealthy"
        body = json.dumps(doc).encode()
        await _respond(send, status, body)


def _audit(key: str | None, path: str, status: int, used: tuple[str, ...] | None) -> None:
    """One line per generation request: who (key hash prefix), what, and what it ran with."""
    doc = {"key": key[:12] if key else None, "path": path, "status": status, "used": used}
    audit.info(json.dumps(doc))


def _extra(e: SelectionError) -> dict[str, Any]:
    return {k: v for k, v in e.detail.items() if k != "message"}


async def _read_json(scope: Scope, receive: Receive) -> dict[str, Any]:
    """The request body as a JSON object, at most MAX_BODY bytes and MAX_DEPTH deep."""
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and not declared.isdigit():
        raise SelectionError(400, "invalid Content-Length header")
    if declared is not None and int(declared) > MAX_BODY:
        raise SelectionError(413, f"request body too large (limit {MAX_BODY} bytes)")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise SelectionError(400, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise SelectionError(413, f"request body too large (limit {MAX_BODY} bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SelectionError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise SelectionError(400, "request body must be a JSON object")
    if json_depth(body) > MAX_DEPTH:
        raise SelectionError(400, f"request body is nested too deeply (limit {MAX_DEPTH} levels)")
    return body


def _replay(data: bytes, receive: Receive) -> Receive:
    """The rewritten body once, then the client's own messages: a disconnect reaches vLLM,
    which aborts the request."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        return await receive()

    return replay


async def _status_of(app: ASGIApp, scope: Scope, receive: Receive) -> int:
    status = 500

    async def capture(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await app(scope, receive, capture)
    return status


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
