"""The one error type merge/ raises for bad input."""

from __future__ import annotations

from registry.errors import ComposerError


class MergeError(ComposerError, ValueError):
    """Bad merge input. The message names the tensor, the expert and the parameter at fault."""
