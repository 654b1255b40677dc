"""Resolve spec inputs against the registry: `name` / `name@version` -> verified local folders.

Anything that looks like a path (contains a '/' or starts with '.' or '~') goes to the local
resolver instead, so specs can mix registered experts and checkpoints on disk.
"""

from __future__ import annotations

from typing import Literal

from composer.inputs import LocalPathResolver, ResolvedInput, ResolveError
from registry.service import RegistryService, register_hint


def looks_like_path(ref: str) -> bool:
    return "/" in ref or ref.startswith((".", "~"))


class RegistryResolver:
    def __init__(self, service: RegistryService, local: LocalPathResolver | None = None) -> None:
        self.service = service
        self.local = local or LocalPathResolver()

    def resolve(self, ref: str, *, role: Literal["base", "expert"]) -> ResolvedInput:
        if looks_like_path(ref):
            return self.local.resolve(ref, role=role)
        if role == "base":
            base, path = self.service.base_for_build(ref)
            return ResolvedInput(
                ref=ref,
                path=path,
                name=base.name,
                kind="base",
                registry_id=base.id,
                sha256=base.artifact.manifest_sha256,
                base_fingerprint=base.fingerprint,
            )
        doc, path = self.service.expert_for_build(ref)
        return ResolvedInput(
            ref=ref,
            path=path,
            name=doc["name"],
            kind=doc["kind"],
            registry_id=doc["id"],
            version=doc["version"],
            sha256=doc["sha256"],
            owner=doc["owner"],
            policy=doc["policy"],
            domain=doc["domain"],
            base_fingerprint=doc["base_fingerprint"],
        )


class NoRegistryResolver(LocalPathResolver):
    """Checkpoint folders only, for when there is no registry: a reference that is no folder
    says where the registry was looked for and which commands would make and fill one."""

    def __init__(self, looked_at: str) -> None:
        super().__init__()
        self.looked_at = looked_at  # e.g. "no registry at sqlite:///... (COMPOSER_HOME=...)"

    def resolve(self, ref: str, *, role: Literal["base", "expert"]) -> ResolvedInput:
        try:
            return super().resolve(ref, role=role)
        except ResolveError as e:
            if looks_like_path(ref):
                raise
            raise ResolveError(
                f"{e}, and there is no registry to look it up in: {self.looked_at}; create one "
                f"with `composer registry init`, then {register_hint(role, ref)}"
            ) from None
