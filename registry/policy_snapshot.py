"""What a server needs from the registry to enforce data-use policy, in one bounded read.

Policy binds to registry ids, never to display names: a build's composition.json records, for
each router slot, the expert version it was built from (id and content sha256). The server asks
for exactly those versions; a version the registry no longer has (or whose bytes differ) is
absent from the snapshot, and the server denies it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from registry.models import ApiKey, ExpertVersion, Policy


@dataclass(frozen=True)
class VersionPolicy:
    """One expert version as policy sees it."""

    version_id: int
    expert_id: int
    ref: str  # name@version, for messages and logs
    sha256: str
    policy: Policy


@dataclass(frozen=True)
class PolicySnapshot:
    """Policies of the asked-for expert versions, and every live key's allowed expert ids."""

    versions: dict[int, VersionPolicy] = field(default_factory=dict)
    keys: dict[str, frozenset[int]] = field(default_factory=dict)  # key sha256 -> expert ids


def read_policy_snapshot(engine: Engine, version_ids: Iterable[int]) -> PolicySnapshot:
    """One read transaction: the versions' policies and the non-revoked keys.

    Use an engine from `registry.db.make_reader_engine`, so the read never takes a write lock
    and never waits longer than its timeout.
    """
    ids = sorted(set(version_ids))
    with Session(engine) as s, s.begin():
        versions: dict[int, VersionPolicy] = {}
        if ids:
            for ev in s.scalars(select(ExpertVersion).where(ExpertVersion.id.in_(ids))):
                versions[ev.id] = VersionPolicy(
                    version_id=ev.id,
                    expert_id=ev.expert_id,
                    ref=ev.ref,
                    sha256=ev.artifact.manifest_sha256,
                    policy=Policy(ev.policy),
                )
        keys = {
            k.key_sha256: frozenset(e.id for e in k.allowed)
            for k in s.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None)))
        }
    return PolicySnapshot(versions=versions, keys=keys)
