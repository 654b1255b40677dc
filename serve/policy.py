"""Data-use policy as the server sees it: who may use which router slot, kept fresh off the
request path.

- Slots bind to registry ids (registry/composition.py), not to display names.
- A background thread re-reads the registry every `interval` seconds with bounded waits
  (registry.db.make_reader_engine); requests only look at the last good snapshot, so a busy
  or lost registry never stalls them.
- A snapshot older than `max_staleness` is not used: requests get 503 naming the cause and
  /health turns unhealthy, until a read succeeds again (fail closed, never stale forever).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from registry.composition import SlotBinding, read_slot_bindings, unbound
from registry.errors import ComposerError
from registry.models import Policy
from registry.policy_snapshot import PolicySnapshot, read_policy_snapshot

log = logging.getLogger("composer.serve.policy")


class PolicyUnavailable(Exception):
    """The server cannot tell what a request may use (no fresh policy): answer 503."""


def expert_names(model_path: str | Path) -> list[str]:
    """Router-order expert names from config.json (`composer_experts`, which `composer build`
    writes), else expert_<i>."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    names = config.get("composer_experts")
    if names:
        return [str(n) for n in names]
    n = config.get("num_local_experts") or config.get("num_experts") or 0
    return [f"expert_{i}" for i in range(int(n))]


def load_bindings(model_path: str | Path, registry_url: str | None) -> list[SlotBinding]:
    """Each router slot's registry binding, or refuse to serve if they cannot be told.

    Without a registry nothing is governed. With one, a composer build must carry its
    composition.json: experts named by `composer_experts` but with no record of where they
    came from would otherwise run ungoverned.
    """
    names = expert_names(model_path)
    if registry_url is None:
        return unbound(names)
    bindings = read_slot_bindings(model_path, names)
    if bindings is not None:
        return bindings
    config = json.loads((Path(model_path) / "config.json").read_text())
    if config.get("composer_experts"):
        raise ComposerError(
            f"{Path(model_path) / 'composition.json'} is missing: the experts of this build "
            f"cannot be bound to their registry policies; serve the folder `composer build` wrote"
        )
    log.warning("%s was not built by composer: its experts are not governed", model_path)
    return unbound(names)


def permitted(
    bindings: Sequence[SlotBinding], snapshot: PolicySnapshot, key_sha256: str | None
) -> set[str]:
    """Names of the slots this caller may use.

    - Ungoverned slots (the public base, local inputs, models without a registry): everyone.
    - A governed slot whose version the registry no longer has, or whose bytes differ: nobody.
    - opt_out: nobody. restricted: only keys that list the expert.
    - opt_in: anyone, except that a key listing experts is scoped to that list.
    """
    listed = snapshot.keys.get(key_sha256, frozenset()) if key_sha256 else frozenset()
    out = set()
    for b in bindings:
        if not b.governed:
            out.add(b.name)
            continue
        v = snapshot.versions.get(b.version_id)  # type: ignore[arg-type]
        if v is None or v.sha256 != b.sha256:
            continue
        if v.policy == Policy.opt_in:
            usable = not listed or v.expert_id in listed
        else:
            usable = v.policy == Policy.restricted and v.expert_id in listed
        if usable:
            out.add(b.name)
    return out


class PolicyRefresher:
    """The last good policy snapshot, refreshed by a daemon thread; `current()` never blocks.

    `read` is one bounded registry read (tests pass their own). Failures are logged with
    backoff (first failure, then each doubling); the retry delay grows from `interval` to at
    most a quarter of `max_staleness`, so recovery is seen well before the limit bites again.
    """

    def __init__(
        self,
        read: Callable[[], PolicySnapshot],
        *,
        interval: float = 2.0,
        max_staleness: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_staleness <= interval:
            raise ComposerError(
                f"policy max staleness ({max_staleness} s) must exceed the refresh interval "
                f"({interval} s)"
            )
        self._read = read
        self.interval = interval
        self.max_staleness = max_staleness
        self._clock = clock
        self._good: tuple[PolicySnapshot, float] | None = None
        self._error: str | None = None
        self._failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_registry(
        cls,
        url: str,
        bindings: Sequence[SlotBinding],
        *,
        interval: float = 2.0,
        max_staleness: float = 30.0,
        timeout: float = 2.0,
    ) -> PolicyRefresher:
        from registry.db import make_reader_engine

        engine = make_reader_engine(url, timeout_s=timeout)
        ids = [b.version_id for b in bindings if b.version_id is not None]
        return cls(
            lambda: read_policy_snapshot(engine, ids),
            interval=interval,
            max_staleness=max_staleness,
        )

    def refresh(self) -> bool:
        """One read; True if it succeeded."""
        try:
            snapshot = self._read()
        except Exception as e:  # any failure: keep the last good snapshot, note the cause
            self._failures += 1
            self._error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if self._failures & (self._failures - 1) == 0:  # 1, 2, 4, 8, ...
                log.warning("policy read failed (%d in a row): %s", self._failures, self._error)
            return False
        if self._failures:
            log.warning("policy read recovered after %d failures", self._failures)
        self._good = (snapshot, self._clock())
        self._failures = 0
        self._error = None
        return True

    def start(self) -> PolicyRefresher:
        """Read once now (a failure only leaves the server unready), then keep refreshing."""
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="composer-policy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _delay(self) -> float:
        if not self._failures:
            return self.interval
        cap = max(self.interval, self.max_staleness / 4)
        return min(self.interval * 2 ** (self._failures - 1), cap)

    def _run(self) -> None:
        while not self._stop.wait(self._delay()):
            self.refresh()

    def age(self) -> float | None:
        good = self._good
        return None if good is None else self._clock() - good[1]

    def current(self) -> PolicySnapshot:
        """The snapshot to decide with; PolicyUnavailable when there is none fresh enough."""
        good, age = self._good, self.age()
        if good is None or age is None:
            raise PolicyUnavailable(f"policy registry not read yet ({self._error or 'starting'})")
        if age > self.max_staleness:
            raise PolicyUnavailable(
                f"policy registry unreachable: last good read {age:.0f} s ago "
                f"(limit {self.max_staleness:g} s): {self._error}"
            )
        return good[0]

    def status(self) -> dict[str, Any]:
        age = self.age()
        return {
            "age_s": None if age is None else round(age, 3),
            "max_staleness_s": self.max_staleness,
            "refresh_s": self.interval,
            "fresh": age is not None and age <= self.max_staleness,
            "last_error": self._error,
        }
