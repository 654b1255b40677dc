"""Errors the registry raises for bad input; the CLI turns each into one line and exit code 2."""

from __future__ import annotations


class ComposerError(Exception):
    """A user-facing error: the message names the problem and the file or field at fault."""

    exit_code = 2


class RegistryError(ComposerError):
    """Bad input to a registry operation (unknown name, duplicate, wrong owner...)."""


class CheckpointError(ComposerError):
    """A checkpoint or adapter folder that cannot be registered as it is."""


class NotInitialisedError(ComposerError):
    """The database has no registry schema yet."""


class IntegrityFailure(ComposerError):
    """Stored bytes no longer match their content address."""

    exit_code = 1
