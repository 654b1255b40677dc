"""Apply a compute dtype chosen elsewhere: bf16 autocast or plain float32 forward passes.

composer.precision decides the dtype from the device's capability; the training and tuning maths
here only take the decision as an argument and run their forward passes under this context.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch


def autocast(dtype: torch.dtype, device: Any = "cpu") -> AbstractContextManager[Any]:
    """bfloat16 autocast when ``dtype`` is bfloat16, a no-op context for float32."""
    return torch.autocast(
        device_type(device), dtype=torch.bfloat16, enabled=dtype == torch.bfloat16
    )


def device_type(device: Any) -> str:
    """The device type (cpu, cuda) of a name, a torch.device or a module's first parameter."""
    if isinstance(device, torch.nn.Module):
        p = next(device.parameters(), None)
        return p.device.type if p is not None else "cpu"
    return torch.device(device).type
