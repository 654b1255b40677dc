"""The precision chooser: bfloat16 autocast only where the device computes bf16 natively.

On a CPU without native bf16 (AVX2 only: no ``avx512_bf16`` / ``amx_bf16``) a bf16 matmul is
emulated and about 27x slower than float32 (docs/demo.md), so a hard-coded ``bf16=True`` turns a
3 s training step into 6 minutes. Every precision setting (expert training, router tuning,
Expert Merging, evaluation, the demo) is therefore ``"auto"`` by default, resolved here from the
device's reported capability; ``True`` / ``False`` stay available as explicit overrides.

The capability comes from :func:`probe`: on CPU, the /proc/cpuinfo flags AND torch's own oneDNN
check (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which honours ``ONEDNN_MAX_CPU_ISA``);
on CUDA, ``torch.cuda.is_bf16_supported(including_emulation=False)``. ``COMPOSER_NATIVE_BF16=0``
(or ``1``) overrides what the device reports, e.g. to measure the float32 path on a machine with
AMX. merge/ and router_train/ never import this module: they take the chosen dtype as an argument
(router_train.autocast applies it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator

from router_train.autocast import device_type

if TYPE_CHECKING:
    import torch

ENV_OVERRIDE = "COMPOSER_NATIVE_BF16"
# /proc/cpuinfo flags of CPUs that compute bf16 natively (x86: AVX512-BF16, AMX; arm64: BF16).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Capability:
    """What a device reports about bf16: ``native`` and, for the log line, why."""

    device: str  # "cpu" or "cuda"
    native_bf16: bool
    detail: str


def parse_bf16(value: Any) -> Literal["auto"] | bool:
    """A spec, CLI or environment value (auto, true/false, on/off, 1/0) -> "auto" or a bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if not isinstance(value, str):
        raise ValueError(f"expected auto, true or false, got {value!r}")
    v = value.strip().lower()
    if v == "auto":
        return "auto"
    if v in ("1", "true", "on", "yes"):
        return True
    if v in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"expected auto, true or false, got {value!r}")


# The type of every precision setting (spec fields, TrainConfig, CLI flags).
Bf16Setting = Annotated[Literal["auto"] | bool, BeforeValidator(parse_bf16)]


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU feature flags (x86 ``flags``, arm64 ``Features``), or None when unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def cpu_capability(isa: str, flags: frozenset[str] | None, onednn_bf16: bool) -> Capability:
    """Native bf16 needs both the CPU flag and torch's oneDNN agreeing (``ONEDNN_MAX_CPU_ISA``
    can switch oneDNN's bf16 off on a CPU that has it, and then bf16 is emulated)."""
    found = sorted(f for f in NATIVE_BF16_FLAGS if flags and f in flags)
    if flags is None:
        return Capability("cpu", False, f"{isa}, no /proc/cpuinfo to confirm native bf16")
    if not found:
        return Capability("cpu", False, f"{isa}, no avx512_bf16/amx_bf16 in /proc/cpuinfo")
    if not onednn_bf16:
        return Capability("cpu", False, f"{isa}, {found[0]} present but oneDNN bf16 is off")
    return Capability("cpu", True, f"{isa}, {'/'.join(found)}")


@cache
def _cpu_capability() -> Capability:
    import torch

    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        onednn = False
    return cpu_capability(torch.backends.cpu.get_cpu_capability(), cpu_flags(), onednn)


def _cuda_capability() -> Capability:
    import torch

    name = torch.cuda.get_device_name()
    native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return Capability("cuda", native, f"{name}, {'native' if native else 'no native'} bf16")


def probe(device: str = "cpu") -> Capability:
    """The device's reported bf16 capability (``COMPOSER_NATIVE_BF16`` overrides it). Tests
    monkeypatch this function to pretend another CPU."""
    forced = os.environ.get(ENV_OVERRIDE, "").strip()
    if forced:
        try:
            native = parse_bf16(forced)
        except ValueError:
            raise ValueError(f"{ENV_OVERRIDE}: {forced!r} is not 0 or 1") from None
        if native != "auto":
            return Capability(device, bool(native), f"{ENV_OVERRIDE}={forced}")
    if device == "cuda":
        return _cuda_capability()
    if device == "cpu":
        return _cpu_capability()
    return Capability(device, False, "no bf16 probe for this device")


_logged: set[tuple[str, str]] = set()


def _log_once(device: str, line: str) -> None:
    if (device, line) not in _logged:
        _logged.add((device, line))
        print(f"composer: precision {line}", file=sys.stderr, flush=True)


def choose(setting: Bf16Setting | None = "auto", device: Any = "cpu") -> torch.dtype:
    """The compute dtype for ``setting`` on ``device`` (a name, torch.device or a module whose
    parameters live there): torch.bfloat16 (autocast) or torch.float32. Logs the decision once
    per process, in one line on stderr."""
    import torch

    dev = device_type(device)
    if setting is True or setting is False:
        dtype = torch.bfloat16 if setting else torch.float32
        _log_once(dev, f"{_name(dtype)} on {dev} (bf16: {str(setting).lower()}, set explicitly)")
        return dtype
    if setting not in ("auto", None):
        raise ValueError(f"bf16: expected auto, true or false, got {setting!r}")
    cap = probe(dev)
    dtype = torch.bfloat16 if cap.native_bf16 else torch.float32
    how = "native bf16" if cap.native_bf16 else "bf16 not native"
    _log_once(dev, f"{_name(dtype)} on {dev} (bf16: auto; {how}: {cap.detail})")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype's name as vLLM's ``--dtype`` and config.json spell it (bfloat16, float32)."""
    return str(dtype).removeprefix("torch.")


def _name(dtype: torch.dtype) -> str:
    return "bfloat16 autocast" if dtype_name(dtype) == "bfloat16" else "float32"
