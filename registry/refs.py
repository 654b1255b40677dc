"""Names and `name@version` references."""

from __future__ import annotations

import re

from registry.errors import RegistryError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise RegistryError(
            f"{what}: invalid value '{value}'; use letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit, at most 200 characters)"
        )
    return value


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'code@2' -> ('code', '2'); 'code' -> ('code', None)."""
    name, sep, version = ref.partition("@")
    check_name(name, "expert name")
    if sep:
        check_name(version, "version")
        return name, version
    return name, None
