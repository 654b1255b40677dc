"""The demo's settings: QUICK by default (fits 30 minutes in float32 on 2 AVX2 cores),
COMPOSER_DEMO_FULL=1 for the previous demo, one field at a time from the environment."""

from __future__ import annotations

from composer.compose.plan import resolve_moe_layers
from composer.demo import FULL, QUICK, REPO, settings_from_env
from composer.spec_load import load_spec
from router_train.layers import parse_layers


def test_quick_by_default_full_on_request() -> None:
    assert settings_from_env({}) == QUICK
    assert settings_from_env({"COMPOSER_DEMO_FULL": "1"}) == FULL
    assert settings_from_env({"COMPOSER_DEMO_FULL": "0"}) == QUICK
    assert (FULL.steps, FULL.tune_steps, FULL.tune_chunks, FULL.cross_eval) == (80, 80, 128, True)


def test_one_field_from_the_environment() -> None:
    got = settings_from_env(
        {"COMPOSER_DEMO_STEPS": "5", "COMPOSER_DEMO_LR": "1e-3", "COMPOSER_DEMO_CROSS_EVAL": "1"}
    )
    assert (got.steps, got.lr, got.cross_eval) == (5, 1e-3, True)
    assert got.tune_steps == QUICK.tune_steps
    full = settings_from_env({"COMPOSER_DEMO_FULL": "1", "COMPOSER_DEMO_CROSS_EVAL": "0"})
    assert full.cross_eval is False and full.steps == FULL.steps


def test_flexmix_example_is_what_the_default_demo_builds() -> None:
    """examples/flexmix.yaml holds QUICK's router tuning and the layers the owners train."""
    spec = load_spec(REPO / "examples" / "flexmix.yaml")
    tune = spec.router.tune
    assert tune is not None
    assert (tune.steps, tune.max_chunks, tune.seq_len, tune.loss_sequences) == (
        QUICK.tune_steps, QUICK.tune_chunks, QUICK.seq_len, QUICK.tune_loss_sequences,
    )  # fmt: skip
    assert resolve_moe_layers(spec, 30) == parse_layers(QUICK.layers, 30)
