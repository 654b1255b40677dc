"""Fast checks of the pure parts: expert selection, policy by registry id, cache salts, token
masks and the engine's fail-closed defaults."""

from __future__ import annotations

import json
import math

import pytest
import torch

from registry.composition import SlotBinding
from registry.keys import hash_key
from registry.models import Policy
from registry.policy_snapshot import PolicySnapshot, VersionPolicy
from serve.experts import (
    ExpertsRequest,
    SelectionError,
    cache_salt,
    engine_fields,
    parse_experts_field,
    select_experts,
)
from serve.masking import (
    MASK_KEY,
    MASK_VALUE,
    apply_mask,
    build_token_mask,
    resolve_allowed,
    set_current_mask,
    zero_dead_rows,
)
from serve.moe_backend import step_mask
from serve.policy import expert_names, permitted

NAMES = ["public", "code", "legal", "math"]
EVERYONE = set(NAMES)
SECRET = b"s" * 32


def test_exclude_and_include_keep_router_order() -> None:
    assert select_experts(NAMES, ExpertsRequest(exclude=["legal"]), EVERYONE) == (
        "public", "code", "math",
    )  # fmt: skip
    assert select_experts(NAMES, ExpertsRequest(include=["math", "code"]), EVERYONE) == (
        "code", "math",
    )  # fmt: skip
    assert select_experts(NAMES, ExpertsRequest(), EVERYONE) == tuple(NAMES)


def test_policy_masks_without_being_asked_and_refuses_unavailable_names() -> None:
    permitted_ = {"public", "code"}
    assert select_experts(NAMES, ExpertsRequest(), permitted_) == ("public", "code")
    assert select_experts(NAMES, ExpertsRequest(exclude=["code"]), permitted_) == ("public",)
    with pytest.raises(SelectionError) as e:
        select_experts(NAMES, ExpertsRequest(include=["code", "math", "legal"]), permitted_)
    assert e.value.status == 403 and e.value.detail["unavailable"] == ["legal", "math"]
    assert e.value.detail["available"] == ["public", "code"]


def test_unknown_and_forbidden_names_get_the_same_answer() -> None:
    """No oracle: a caller cannot tell a restricted or opted-out expert from a missing one."""
    permitted_ = {"public", "code"}
    answers = []
    for name in ("math", "nope"):  # "math" exists but is not permitted; "nope" does not exist
        for field in ("include", "exclude"):
            with pytest.raises(SelectionError) as e:
                select_experts(NAMES, ExpertsRequest(**{field: [name]}), permitted_)
            detail = {k: v for k, v in e.value.detail.items() if k != "message"}
            answers.append((field, e.value.status, str(e.value).replace(name, "X"), detail))
            assert "math" not in json.dumps(detail["available"])
    assert answers[0][1:3] == answers[2][1:3] and answers[1][1:3] == answers[3][1:3]
    assert answers[0][3]["available"] == answers[2][3]["available"] == ["public", "code"]


@pytest.mark.parametrize(
    "field, status",
    [
        ({"exclude": ["nope"]}, 403),
        ({"exclude": NAMES}, 400),
        ({"include": []}, 400),
        ({"include": ["code"], "exclude": ["legal"]}, 400),
        ({"only": ["code"]}, 400),
        ("code", 400),
        ({"include": "code"}, 400),
    ],
)
def test_bad_selections_are_refused(field: object, status: int) -> None:
    with pytest.raises(SelectionError) as e:
        select_experts(NAMES, parse_experts_field(field), EVERYONE)
    assert e.value.status == status


def test_every_mask_gets_a_keyed_salt_and_an_explicit_mask() -> None:
    salts = {cache_salt([i], SECRET) for i in range(4)} | {cache_salt([0, 1, 2, 3], SECRET)}
    assert len(salts) == 5
    assert cache_salt([1], SECRET) == cache_salt([1], SECRET)
    # Another server (another secret) salts the same mask differently: nothing to predict.
    assert cache_salt([1], SECRET) != cache_salt([1], b"t" * 32)
    fields = engine_fields(NAMES, ["public", "math"], SECRET)
    assert fields["vllm_xargs"] == {MASK_KEY: [0, 3]}
    full = engine_fields(NAMES, NAMES, SECRET)
    assert full["vllm_xargs"] == {MASK_KEY: [0, 1, 2, 3]}  # the full mask is explicit too
    assert full["cache_salt"] == cache_salt([0, 1, 2, 3], SECRET)
    # A client salt only narrows: the server's salt always comes first.
    narrowed = engine_fields(NAMES, NAMES, SECRET, client_salt=full["cache_salt"])
    assert narrowed["cache_salt"] == f"{full['cache_salt']}:{full['cache_salt']}"


# --- policy by registry id ----------------------------------------------------------------

BINDINGS = [
    SlotBinding(0, "public", "base"),
    SlotBinding(1, "code", "ffn", version_id=11, sha256="c" * 64, ref="code@1"),
    SlotBinding(2, "b2", "ffn", version_id=12, sha256="b" * 64, ref="beta@1"),  # renamed
    SlotBinding(3, "math", "ffn", version_id=13, sha256="m" * 64, ref="math@1"),
]


def _snapshot(**policies: Policy) -> PolicySnapshot:
    ids = {"code": (11, 1, "c"), "beta": (12, 2, "b"), "math": (13, 3, "m")}
    versions = {
        vid: VersionPolicy(vid, eid, f"{name}@1", ch * 64, policies.get(name, Policy.opt_in))
        for name, (vid, eid, ch) in ids.items()
    }
    keys = {hash_key("a"): frozenset({3, 1}), hash_key("b"): frozenset()}
    return PolicySnapshot(versions=versions, keys=keys)


def test_policy_rules_follow_registry_ids_not_names() -> None:
    snap = _snapshot(math=Policy.restricted)
    assert permitted(BINDINGS, snap, hash_key("a")) == {"public", "code", "math"}
    assert permitted(BINDINGS, snap, hash_key("b")) == {"public", "code", "b2"}
    assert permitted(BINDINGS, snap, None) == {"public", "code", "b2"}
    # The opt-out of `beta` reaches the slot the spec renamed to `b2`.
    assert "b2" not in permitted(BINDINGS, _snapshot(beta=Policy.opt_out), None)


def test_a_version_the_registry_no_longer_knows_is_denied() -> None:
    snap = _snapshot()
    gone = PolicySnapshot(versions={k: v for k, v in snap.versions.items() if k != 11}, keys={})
    assert "code" not in permitted(BINDINGS, gone, None)
    # Same id, other bytes (the registry was rebuilt or tampered with): denied as well.
    swapped = dict(snap.versions)
    swapped[11] = VersionPolicy(11, 1, "code@1", "x" * 64, Policy.opt_in)
    assert "code" not in permitted(BINDINGS, PolicySnapshot(versions=swapped), None)


def test_an_expert_named_public_is_governed_like_any_other() -> None:
    """Only the base slot is ungoverned; the name `public` buys nothing."""
    named_public = [
        SlotBinding(0, "base", "base"),
        SlotBinding(1, "public", "ffn", version_id=11, sha256="c" * 64),
    ]
    assert permitted(named_public, _snapshot(code=Policy.opt_out), None) == {"base"}


# --- engine side -----------------------------------------------------------------------------


def test_token_mask_follows_the_batch_layout() -> None:
    allowed = [None, (0, 2), None]
    mask = build_token_mask(allowed, [2, 3, 1], num_experts=4)
    assert mask is not None and mask.shape == (6, 4)
    assert torch.equal(mask[:2], torch.zeros(2, 4))
    assert torch.equal(mask[2:5, [0, 2]], torch.zeros(3, 2))
    assert (mask[2:5, [1, 3]] == MASK_VALUE).all()
    assert torch.equal(mask[5], torch.zeros(4))
    assert build_token_mask([None, None], [3, 1], 4) is None


def test_the_engine_fails_closed_on_missing_or_unreadable_masks() -> None:
    assert resolve_allowed({MASK_KEY: [3, 1, 1]}, 4) == (1, 3)
    assert resolve_allowed({MASK_KEY: [0, 1, 2, 3]}, 4) is None  # explicit full mask
    assert resolve_allowed({MASK_KEY: [0, 1, 2, 3, 9]}, 4) is None  # out of range: ignored
    assert resolve_allowed({MASK_KEY: [9]}, 4) == ()
    assert resolve_allowed({MASK_KEY: ["x"]}, 4) == ()  # unreadable: no expert, never raises
    assert resolve_allowed({MASK_KEY: None}, 4) == ()
    # No mask at all (a path that bypassed the server): the public base only, never all.
    assert resolve_allowed(None, 4, default=(0,)) == (0,)
    assert resolve_allowed({"other": 1}, 4, default=(0,)) == (0,)
    assert resolve_allowed(None, 4) == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_expert_drops_out_of_the_softmax_exactly(dtype: torch.dtype) -> None:
    """FlexOlmo has no renormalisation: the masked logit must vanish from the denominator."""
    logits = torch.tensor([[2.0, 30.0, -1.0, 0.5]], dtype=dtype)
    mask = build_token_mask([(0, 2, 3)], [1], 4)
    assert mask is not None
    probs = torch.softmax((logits + mask.to(dtype)).float(), dim=-1)
    kept = torch.softmax(logits[:, [0, 2, 3]].float(), dim=-1)
    assert probs[0, 1].item() == 0.0
    assert torch.equal(probs[:, [0, 2, 3]], kept)
    assert not math.isnan(probs.sum().item())


def test_expert_names_come_from_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text(json.dumps({"composer_experts": NAMES}))
    assert expert_names(tmp_path) == NAMES
    (tmp_path / "config.json").write_text(json.dumps({"num_local_experts": 2}))
    assert expert_names(tmp_path) == ["expert_0", "expert_1"]


def test_a_mask_of_another_width_fails_closed_on_both_backends() -> None:
    """A mask built for another model (4 experts) never leaves 3-expert logits unmasked: the
    step fails instead (masks are per model: serve/masking.py MaskingConfig)."""
    set_current_mask(build_token_mask([(1,)], [2], num_experts=4))
    try:
        with pytest.raises(RuntimeError, match="mask for 4 experts"):
            apply_mask(torch.zeros(2, 3))
        with pytest.raises(RuntimeError, match="mask for 4 experts"):
            step_mask(2, 3, 2, torch.device("cpu"))
        assert apply_mask(torch.zeros(2, 4))[0].tolist() == [
            MASK_VALUE,
            0.0,
            MASK_VALUE,
            MASK_VALUE,
        ]
    finally:
        set_current_mask(None)


def test_tokens_allowed_no_expert_get_a_zero_moe_output() -> None:
    mask = build_token_mask([(1,), (), None], [1, 2, 1], num_experts=4)
    set_current_mask(mask)
    try:
        out = zero_dead_rows(torch.ones(6, 3))  # two more rows than the mask: padding
        assert out[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
        set_current_mask(build_token_mask([(1,)], [2], 4))
        assert torch.equal(zero_dead_rows(torch.ones(2, 3)), torch.ones(2, 3))
    finally:
        set_current_mask(None)
