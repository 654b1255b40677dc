"""Per-request expert selection: parse the client's `experts` field, apply policy, derive the
engine-side mask and the prefix-cache salt. Pure logic (no HTTP, no database)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from serve.masking import MASK_KEY

PUBLIC = "public"


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
        raise SelectionError(400, msg, errors=e.errors(include_url=False)) from None
    if req.include is not None and req.exclude is not None:
        raise SelectionError(400, "`experts` takes include or exclude, not both")
    return req


def select_experts(
    names: Sequence[str], request: ExpertsRequest, permitted: set[str]
) -> tuple[str, ...]:
    """Experts a request may use, in router order.

    `names` are the model's experts (router order); `permitted` are those the policy lets this
    caller use. Unknown names -> 400; including a forbidden expert -> 403; nothing left -> 400.
    """
    asked = request.include if request.include is not None else request.exclude or []
    unknown = sorted(set(asked) - set(names))
    if unknown:
        raise SelectionError(
            400, f"unknown experts: {', '.join(unknown)}", unknown=unknown, valid=list(names)
        )
    if request.include is not None:
        forbidden = sorted(set(request.include) - permitted)
        if forbidden:
            raise SelectionError(
                403,
                f"experts not allowed for this key: {', '.join(forbidden)}",
                forbidden=forbidden,
            )
        chosen = set(request.include)
    else:
        chosen = set(names) - set(request.exclude or [])
    allowed = tuple(n for n in names if n in chosen and n in permitted)
    if not allowed:
        raise SelectionError(400, "no expert left: at least one expert must stay enabled")
    return allowed


def mask_indices(names: Sequence[str], allowed: Sequence[str]) -> list[int]:
    return [i for i, n in enumerate(names) if n in allowed]


def cache_salt(names: Sequence[str], allowed: Sequence[str]) -> str | None:
    """Prefix-cache salt for a mask: requests with different masks never share KV blocks.

    The all-experts mask keeps no salt, so unmasked requests share the cache as usual.
    """
    if len(allowed) == len(names):
        return None
    digest = hashlib.sha256(",".join(allowed).encode()).hexdigest()[:16]
    return f"composer-experts-{digest}"


def engine_fields(names: Sequence[str], allowed: Sequence[str]) -> dict[str, Any]:
    """Extra request-body fields for vLLM's OpenAI server (`vllm_xargs`, `cache_salt`)."""
    salt = cache_salt(names, allowed)
    if salt is None:
        return {}
    return {"vllm_xargs": {MASK_KEY: mask_indices(names, allowed)}, "cache_salt": salt}
