"""router.tune: only the router rows and biases change, to the values whose loss is recorded."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from build_helpers import (
    CAL_TEXT,
    bit_equal,
    build_text,
    config,
    leftovers,
    load_model,
    tensors,
)
from safetensors.torch import load_file

from composer.build import plan_for
from composer.errors import BuildError, PlanError
from composer.inputs import LocalPathResolver
from composer.spec import RouterTuneSpec, SpecError
from composer.spec_load import load_spec, parse_spec
from composer.text import ByteTokenizer
from composer.train.router_tune import proxy_sequences
from router_train.biased_router import load_composed
from router_train.loss import mean_nll
from router_train.tune import LOSS_SEQUENCES, loss_sample

TUNE = """\
  tune:
    proxy: {{code: "{code}", legal: "{legal}"}}
    steps: 6
    lr: 0.05
    batch_size: 4
    seq_len: 32
    max_chunks: 6
    bf16: false
    tokenizer: bytes
"""


def _spec(base: str, experts: str, tune: str | None) -> str:
    text = (
        f"name: tuned\nmethod: compose\nstyle: flexolmo\nbase: {base}\nexperts: [{experts}]\n"
        "top_k: 2\noutput: {dtype: float32}\nrouter:\n  init: trained\n"
    )
    return text + (tune or "")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each owner's proxy sample: its calibration text repeated to a few hundred bytes."""
    root = tmp_path_factory.mktemp("proxy")
    out = {}
    for name in ("code", "legal"):
        (root / name).mkdir()
        (root / name / "sample.txt").write_text(CAL_TEXT[name] * 4)
        out[name] = root / name
    return out


def _tune_block(proxy: dict[str, Path], **overrides: str) -> str:
    paths = {k: str(v) for k, v in proxy.items()} | overrides
    return TUNE.format(**paths)


@pytest.fixture(scope="module")
def pair(models: Path, proxy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tune")
    plain = build_text(models, root / "plain", _spec("base", "code, legal", None))
    tuned = build_text(models, root / "tuned", _spec("base", "code, legal", _tune_block(proxy)))
    return plain, tuned


def test_only_router_rows_and_biases_change(pair) -> None:
    plain, tuned = pair
    before, after = tensors(plain.out_dir), tensors(tuned.out_dir)
    assert before.keys() == after.keys()
    routers = {k for k in before if k.endswith(".gate.weight")}
    assert routers == {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in (0, 1)}
    for k in before:
        if k in routers:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert bit_equal(before[k], after[k]), k
    bias_before = load_file(plain.out_dir / "composer_router.safetensors")
    bias_after = load_file(tuned.out_dir / "composer_router.safetensors")
    assert bias_before.keys() == bias_after.keys() and len(bias_after) == 2
    assert all(not torch.equal(bias_before[k], bias_after[k]) for k in bias_before)
    # Plain transformers still loads it with no missing or unexpected weight.
    load_model(tuned.out_dir)
    assert config(tuned.out_dir) == config(plain.out_dir)


def test_recorded_losses_are_those_of_the_written_checkpoint(pair, proxy: dict[str, Path]) -> None:
    plain, tuned = pair
    record = json.loads((tuned.out_dir / "composition.json").read_text())["router_tuning"]
    assert json.loads((plain.out_dir / "composition.json").read_text())["router_tuning"] is None
    assert record["proxy"]["code"]["files"] == 1
    assert record["proxy"]["code"]["sequences"] == record["proxy"]["legal"]["sequences"] == 6
    assert record["loss_after"] < record["loss_before"] - 0.01

    files = {k: sorted(v.iterdir()) for k, v in proxy.items()}
    seqs = proxy_sequences(files, ByteTokenizer(), 32, 6, seed=0)
    data = torch.cat(list(seqs.values()))  # 6 per expert: all of them are in the loss sample
    assert torch.equal(loss_sample(seqs), data) and record["loss_sequences_per_expert"] >= 6
    with torch.no_grad():
        got_before = mean_nll(load_composed(plain.out_dir), data, 4)
        got_after = mean_nll(load_composed(tuned.out_dir), data, 4)
    assert got_before == pytest.approx(record["loss_before"], abs=1e-5)
    assert got_after == pytest.approx(record["loss_after"], abs=1e-5)


def test_loss_sample_is_each_experts_first_sequences() -> None:
    seqs = {
        "a": torch.arange(40 * 3).reshape(40, 3),
        "b": -torch.arange(5 * 3).reshape(5, 3),
    }
    got = loss_sample(seqs)
    assert LOSS_SEQUENCES == 32
    assert torch.equal(got, torch.cat([seqs["a"][:32], seqs["b"]]))


def test_manifest_hashes_match_the_tuned_files(pair) -> None:
    import hashlib

    _, tuned = pair
    manifest = json.loads((tuned.out_dir / "composition.json").read_text())
    recorded = manifest["files"] | manifest["extras"]
    assert recorded == tuned.files
    for name, digest in recorded.items():
        assert hashlib.sha256((tuned.out_dir / name).read_bytes()).hexdigest() == digest, name


def test_tuned_build_is_byte_identical_when_repeated(
    models: Path, proxy: dict[str, Path], tmp_path: Path, pair
) -> None:
    _, tuned = pair
    again = build_text(models, tmp_path / "again", _spec("base", "code, legal", _tune_block(proxy)))
    names = sorted(p.name for p in tuned.out_dir.iterdir())
    assert names == sorted(p.name for p in again.out_dir.iterdir())
    for name in names:
        if name.startswith("spec-"):
            continue
        assert (tuned.out_dir / name).read_bytes() == (again.out_dir / name).read_bytes(), name


def test_flexolmo_architecture_tunes_its_routers(
    models: Path, proxy: dict[str, Path], tmp_path: Path
) -> None:
    spec = _spec("olmo", "olmo_code, olmo_legal", None)
    tune = _tune_block(proxy).replace("code:", "olmo_code:").replace("legal:", "olmo_legal:")
    plain = build_text(models, tmp_path / "plain", spec)
    tuned = build_text(models, tmp_path / "tuned", spec + tune)
    before, after = tensors(plain.out_dir), tensors(tuned.out_dir)
    changed = sorted(k for k in before if not bit_equal(before[k], after[k]))
    assert changed == [f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)]
    assert config(tuned.out_dir)["architectures"] == ["FlexOlmoForCausalLM"]


def test_plan_lists_the_tuning_step(models: Path, proxy: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(_spec("base", "code, legal", _tune_block(proxy)))
    plan = plan_for(load_spec(path), LocalPathResolver(models))
    assert (
        "tune: router rows and biases of 2 MoE layers, 6 steps of 4 x 32 tokens on proxy text "
        "of code, legal (<= 6 sequences each)"
    ) in str(plan)
    assert plan.proxy == {k: [v / "sample.txt"] for k, v in proxy.items()}


def _plan_error(models: Path, tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(PlanError) as e:
        plan_for(load_spec(path), LocalPathResolver(models))
    return str(e.value)


def _unknown_expert(proxy: dict[str, Path]) -> str:
    return _spec("base", "code, legal", _tune_block(proxy).replace("legal:", "legl:"))


def _top_1(proxy: dict[str, Path]) -> str:
    return _spec("base", "code, legal", _tune_block(proxy)).replace("top_k: 2", "top_k: 1")


def _missing_path(proxy: dict[str, Path]) -> str:
    return _spec("base", "code, legal", _tune_block(proxy, legal="nowhere/*.txt"))


def _base_tokenizer(proxy: dict[str, Path]) -> str:
    block = _tune_block(proxy).replace("tokenizer: bytes", "tokenizer: base")
    return _spec("base", "code, legal", block)


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (
            _unknown_expert,
            ":11: router.tune.proxy.legl: 'legl' is not an expert of this build; expected one "
            "of public, code, legal",
        ),
        (
            _top_1,
            ":10: router.tune: with top_k 1 and renormalised top-k weights every token's one "
            "expert gets weight 1, so the router gets no gradient; use top_k >= 2",
        ),
        (_missing_path, ":11: router.tune.proxy.legal: no files match {tmp}/nowhere/*.txt"),
        (
            _base_tokenizer,
            ":18: router.tune.tokenizer: the base has no tokenizer files to tokenise the proxy "
            "text with",
        ),
    ],
)
def test_plan_errors_name_file_line_and_field(
    models: Path, proxy: dict[str, Path], tmp_path: Path, make_spec, message: str
) -> None:
    msg = _plan_error(models, tmp_path, make_spec(proxy))
    assert msg == f"{tmp_path / 'spec.yaml'}" + message.format(tmp=tmp_path)


def test_unset_environment_variable_is_named(
    models: Path, proxy: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COMPOSER_NO_SUCH_VAR", raising=False)
    block = _tune_block(proxy, legal="${COMPOSER_NO_SUCH_VAR}/legal")
    path = tmp_path / "spec.yaml"
    path.write_text(_spec("base", "code, legal", block))
    with pytest.raises(PlanError) as e:
        plan_for(load_spec(path), LocalPathResolver(models))
    assert str(e.value) == (
        f"{path}:11: router.tune.proxy.legal: '${{COMPOSER_NO_SUCH_VAR}}/legal': environment "
        "variable COMPOSER_NO_SUCH_VAR is not set"
    )
    monkeypatch.setenv("COMPOSER_NO_SUCH_VAR", str(proxy["legal"].parent))
    plan = plan_for(load_spec(path), LocalPathResolver(models))
    assert plan.proxy["legal"] == [proxy["legal"] / "sample.txt"]


def test_too_little_proxy_text_fails_mid_build_and_leaves_nothing(
    models: Path, proxy: dict[str, Path], tmp_path: Path
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("too short")  # fewer bytes than one sequence of 32
    work = tmp_path / "work"
    with pytest.raises(BuildError, match=r"router.tune.proxy.legal: not enough text for one chunk"):
        build_text(
            models, work / "out", _spec("base", "code, legal", _tune_block(proxy, legal=str(short)))
        )
    assert leftovers(work) == []


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ("  tune: {proxy: {}}\n", "router.tune.proxy: must not be empty"),
        (
            "  tune: {proxy: {code: a.txt}, steps: 0}\n",
            "router.tune.steps: must be >= 1, got 0",
        ),
        (
            "  tune: {proxy: {code: []}}\n",
            "router.tune.proxy: expert 'code' names no proxy file",
        ),
        (
            "  tune: {proxy: {code: a.txt}, rate: 1}\n",
            "router.tune.rate: unknown field; expected one of proxy, steps, lr, batch_size, "
            "seq_len, max_chunks, loss_sequences, bf16, tokenizer",
        ),
        (
            "  tune: {proxy: {code: a.txt}, tokenizer: gpt2}\n",
            "router.tune.tokenizer: unknown value 'gpt2'; expected one of base, bytes",
        ),
    ],
)
def test_malformed_tune_blocks(tune: str, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(_spec("base", "code", tune), "s.yaml")
    assert str(e.value).split(": ", 1)[1] == message


def test_tuning_is_refused_for_merges() -> None:
    text = "method: merge\nbase: base\nexperts: [a, b]\nrouter:\n  tune: {proxy: {a: x.txt}}\n"
    with pytest.raises(SpecError) as e:
        parse_spec(text, "s.yaml")
    assert str(e.value) == (
        "s.yaml:5: router.tune: router tuning applies to methods upcycle and compose, not 'merge'"
    )


def test_tune_defaults_are_the_demo_settings() -> None:
    cfg = RouterTuneSpec(proxy={"code": ["x"]})
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.seq_len, cfg.max_chunks, cfg.bf16) == (
        40, 1e-2, 8, 128, 32, "auto",
    )  # fmt: skip


@pytest.mark.parametrize("native", [True, False])
def test_tuning_precision_is_chosen_from_the_reported_capability(
    models: Path,
    proxy: dict[str, Path],
    tmp_path: Path,
    pretend: Callable[[bool], None],
    autocast_seen: set[Any],
    native: bool,
) -> None:
    """router.tune.bf16 defaults to auto: bf16 autocast only where the device has native bf16;
    composition.json records what ran."""
    pretend(native)
    tune = _tune_block(proxy).replace("    bf16: false\n", "    loss_sequences: 2\n")
    res = build_text(models, tmp_path / "out", _spec("base", "code, legal", tune))
    record = json.loads((res.out_dir / "composition.json").read_text())["router_tuning"]
    assert record["compute_dtype"] == ("bfloat16" if native else "float32")
    assert record["loss_sequences_per_expert"] == 2
    assert (torch.bfloat16 if native else None) in autocast_seen
    if native:
        assert None not in autocast_seen  # every forward of the tuning ran under autocast
