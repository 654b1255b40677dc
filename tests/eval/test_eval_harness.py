"""`composer eval --lm-eval`: lm-evaluation-harness through a real `composer serve`, with the
expert choice in the X-Composer-Experts header. The harness's loglikelihoods equal transformers'
on the same tokens with the same mask, the opt-out matrix runs once per mask, an opted-out
expert is refused by the server (and the command fails naming it), and runs are recorded.

One server for the module (cli.local_server, exactly as `composer eval` starts it); the CLI
runs point at it with --server, so the module costs one engine start.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cli.local_server import LocalServer, local_server
from composer.eval.routing import load_masked
from tests.eval.conftest import SLOTS, InProcessCli, make_build
from tests.serve.registry_builds import set_policy

pytestmark = pytest.mark.slow

TASKS = Path(__file__).parent / "lm_tasks"


@dataclass
class Served:
    cli: InProcessCli
    build: Path
    server: LocalServer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("harness")
    cli = InProcessCli(root / "home", f"sqlite:///{root / 'registry.db'}")
    build = make_build(cli, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPOSER_HOME", str(cli.home))
        mp.setenv("COMPOSER_DATABASE_URL", cli.db_url)
        with local_server("evaluated", "evaluated", root / "serve.log", 256, 64 << 20) as server:
            yield Served(cli, build, server)


def _eval(served: Served, *args: str | Path, ok: bool = True) -> tuple[int, str]:
    res = served.cli("eval", "evaluated", "--server", served.server.url, *args, ok=ok)
    return res.exit_code, res.stdout if ok else res.stderr + res.stdout


def _loglikelihood(model: torch.nn.Module, tok: object, context: str, continuation: str) -> float:
    """lm-eval's own split (whole text encoded, context prefix cut off), scored in float32."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_harness_equals_transformers_per_mask_and_is_recorded(served: Served, tmp_path: Path):
    from transformers import AutoTokenizer

    code, out = _eval(
        served, "--lm-eval", "tiny_words,composer_domains_code", "--include-path", TASKS,
        "--lm-eval-limit", "4", "--opt-out-matrix", "--log-samples", "--json", "--out", tmp_path,
    )  # fmt: skip
    report = json.loads(out)
    harness = report["lm_eval"]
    runs = harness["runs"]
    assert runs[0]["used"] == SLOTS and runs[0]["without"] is None
    assert [r["without"] for r in runs[1:]] == SLOTS
    assert all(r["used"] == [n for n in SLOTS if n != r["without"]] for r in runs[1:])
    tok = AutoTokenizer.from_pretrained(served.build)
    differs = 0
    for run in runs:
        model = load_masked(served.build, SLOTS, run["used"])[0]
        samples = run["samples"]["tiny_words"]
        assert len(samples) == 4
        for s in samples:
            for req in s["requests"]:
                want = _loglikelihood(model, tok, req["context"], req["continuation"])
                assert req["loglikelihood"] == pytest.approx(want, rel=1e-3, abs=1e-3)
        if run is not runs[0]:
            full = runs[0]["samples"]["tiny_words"]
            differs += any(
                abs(a["loglikelihood"] - b["loglikelihood"]) > 1e-2
                for x, y in zip(samples, full, strict=True)
                for a, b in zip(x["requests"], y["requests"], strict=True)
            )
        assert set(run["results"]) == {"tiny_words", "composer_domains_code"}
        assert 0.0 <= run["results"]["tiny_words"]["acc"] <= 1.0
    assert differs >= 2  # masks reach the engine: excluding experts changes the numbers
    files = harness["task_files"]
    assert any(f.endswith("tiny_words/docs.jsonl") for f in files)
    assert any(f.endswith("composer_domains/data/code.jsonl") for f in files)
    shown = json.loads(served.cli("registry", "show", "evaluated", "--json").stdout)
    run = shown["eval_runs"][-1]
    assert run["id"] == report["run_id"]
    assert "--lm-eval tiny_words,composer_domains_code" in run["command"]
    recorded = run["results"]["lm_eval"]
    assert [r["used"] for r in recorded["runs"]] == [r["used"] for r in runs]
    assert recorded["runs"][0]["results"] == runs[0]["results"]


def test_bad_input_fails_before_any_server_starts(served: Served, tmp_path: Path) -> None:
    cases = [
        (("--lm-eval", "tiny_words,no_such_task", "--include-path", TASKS), "no_such_task"),
        (("--lm-eval", "tiny_words", "--include-path", tmp_path / "missing"), "--include-path"),
        (("--lm-eval", " , "), "--lm-eval: no task named"),
        (("--lm-eval", "tiny_words", "--routing"), "--routing: needs --data"),
        ((), "--data NAME=PATH_OR_GLOB"),
    ]
    before = len(json.loads(served.cli("registry", "show", "evaluated", "--json").stdout)
                 ["eval_runs"])  # fmt: skip
    for args, message in cases:
        res = served.cli("eval", "evaluated", *args, "--out", tmp_path, ok=False)
        assert res.exit_code == 2, (args, res.stdout)
        assert message in " ".join((res.stderr + res.stdout).split()), (args, res.stderr)
    assert not list(tmp_path.glob("*serve.log"))  # no server was started for any of them
    after = json.loads(served.cli("registry", "show", "evaluated", "--json").stdout)["eval_runs"]
    assert len(after) == before


def test_opted_out_expert_is_refused_by_the_server_and_never_scored(
    served: Served, tmp_path: Path
) -> None:
    set_policy(served.cli, "gamma", "opt_out")
    try:
        deadline = time.monotonic() + 30
        while True:  # the server reads policies in the background (--policy-ttl 2 s)
            status, doc = served.server.post(
                "/v1/completions", {"model": "evaluated", "prompt": [1], "max_tokens": 1},
                {"X-Composer-Experts": "include=gamma"},
            )  # fmt: skip
            if status == 403 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 403
        args = ("--lm-eval", "tiny_words", "--include-path", TASKS, "--lm-eval-limit", "2")
        code, err = _eval(served, *args, "--experts", '{"include": ["public", "gamma"]}',
                          ok=False)  # fmt: skip
        assert code == 2 and "gamma" in err and "403" in err
        code, out = _eval(served, *args, "--log-samples", "--json", "--out", tmp_path)
        run = json.loads(out)["lm_eval"]["runs"][0]
        assert run["used"] == ["public", "alpha", "beta"]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(served.build)
        model = load_masked(served.build, SLOTS, run["used"])[0]
        for s in run["samples"]["tiny_words"]:
            for req in s["requests"]:
                want = _loglikelihood(model, tok, req["context"], req["continuation"])
                assert req["loglikelihood"] == pytest.approx(want, rel=1e-3, abs=1e-3)
    finally:
        set_policy(served.cli, "gamma", "opt_in")
