"""`composer eval` on the served engine: perplexity equal to transformers with the router bias
(and masks), the opt-out matrix equal to single-mask runs, routing fractions, policy fail-closed,
and runs recorded against the build. All on one shared engine (tests/eval/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from composer.eval.routing import load_masked, routing_stats
from composer.eval.run import EvalOptions, prepare, run_eval
from composer.eval.scoring import domain_perplexities
from composer.train.evaluate import perplexity
from registry.checkpoint import hash_file
from router_train.biased_router import load_composed
from serve.offline import ExpertChoiceError
from tests.eval.conftest import MAX_CHUNKS, SEQ_LEN, SLOTS, Evaluated

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _options(tmp_path: Path, **kw: object) -> EvalOptions:
    return EvalOptions(seq_len=SEQ_LEN, max_chunks=MAX_CHUNKS, out_dir=tmp_path, progress=False,
                       **kw)  # fmt: skip


def _assert_png(path: str | Path) -> None:
    from PIL import Image

    assert Path(path).read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()


def test_engine_perplexity_equals_transformers_with_bias_and_masks(
    evaluated: Evaluated, tmp_path: Path
) -> None:
    engine, build = evaluated.engine, evaluated.build
    data = prepare(build, evaluated.data, _options(tmp_path))
    assert {d: len(c) for d, c in data.chunks.items()} == {"code": MAX_CHUNKS, "docs": MAX_CHUNKS}
    full = engine.select(None)
    assert list(full) == SLOTS
    got = domain_perplexities(engine, data.chunks, full)
    biased = load_composed(build)
    for d, chunks in data.chunks.items():
        assert got[d] == pytest.approx(perplexity(biased, chunks), rel=5e-3)
    # The bias matters: without it transformers is off by more than the tolerance.
    plain = load_masked(build, SLOTS, SLOTS)[0]
    for layer in plain.model.layers:
        layer.mlp.gate.router_bias.zero_()
    assert any(abs(perplexity(plain, c) / got[d] - 1) > 5e-3 for d, c in data.chunks.items())
    # A mask is the same in both paths.
    without_beta = engine.select({"exclude": ["beta"]})
    masked = domain_perplexities(engine, data.chunks, without_beta)
    model = load_masked(build, SLOTS, without_beta)[0]
    for d, chunks in data.chunks.items():
        assert masked[d] == pytest.approx(perplexity(model, chunks), rel=5e-3)
        assert masked[d] != pytest.approx(got[d], rel=1e-4)


def test_opt_out_matrix_equals_single_mask_runs_and_routing(
    evaluated: Evaluated, tmp_path: Path
) -> None:
    engine = evaluated.engine
    options = _options(tmp_path, opt_out_matrix=True, routing=True, label="evaluated")
    data = prepare(evaluated.build, evaluated.data, options)
    report = run_eval(engine, evaluated.build, data, None, options)
    matrix = report["opt_out_matrix"]
    assert matrix["experts"] == SLOTS and matrix["domains"] == ["code", "docs"]
    for e in SLOTS:
        single = domain_perplexities(engine, data.chunks, engine.select({"exclude": [e]}))
        for d in matrix["domains"]:
            assert matrix["perplexity"][e][d] == pytest.approx(single[d], rel=1e-6)
            want = single[d] / report["perplexity"][d] - 1
            assert matrix["relative_change"][e][d] == pytest.approx(want, rel=1e-6, abs=1e-9)
    _assert_png(report["figures"]["opt_out_matrix"]["path"])
    _assert_png(report["figures"]["routing"]["path"])
    assert report["routing"]["source"] == "transformers"
    for layers in report["routing"]["layers"].values():
        assert [r["layer"] for r in layers] == [0, 1]
        for r in layers:
            assert sum(r["fractions"].values()) == pytest.approx(1.0)
            assert r["entropy"] > 0 and r["max_vio"] >= 0


def test_routing_gives_a_masked_expert_nothing(evaluated: Evaluated, tmp_path: Path) -> None:
    data = prepare(evaluated.build, evaluated.data, _options(tmp_path))
    allowed = evaluated.engine.select({"exclude": ["gamma"]})
    stats = routing_stats(evaluated.build, data.chunks, SLOTS, allowed)
    full = routing_stats(evaluated.build, data.chunks, SLOTS, SLOTS)
    for domain, layers in stats.items():
        for r, r_full in zip(layers, full[domain], strict=True):
            assert r["fractions"]["gamma"] == 0.0
            assert sum(r["fractions"].values()) == pytest.approx(1.0)
            assert r_full["fractions"]["gamma"] > 0.0  # it is used when allowed


def _runs(evaluated: Evaluated) -> list[dict]:
    doc = json.loads(evaluated.cli("registry", "show", "evaluated", "--json").stdout)
    return doc["eval_runs"]


def test_cli_eval_records_the_run_and_registry_show_lists_it(
    evaluated: Evaluated, tmp_path: Path
) -> None:
    before = len(_runs(evaluated))
    data_args = [a for d in evaluated.data for a in ("--data", d)]
    res = evaluated.cli(
        "eval", "evaluated", *data_args, "--experts", '{"exclude": ["alpha"]}',
        "--seq-len", SEQ_LEN, "--max-chunks", MAX_CHUNKS, "--out", tmp_path, "--json",
    )  # fmt: skip
    report = json.loads(res.stdout)  # exactly one document
    assert report["experts"]["used"] == ["public", "beta", "gamma"]
    data = prepare(evaluated.build, evaluated.data, _options(tmp_path))
    want = domain_perplexities(evaluated.engine, data.chunks, ("public", "beta", "gamma"))
    assert report["perplexity"] == pytest.approx(want, rel=1e-6)
    runs = _runs(evaluated)
    assert len(runs) == before + 1
    run = runs[-1]
    assert run["id"] == report["run_id"]
    assert run["mask"]["used"] == ["public", "beta", "gamma"]
    assert run["mask"]["request"] == {"exclude": ["alpha"]}
    assert run["command"].startswith("composer eval evaluated --data 'code=")
    files = run["data"]["code"]["files"]
    assert files and all(f["sha256"] == hash_file(Path(f["path"]))[0] for f in files)
    assert run["results"]["perplexity"] == pytest.approx(want, rel=1e-6)
    by_id = json.loads(evaluated.cli("registry", "show", "#1", "--json").stdout)
    assert by_id["eval_runs"][-1]["id"] == report["run_id"]
    table = evaluated.cli("registry", "show", "evaluated").stdout
    assert "eval runs" in table and "public,beta,gamma" in table
    # The build's folder is the same build: recorded against it too.
    res = evaluated.cli(
        "eval", evaluated.build, "--data", evaluated.data[0], "--seq-len", SEQ_LEN,
        "--max-chunks", MAX_CHUNKS, "--out", tmp_path, "--json",
    )  # fmt: skip
    assert json.loads(res.stdout)["build_id"] == by_id["id"]
    assert len(_runs(evaluated)) == before + 2


def test_opted_out_expert_is_never_used_and_asking_for_it_names_it(
    evaluated: Evaluated, tmp_path: Path
) -> None:
    engine, cli = evaluated.engine, evaluated.cli
    data = prepare(evaluated.build, evaluated.data, _options(tmp_path))
    before = len(_runs(evaluated))
    cli("registry", "opt-out", "gamma", "--owner", "acme")
    try:
        assert engine.select(None) == ("public", "alpha", "beta")
        with pytest.raises(ExpertChoiceError, match="gamma"):
            engine.select({"include": ["public", "gamma"]})
        with pytest.raises(ExpertChoiceError, match="gamma"):
            engine.prompt_logprobs(data.chunks["code"], SLOTS)
        res = cli(
            "eval", "evaluated", "--data", evaluated.data[0], "--experts",
            '{"include": ["gamma"]}', "--out", tmp_path / "figs", ok=False,
        )  # fmt: skip
        assert res.exit_code == 2
        assert "--experts" in res.stderr and "gamma" in res.stderr
        assert len(_runs(evaluated)) == before
        cli("registry", "restrict", "gamma", "--owner", "acme")  # no key lists it: not usable
        assert engine.select(None) == ("public", "alpha", "beta")
        with pytest.raises(ExpertChoiceError, match="gamma"):
            engine.select({"exclude": ["gamma"]})
    finally:
        cli("registry", "opt-in", "gamma", "--owner", "acme")
    assert engine.select(None) == tuple(SLOTS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "code=/nonexistent/*.py"], "--data code=/nonexistent/*.py: no files match"),
        (["--data", "just-a-path"], "--data just-a-path: expected NAME=PATH_OR_GLOB"),
        (["--data", "{data}", "--experts", "{{not json"], "--experts: not JSON"),
        (["--data", "{data}", "--experts", '{{"only": ["beta"]}}'], "--experts"),
        (["--data", "{data}", "--experts", '{{"include": ["ghost"]}}'], "ghost"),
        (["--data", "{data}", "--seq-len", "10000000"], "--seq-len 10000000"),
        (["--data", "{data}", "--max-chunks", "0"], "--max-chunks"),
        (["--data", "{data}", "--routing", "--out", "{file}"], "exists and is not a folder"),
    ],
)
def test_bad_input_exits_2_naming_it_and_writes_nothing(
    evaluated: Evaluated, tmp_path: Path, args: list[str], message: str
) -> None:
    before = len(_runs(evaluated))
    (tmp_path / "a-file").write_text("")
    args = [a.format(data=evaluated.data[0], file=tmp_path / "a-file") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "figs")]
    res = evaluated.cli("eval", "evaluated", *args, "--json", ok=False)
    assert res.exit_code == 2, res.stderr
    assert message in res.stderr
    assert res.stdout == ""
    assert not (tmp_path / "figs").exists()
    assert len(_runs(evaluated)) == before
