"""A build's composition.json read back: which registry input sits in each router slot.

`composer build` writes the file (composer/manifest.py); servers read it to bind each expert
slot to the registry version it was built from (id and content sha256), so that policy follows
the registered expert, never the display name a spec gave it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from registry.errors import ComposerError

COMPOSITION_FILE = "composition.json"
COMPOSITION_FORMAT = "composer-composition/1"


class CompositionError(ComposerError):
    """A composition.json that does not describe the checkpoint beside it."""


@dataclass(frozen=True)
class SlotBinding:
    """One router slot of a served model and the registered input it came from."""

    index: int
    name: str  # display name (config.json `composer_experts`)
    kind: str  # "base" | "ffn" | "dense" | "lora" | "unbound"
    version_id: int | None = None  # registry ExpertVersion id; None: not a registered expert
    sha256: str | None = None
    ref: str | None = None  # the reference the spec gave (name or name@version), for messages

    @property
    def governed(self) -> bool:
        """Whether registry policy decides who may use this slot (the public base never)."""
        return self.kind != "base" and self.version_id is not None


def unbound(names: Sequence[str]) -> list[SlotBinding]:
    """Slots of a model no registry knows about (no policy applies)."""
    return [SlotBinding(i, n, "unbound") for i, n in enumerate(names)]


def read_slot_bindings(model_dir: str | Path, names: Sequence[str]) -> list[SlotBinding] | None:
    """The bindings recorded beside a checkpoint, or None if it has no composition.json.

    Raises CompositionError when the file is unreadable or its experts are not the checkpoint's
    (other names or order than config.json's `composer_experts`).
    """
    path = Path(model_dir) / COMPOSITION_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        experts = doc["experts"]
        slots = [
            SlotBinding(
                index=int(e["index"]),
                name=str(e["name"]),
                kind=str(e["kind"]),
                version_id=None if e["kind"] == "base" else _opt_int(e.get("registry_id")),
                sha256=e.get("sha256"),
                ref=e.get("ref"),
            )
            for e in experts
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompositionError(f"{path}: unreadable composition record ({e})") from None
    recorded = [s.name for s in sorted(slots, key=lambda s: s.index)]
    if recorded != list(names) or [s.index for s in slots] != list(range(len(slots))):
        raise CompositionError(
            f"{path}: experts {recorded} do not match the checkpoint's {list(names)} "
            f"(config.json composer_experts)"
        )
    return slots


def _opt_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]
