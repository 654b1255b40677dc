"""Per-request expert selection: parse the client's `experts` field, apply policy, derive the
engine-side mask and the prefix-cache salt. Pure logic (no HTTP, no database)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from serve.masking import MASK_KEY


class ExpertsRequest(BaseModel):
    """The `experts` field of a request body: at most one of include / exclude."""

    model_config = ConfigDict(extra="forbid")

    include: list[str] | None = None
    exclude: list[str] | None = None


class SelectionError(Exception):
    """A request the server refuses; `status` is the HTTP code, `detail` the JSON body."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.detail = {"message": message, **extra}


def parse_experts_field(value: Any) -> ExpertsRequest:
    if value is None:
        return ExpertsRequest()
    try:
        req = ExpertsRequest.model_validate(value)
    except ValidationError as e:
        msg = '`experts` must be {"include": [names]} or {"exclude": [names]}'
        raise SelectionError(
            400, msg, errors=e.errors(include_url=False, include_input=False)
        ) from None
    if req.include is not None and req.exclude is not None:
        raise SelectionError(400, "`experts` takes include or exclude, not both")
    return req


def parse_experts_header(value: str) -> dict[str, list[str]]:
    """`X-Composer-Experts: include=public,legal` (or `exclude=code`) as the body field's value,
    for clients that cannot add body fields (lm-eval, plain OpenAI SDK calls)."""
    mode, sep, names = value.partition("=")
    mode = mode.strip().lower()
    if not sep or mode not in ("include", "exclude"):
        raise SelectionError(
            400, "header X-Composer-Experts: expected include=NAME,... or exclude=NAME,..."
        )
    return {mode: [n.strip() for n in names.split(",") if n.strip()]}


def select_experts(
    names: Sequence[str], request: ExpertsRequest, permitted: set[str]
) -> tuple[str, ...]:
    """Experts a request may use, in router order.

    `names` are the model's experts (router order); `permitted` are those the policy lets this
    caller use. A name the caller may not use is refused the same way whether it exists or not
    (403, listing only the names the caller may use), so errors never reveal restricted or
    opted-out experts. Nothing left -> 400.
    """
    available = [n for n in names if n in permitted]
    asked = request.include if request.include is not None else request.exclude or []
    unavailable = sorted(set(asked) - set(available))
    if unavailable:
        raise SelectionError(
            403,
            f"experts not available to this caller: {', '.join(unavailable)}",
            unavailable=unavailable,
            available=available,
        )
    if request.include is not None:
        chosen = set(request.include)
    else:
        chosen = set(available) - set(request.exclude or [])
    allowed = tuple(n for n in available if n in chosen)
    if not allowed:
        raise SelectionError(400, "no expert left: at least one expert must stay enabled")
    return allowed


def select_adapter(
    names: Sequence[str], request: ExpertsRequest, model: Any, permitted: set[str]
) -> tuple[str]:
    """The one slot of an adapter server (`names` = [base, *adapters]) a request runs on.

    vLLM CPU applies one LoRA per request, so a request names at most one adapter: by `model`
    (the adapter's name; the base's name or none means no adapter), or by `experts.include`
    (or the X-Composer-Experts header). Naming the base (or nothing) runs the base. Two names,
    or `model` and `experts` naming different ones, are a 400; `exclude` is refused, since
    nothing is applied that a request does not name. The names go through `select_experts`,
    so unknown and forbidden adapters get the same 403.
    """
    base = names[0]
    if request.exclude is not None:
        raise SelectionError(
            400,
            "field `experts`: exclude is not supported when serving adapters (a request runs "
            "the base unless it names one adapter with include or `model`)",
            field="experts",
        )
    asked = list(dict.fromkeys(request.include or []))
    if request.include is not None and len(asked) != 1:
        raise SelectionError(
            400, "field `experts`: include exactly one adapter per request", field="experts"
        )
    if model is not None and not isinstance(model, str):
        raise SelectionError(400, "field `model` must be a string", field="model")
    if model is not None and model != base:
        if asked and asked[0] != model:
            raise SelectionError(
                400,
                "fields `model` and `experts` name different adapters: one adapter per request",
                field="experts",
            )
        asked = [model]
    if not asked:
        return (base,)
    return select_experts(names, ExpertsRequest(include=asked), permitted)  # type: ignore[return-value]


def mask_indices(names: Sequence[str], allowed: Sequence[str]) -> list[int]:
    return [i for i, n in enumerate(names) if n in allowed]


def cache_salt(indices: Sequence[int], secret: bytes) -> str:
    """Prefix-cache salt for a mask: requests with different masks never share KV blocks.

    Keyed by a per-server secret, so a client cannot compute (and pre-fill) the salt of any
    mask; every mask has one, the full one too.
    """
    digest = hmac.new(secret, ",".join(map(str, indices)).encode(), hashlib.sha256).hexdigest()
    return f"composer-{digest[:32]}"


def engine_fields(
    names: Sequence[str], allowed: Sequence[str], secret: bytes, client_salt: str | None = None
) -> dict[str, Any]:
    """Request-body fields for vLLM's OpenAI server: the explicit mask (`vllm_xargs`) and the
    salt, the server's first; a client salt can only split the cache further."""
    indices = mask_indices(names, allowed)
    salt = cache_salt(indices, secret)
    if client_salt:
        salt = f"{salt}:{client_salt}"
    return {"vllm_xargs": {MASK_KEY: indices}, "cache_salt": salt}
