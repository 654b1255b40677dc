"""Fast checks of the pure parts: expert selection, policy, cache salts, token masks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from serve.experts import (
    ExpertsRequest,
    SelectionError,
    cache_salt,
    engine_fields,
    parse_experts_field,
    select_experts,
)
from serve.masking import MASK_KEY, MASK_VALUE, allowed_from_extra_args, build_token_mask
from serve.middleware import expert_names
from serve.policy import PolicySnapshot, hash_key

NAMES = ["public", "code", "legal", "math"]
EVERYONE = set(NAMES)


def test_exclude_and_include_keep_router_order() -> None:
    assert select_experts(NAMES, ExpertsRequest(exclude=["legal"]), EVERYONE) == (
        "public", "code", "math",
    )  # fmt: skip
    assert select_experts(NAMES, ExpertsRequest(include=["math", "code"]), EVERYONE) == (
        "code", "math",
    )  # fmt: skip
    assert select_experts(NAMES, ExpertsRequest(), EVERYONE) == tuple(NAMES)


def test_policy_masks_without_being_asked_and_refuses_forbidden_includes() -> None:
    permitted = {"public", "code"}
    assert select_experts(NAMES, ExpertsRequest(), permitted) == ("public", "code")
    assert select_experts(NAMES, ExpertsRequest(exclude=["code"]), permitted) == ("public",)
    with pytest.raises(SelectionError) as e:
        select_experts(NAMES, ExpertsRequest(include=["code", "math", "legal"]), permitted)
    assert e.value.status == 403 and e.value.detail["forbidden"] == ["legal", "math"]


@pytest.mark.parametrize(
    "field, status",
    [
        ({"exclude": ["nope"]}, 400),
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


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(SelectionError) as e:
        select_experts(NAMES, ExpertsRequest(exclude=["nope", "legal"]), EVERYONE)
    assert e.value.detail["unknown"] == ["nope"] and e.value.detail["valid"] == NAMES


def test_cache_salt_separates_masks_and_leaves_full_model_unsalted() -> None:
    assert cache_salt(NAMES, NAMES) is None
    salts = {cache_salt(NAMES, a) for a in (["public"], ["code"], ["public", "code"])}
    assert len(salts) == 3
    assert cache_salt(NAMES, ["code"]) == cache_salt(NAMES, ["code"])
    fields = engine_fields(NAMES, ["public", "math"])
    assert fields["vllm_xargs"] == {MASK_KEY: [0, 3]} and fields["cache_salt"]
    assert engine_fields(NAMES, NAMES) == {}


def test_policy_snapshot_rules() -> None:
    snap = PolicySnapshot(
        policies={"code": "opt_in", "legal": "opt_out", "math": "restricted"},
        keys={hash_key("a"): frozenset({"math", "code"}), hash_key("b"): frozenset()},
    )
    assert snap.permitted(NAMES, hash_key("a")) == {"public", "code", "math"}
    assert snap.permitted(NAMES, hash_key("b")) == {"public", "code"}
    assert snap.permitted(NAMES, None) == {"public", "code"}
    # An expert the registry does not know is not governed by it.
    assert PolicySnapshot().permitted(NAMES, None) == EVERYONE


def test_token_mask_follows_the_batch_layout() -> None:
    allowed = [None, (0, 2), None]
    mask = build_token_mask(allowed, [2, 3, 1], num_experts=4)
    assert mask is not None and mask.shape == (6, 4)
    assert torch.equal(mask[:2], torch.zeros(2, 4))
    assert torch.equal(mask[2:5, [0, 2]], torch.zeros(3, 2))
    assert (mask[2:5, [1, 3]] == MASK_VALUE).all()
    assert torch.equal(mask[5], torch.zeros(4))
    assert build_token_mask([None, None], [3, 1], 4) is None
    assert allowed_from_extra_args({MASK_KEY: [3, 1, 1]}) == (1, 3)
    assert allowed_from_extra_args({"other": 1}) is None
    assert allowed_from_extra_args({MASK_KEY: ["x"]}) == ()  # fails closed, never raises


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
