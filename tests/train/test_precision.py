"""The precision chooser (composer.precision): bf16 autocast only where the device reports
native bf16, explicit true/false overrides, one log line, and the drivers that use it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from composer import precision
from composer.precision import choose, cpu_capability, cpu_flags, parse_bf16
from composer.spec import SpecError
from composer.spec_load import parse_spec
from composer.train.evaluate import perplexity
from composer.train.expert import train_expert
from registry.errors import ComposerError

AVX2_FLAGS = frozenset({"fpu", "sse2", "avx", "fma", "avx2", "bmi2"})  # the CPU
AMX_FLAGS = AVX2_FLAGS | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize(
    ("isa", "flags", "onednn", "native"),
    [
        ("AVX2", AVX2_FLAGS, False, False),  # the machine: bf16 emulated, 27x slower
        ("AVX512", AMX_FLAGS, True, True),
        ("AVX512", AVX2_FLAGS | {"avx512f", "avx512_bf16"}, True, True),
        ("AVX2", AMX_FLAGS, False, False),  # ONEDNN_MAX_CPU_ISA=AVX2 on an AMX machine
        ("AVX512", AVX2_FLAGS | {"avx512f"}, True, False),  # AVX-512 without BF16: emulated
        ("DEFAULT", None, True, False),  # no /proc/cpuinfo: never guess bf16
    ],
)
def test_cpu_capability(isa: str, flags: frozenset[str] | None, onednn: bool, native: bool) -> None:
    cap = cpu_capability(isa, flags, onednn)
    assert cap.native_bf16 is native and isa in cap.detail


def test_cpu_flags_read_x86_and_arm(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}
    assert "bf16" in (cpu_flags(arm) or ())
    assert cpu_flags(tmp_path / "missing") is None


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_reported_capability_and_explicit_settings_win(
    pretend: Callable[[bool], None], native: bool
) -> None:
    pretend(native)
    assert choose("auto") == (torch.bfloat16 if native else torch.float32)
    assert choose(None) == choose("auto")
    assert choose(True) == torch.bfloat16 and choose(False) == torch.float32
    with pytest.raises(ValueError, match="expected auto, true or false"):
        choose("yes please")  # type: ignore[arg-type]


def test_the_choice_is_logged_once_in_one_line(
    pretend: Callable[[bool], None], capsys: pytest.CaptureFixture[str]
) -> None:
    pretend(False)
    for _ in range(3):
        choose("auto")
    err = capsys.readouterr().err.splitlines()
    assert err == ["composer: precision float32 on cpu (bf16: auto; bf16 not native: pretended)"]


def test_environment_override_of_the_reported_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(precision.ENV_OVERRIDE, "1")
    assert precision.probe().native_bf16 is True and choose("auto") == torch.bfloat16
    monkeypatch.setenv(precision.ENV_OVERRIDE, "0")
    assert precision.probe().native_bf16 is False and choose("auto") == torch.float32
    monkeypatch.setenv(precision.ENV_OVERRIDE, "maybe")
    with pytest.raises(ValueError, match="COMPOSER_NATIVE_BF16"):
        precision.probe()


def test_cuda_uses_torch_cuda_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(precision.ENV_OVERRIDE)
    calls: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    cap = precision.probe("cuda")
    assert cap.native_bf16 is True and calls == [False]  # emulated bf16 is not native


@pytest.mark.parametrize(
    ("value", "want"),
    [("auto", "auto"), ("true", True), ("off", False), (1, True), (0, False), (True, True)],
)
def test_parse_bf16(value: object, want: object) -> None:
    assert parse_bf16(value) == want


def test_spec_field_is_auto_by_default_and_names_the_line(tmp_path: Path) -> None:
    text = "method: compose\nstyle: flexolmo\nbase: b\nexperts: [a]\nrouter:\n  tune:\n"
    text += "    proxy: {a: x}\n"
    assert parse_spec(text).router.tune.bf16 == "auto"  # type: ignore[union-attr]
    assert parse_spec(text + "    bf16: false\n").router.tune.bf16 is False  # type: ignore[union-attr]
    with pytest.raises(SpecError, match=r"s.yaml:8: router.tune.bf16: expected auto, true or"):
        parse_spec(text + "    bf16: maybe\n", "s.yaml")


@pytest.mark.parametrize("native", [True, False])
def test_training_and_evaluation_use_the_choice(
    pretend: Callable[[bool], None],
    tmp_path: Path,
    tiny_llama: Path,
    pattern_data: object,
    autocast_seen: set[torch.dtype | None],
    native: bool,
) -> None:
    pretend(native)
    want = torch.bfloat16 if native else None
    train_expert(
        tiny_llama, pattern_data, tmp_path / "e", domain="code", steps=2, batch_size=4,  # type: ignore[arg-type]
        progress=False, max_heldout_chunks=4, embed_chunks=4,
    )  # fmt: skip
    assert want in autocast_seen  # training steps and held-out perplexity
    autocast_seen.clear()
    perplexity(tmp_path / "e", torch.randint(0, 256, (2, 16)))
    assert autocast_seen == {want}
    autocast_seen.clear()
    train_expert(
        tiny_llama, pattern_data, tmp_path / "f", domain="code", steps=1, batch_size=4,  # type: ignore[arg-type]
        progress=False, max_heldout_chunks=2, embed_chunks=4, bf16=not native,
    )  # fmt: skip
    assert (torch.bfloat16 if not native else None) in autocast_seen  # explicit setting wins


@pytest.mark.parametrize(("flag", "want"), [(None, "auto"), ("true", True), ("off", False)])
def test_expert_train_cli_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: str | None, want: object
) -> None:
    """`composer expert train --bf16` reaches the trainer (auto when not given)."""
    from typer.testing import CliRunner

    import composer.train.expert as et
    from cli.main import app

    got: dict[str, object] = {}

    def fake_train(*args: object, **kwargs: object) -> object:
        got.update(kwargs)
        raise ComposerError("stopped before training")

    monkeypatch.setattr(et, "train_expert", fake_train)
    args = ["expert", "train", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")]
    args += ["--domain", "d", *(["--bf16", flag] if flag else [])]
    CliRunner().invoke(app, args)
    assert got["bf16"] == want


def test_expert_train_cli_refuses_a_bad_flag(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    args = ["expert", "train", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [*args, "--domain", "d", "--bf16", "maybe"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines() == ["error: --bf16: expected auto, true or false, got 'maybe'"]
