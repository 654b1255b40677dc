"""Errors a build raises; the CLI prints str(error) and exits non-zero."""

from __future__ import annotations

from composer.spec import SpecError
from registry.errors import ComposerError


class BuildError(ComposerError):
    """A build that cannot go ahead (bad inputs, refused consent, failed checks)."""


class PlanError(BuildError):
    """The spec is valid on its own but does not fit its inputs (layers, shapes, files)."""


class MethodNotAvailable(BuildError, NotImplementedError):
    """A method the schema accepts but this version cannot build yet."""


class OptedOutError(BuildError):
    """One or more inputs' owners have opted out of use."""


class AnchorMismatchError(BuildError):
    """A FlexOlmo expert's shared weights differ from the public model's."""


def located(err: ComposerError, where: str) -> ComposerError:
    """``err`` with ``where`` (a spec's ``file:line: field``, see Spec.where) in front of its
    message, as the same class where it takes one message (else a PlanError): resolver and
    registry errors found while planning then point at the spec line that named the input."""
    text = f"{where}: {err.message if isinstance(err, SpecError) else err}"
    try:
        out = type(err)(text)
    except TypeError:
        out = PlanError(text)
    return out
