"""Progress bars of long build steps (tqdm on stderr, off when not asked for or empty)."""

from __future__ import annotations

from typing import Any


def bar(total: int, desc: str, enabled: bool, unit: str = "tensor") -> Any:
    """A tqdm bar that leaves no line behind; a no-op bar when ``enabled`` is false."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total == 0, leave=False)
