"""Data-use policy as the server sees it: which experts a caller may use, re-read from the
registry at most every `ttl` seconds (so an opt-out shows within a few seconds, no restart)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from serve.experts import PUBLIC

OPT_IN, OPT_OUT, RESTRICTED = "opt_in", "opt_out", "restricted"


@dataclass(frozen=True)
class PolicySnapshot:
    """Expert name -> policy (latest version), and live key sha256 -> expert names it lists."""

    policies: dict[str, str] = field(default_factory=dict)
    keys: dict[str, frozenset[str]] = field(default_factory=dict)

    def permitted(self, names: Sequence[str], key_sha256: str | None) -> set[str]:
        """The model's experts this caller may use.

        - "public" always; experts the registry does not know are not governed by it.
        - opt_out: nobody. restricted: only keys that list the expert.
        - opt_in: anyone, except that a key listing experts is scoped to that list.
        """
        listed = self.keys.get(key_sha256, frozenset()) if key_sha256 else frozenset()
        return {n for n in names if _may_use(n, self.policies.get(n), listed)}


def _may_use(name: str, policy: str | None, listed: frozenset[str]) -> bool:
    if name == PUBLIC or policy is None:
        return True
    if policy == OPT_IN:
        return not listed or name in listed
    return policy == RESTRICTED and name in listed


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def read_snapshot(url: str) -> PolicySnapshot:
    """One read of the registry: policies of every expert's latest version, and live keys."""
    from sqlalchemy import select

    from registry.db import Registry
    from registry.models import ApiKey, Expert, ExpertVersion

    reg = Registry(url)
    try:
        with reg.session() as s:
            policies: dict[str, str] = {}
            rows = s.execute(
                select(Expert.name, ExpertVersion.policy)
                .join(ExpertVersion, ExpertVersion.expert_id == Expert.id)
                .order_by(ExpertVersion.id)
            )
            for name, policy in rows:  # later versions overwrite earlier ones
                policies[name] = str(policy.value if hasattr(policy, "value") else policy)
            keys = {
                k.key_sha256: frozenset(e.name for e in k.allowed)
                for k in s.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None)))
            }
        return PolicySnapshot(policies=policies, keys=keys)
    finally:
        reg.close()


class PolicySource:
    """Cached view of the registry's policy; `registry_url=None` means no registry (no policy)."""

    def __init__(self, registry_url: str | None, ttl: float = 2.0) -> None:
        self.url = registry_url
        self.ttl = ttl
        self._snapshot = PolicySnapshot()
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def snapshot(self) -> PolicySnapshot:
        if self.url is None:
            return self._snapshot
        with self._lock:
            if time.monotonic() - self._read_at >= self.ttl:
                # On a failed read keep the last good snapshot (policies already enforced);
                # the first read has none, so the error propagates and the request fails.
                try:
                    self._snapshot = read_snapshot(self.url)
                    self._read_at = time.monotonic()
                except Exception:
                    if self._read_at == float("-inf"):
                        raise
            return self._snapshot
