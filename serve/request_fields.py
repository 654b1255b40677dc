"""Which request-body fields the server accepts, per endpoint: an allow-list, so that a field
vLLM adds tomorrow (or one that bypasses the mask today) is refused rather than passed on.

Refused on purpose, among others: `use_beam_search` (vLLM builds fresh sampling params per
beam, without the mask), `vllm_xargs` keys (the server sets the mask), `kv_transfer_params` /
`ec_transfer_params` (disaggregated-serving internals), `prompt_embeds` and multimodal payloads,
client chat templates, `logits_processors`, client-chosen `request_id` / `priority`.

Headers are refused by name where they steer the serving machinery rather than the request
(`PROXY_HEADERS`): Ray Serve's HTTP proxy in front of `composer serve --replicas` reads them
before any replica sees the request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from serve.experts import SelectionError

# Sampling and output controls shared by both generation endpoints.
_SAMPLING = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop",
    "stop_token_ids", "stream", "stream_options", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "logprobs", "prompt_logprobs", "user", "ignore_eos",
    "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "add_special_tokens", "allowed_token_ids", "bad_words",
    "truncate_prompt_tokens", "response_format", "structured_outputs", "echo",
    "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "experts", "vllm_xargs",
    "use_beam_search",
})  # fmt: skip

FIELDS: dict[str, frozenset[str]] = {
    "/v1/completions": _SAMPLING | {"prompt", "suffix"},
    "/v1/chat/completions": _SAMPLING
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "add_generation_prompt",
        "continue_final_message",
        "reasoning_effort",
        "include_reasoning",
    },  # fmt: skip
    "/tokenize": frozenset(
        {
            "model",
            "prompt",
            "messages",
            "add_special_tokens",
            "add_generation_prompt",
            "continue_final_message",
            "tools",
            "return_token_strs",
        }
    ),  # fmt: skip
    "/detokenize": frozenset({"model", "tokens"}),
}

# Ray Serve's proxy honours these from any client: a timeout of 0 lifts the operator's request
# timeout, `x-request-disconnect-disabled` keeps a generation running after its client left,
# and the multiplexing and session headers pin requests to one replica. Refused on every server
# (the single one too), so a request means the same behind Ray as without it. Compared as Ray
# compares them: lower case, `-` and `_` alike.
PROXY_HEADERS = frozenset({
    "x_request_timeout_seconds", "x_request_disconnect_disabled", "serve_multiplexed_model_id",
    "x_session_id",
})  # fmt: skip

MAX_DEPTH = 32  # deeper JSON is refused before any parser recurses into it
MAX_SALT = 256


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (1 for a scalar)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        depth = max(depth, d)
        if d > MAX_DEPTH:
            return d
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return depth


def check_headers(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse (400, naming the header) any header in `PROXY_HEADERS`."""
    for raw, _ in headers:
        name = raw.decode("latin-1").lower()
        if name.replace("-", "_") in PROXY_HEADERS:
            raise SelectionError(
                400, f"header `{name}` is not accepted by this server", header=name
            )


def check_fields(path: str, body: dict[str, Any]) -> None:
    """Refuse (400, naming the field) anything this endpoint does not accept."""
    allowed = FIELDS[path]
    for name in body:
        if name not in allowed:
            raise SelectionError(
                400, f"field `{name}` is not accepted by this server on {path}", field=name
            )
    if body.get("use_beam_search") not in (None, False):
        raise SelectionError(
            400,
            "field `use_beam_search`: beam search is not supported (its beams would run "
            "without the request's expert mask)",
            field="use_beam_search",
        )
    xargs = body.get("vllm_xargs")
    if xargs is not None:
        if not isinstance(xargs, dict):
            raise SelectionError(400, "field `vllm_xargs` must be an object", field="vllm_xargs")
        for key in xargs:
            raise SelectionError(
                400, f"field `vllm_xargs.{key}` is set by the server only", field="vllm_xargs"
            )
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not 0 < len(salt) <= MAX_SALT):
        raise SelectionError(
            400,
            f"field `cache_salt` must be a non-empty string of at most {MAX_SALT} characters",
            field="cache_salt",
        )
