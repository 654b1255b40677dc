"""Registry operations: what the `composer registry` and `composer keys` commands call.

Every change runs in one database transaction. Blobs enter the store only after the rows that
reference them were written, under a file lock, and are removed again if the transaction fails,
so a failed command leaves neither rows nor orphan blobs.

Longer than 400 lines: RegistryService is the registry's one transaction boundary (each command
is one method and one transaction, sharing the session, staging and blob-publishing rules
below); split across modules, those rules would have to be read in several places.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry import db
from registry.checkpoint import CheckpointInfo, hash_file, inspect_folder
from registry.compat import EXPERT_KINDS, check_fits_base
from registry.errors import CheckpointError, IntegrityFailure, RegistryError
from registry.keys import hash_key, new_secret
from registry.lora import lora_summary
from registry.models import (
    ApiKey,
    Artifact,
    ArtifactFile,
    Build,
    Expert,
    ExpertKind,
    ExpertVersion,
    Owner,
    Policy,
    PolicyEvent,
    PublicModel,
    utcnow,
)
from registry.refs import check_name, parse_ref
from registry.settings import blob_root, composer_home
from registry.store import BlobStore


@dataclass(frozen=True)
class VerifyProblem:
    subject: str  # "expert code@1" or "base smollm2"
    relpath: str
    blob_sha256: str
    problem: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.relpath} (blob {self.blob_sha256[:12]}): {self.problem}"


class RegistryService:
    def __init__(
        self, url: str | None = None, home: Path | None = None, *, check: bool = True
    ) -> None:
        self.home = Path(home) if home else composer_home()
        self.registry = db.Registry(url)
        self.store = BlobStore(self.home / "blobs" if home else blob_root())
        self._lock = FileLock(str(self.home / "registry.lock"))
        if check:
            self.registry.check_initialised()

    def close(self) -> None:
        self.registry.close()

    def location(self, note: str = "") -> str:
        """Where this service looks, for 'not found' messages: database URL and home folder."""
        extra = f"; {note}" if note else ""
        return f"the registry at {self.registry.display_url} (COMPOSER_HOME={self.home}{extra})"

    # ---- owners and public models -------------------------------------------------------------

    def add_owner(self, name: str) -> dict[str, Any]:
        check_name(name, "owner name")
        try:
            with self.registry.session() as s:
                if s.scalar(select(Owner).where(Owner.name == name)):
                    raise RegistryError(f"owner '{name}' already exists")
                owner = Owner(name=name)
                s.add(owner)
                s.flush()
                return {"id": owner.id, "name": owner.name}
        except IntegrityError as e:
            raise RegistryError(f"owner '{name}' already exists") from e

    def add_base(self, path: Path, name: str) -> dict[str, Any]:
        check_name(name, "base name")
        info = inspect_folder(Path(path))
        if info.kind != "model":
            raise CheckpointError(f"{path}: a base must be a model checkpoint, not an adapter")
        with self._publishing(info, duplicate=f"base '{name}' already exists") as (s, artifact):
            existing = s.scalar(select(PublicModel).where(PublicModel.name == name))
            if existing is not None:
                sha = existing.artifact.manifest_sha256
                if sha == info.manifest_sha256:
                    raise RegistryError(
                        f"base '{name}' already holds these files (sha256 {sha[:12]}); "
                        "nothing registered"
                    )
                raise RegistryError(
                    f"base '{name}' already exists with other files (sha256 {sha[:12]}); "
                    "choose another --name"
                )
            base = PublicModel(
                name=name,
                architecture=info.architecture,
                fingerprint=info.fingerprint(),
                config=info.config,
                tensors=info.shape_map(),
                artifact=artifact(),
            )
            s.add(base)
            s.flush()
            return _base_dict(base)

    # ---- experts --------------------------------------------------------------------------------

    def add_expert(
        self,
        path: Path,
        *,
        name: str,
        owner: str,
        base: str,
        domain: str,
        kind: str = "ffn",
        version: str | None = None,
    ) -> dict[str, Any]:
        check_name(name, "expert name")
        check_name(domain, "domain")
        if version is not None:
            check_name(version, "version")
        if kind not in EXPERT_KINDS:
            raise RegistryError(f"--kind: unknown value '{kind}'; expected one of ffn, dense, lora")
        info = inspect_folder(Path(path))
        # Cheap checks first, in a read-only transaction, so bad input copies no bytes.
        with self.registry.session() as s:
            owner_row, base_row, expert_row = self._expert_context(s, name, owner, base)
            if expert_row is not None:
                _check_same_expert(expert_row, owner, domain, kind)
                _refuse_same_files(expert_row, info)
                if version is not None and _find_version(expert_row, version):
                    raise RegistryError(f"expert '{name}@{version}' already exists")
            check_fits_base(
                info, kind, base_row.architecture, base_row.config, base_row.tensors,
                base_fingerprint=base_row.fingerprint,
            )  # fmt: skip
        lora = lora_summary(info).as_dict() if kind == "lora" else None

        dup = f"expert '{name}@{version}' already exists"
        with self._publishing(info, duplicate=dup) as (s, artifact):
            owner_row, base_row, expert_row = self._expert_context(s, name, owner, base)
            if expert_row is None:
                expert_row = Expert(
                    name=name, owner=owner_row, domain=domain, kind=ExpertKind(kind)
                )
                s.add(expert_row)
            else:
                _check_same_expert(expert_row, owner, domain, kind)
                _refuse_same_files(expert_row, info)  # a concurrent registration of the same
            if version is None:
                version = _next_version(expert_row)
            elif _find_version(expert_row, version):
                raise RegistryError(f"expert '{name}@{version}' already exists")
            ev = ExpertVersion(
                expert=expert_row,
                version=version,
                base=base_row,
                base_fingerprint=base_row.fingerprint,
                artifact=artifact(),
                policy=Policy.opt_in,
                lora=lora,
            )
            s.add(ev)
            s.flush()
            s.add(PolicyEvent(expert_version=ev, actor=owner, old_policy=None, new_policy="opt_in"))
            s.flush()
            return _version_dict(ev)

    def _expert_context(
        self, s: Session, name: str, owner: str, base: str
    ) -> tuple[Owner, PublicModel, Expert | None]:
        owner_row = s.scalar(select(Owner).where(Owner.name == owner))
        if owner_row is None:
            raise RegistryError(
                f"--owner: unknown owner '{owner}' in {self.location()}; add it with "
                f"`composer registry add-owner {owner}`"
            )
        base_row = s.scalar(select(PublicModel).where(PublicModel.name == base))
        if base_row is None:
            raise RegistryError(f"--base: {self._unknown(s, 'base', base)}")
        expert_row = s.scalar(select(Expert).where(Expert.name == name))
        return owner_row, base_row, expert_row

    def list(self) -> dict[str, Any]:
        with self.registry.session() as s:
            owners = s.scalars(select(Owner).order_by(Owner.name)).all()
            bases = s.scalars(select(PublicModel).order_by(PublicModel.name)).all()
            versions = s.scalars(
                select(ExpertVersion).join(Expert).order_by(Expert.name, ExpertVersion.id)
            ).all()
            return {
                "owners": [{"id": o.id, "name": o.name} for o in owners],
                "bases": [_base_dict(b) for b in bases],
                "experts": [_version_dict(v) for v in versions],
            }

    def show(self, ref: str) -> dict[str, Any]:
        with self.registry.session() as s:
            ev = self._resolve(s, ref)
            doc = _version_dict(ev)
            doc["files"] = [
                {"path": f.relpath, "sha256": f.blob_sha256, "size": f.size}
                for f in ev.artifact.files
            ]
            events = s.scalars(
                select(PolicyEvent)
                .where(PolicyEvent.expert_version_id == ev.id)
                .order_by(PolicyEvent.id)
            ).all()
            doc["policy_history"] = [
                {"at": e.at.isoformat(), "actor": e.actor, "from": e.old_policy, "to": e.new_policy}
                for e in events
            ]
            return doc

    def _unknown(self, s: Session, role: str, name: str) -> str:
        """'unknown base/expert NAME in <where>; known: ...; <how to register it>'."""
        table = PublicModel if role == "base" else Expert
        known = ", ".join(s.scalars(select(table.name).order_by(table.name))) or "none"
        where = self.location(f"{role}s there: {known}")
        return f"unknown {role} '{name}' in {where}; {register_hint(role, name)}"

    def _resolve(self, s: Session, ref: str) -> ExpertVersion:
        name, version = parse_ref(ref)
        expert = s.scalar(select(Expert).where(Expert.name == name))
        if expert is None:
            raise RegistryError(self._unknown(s, "expert", name))
        if version is None:
            if not expert.versions:
                raise RegistryError(f"expert '{name}' has no versions")
            return expert.versions[-1]
        ev = _find_version(expert, version)
        if ev is None:
            known = ", ".join(v.version for v in expert.versions)
            raise RegistryError(f"unknown version '{ref}' (versions: {known})")
        return ev

    # ---- data-use policy ------------------------------------------------------------------------

    def set_policy(self, ref: str, *, owner: str, policy: str) -> list[dict[str, Any]]:
        """Change the policy of one version (NAME@VERSION) or of every version (NAME)."""
        new = Policy(policy)
        name, version = parse_ref(ref)
        with self.registry.session() as s:
            if s.scalar(select(Owner).where(Owner.name == owner)) is None:
                raise RegistryError(f"--owner: unknown owner '{owner}'")
            targets = [self._resolve(s, ref)] if version else self._all_versions(s, name)
            expert = targets[0].expert
            if expert.owner.name != owner:
                raise RegistryError(
                    f"--owner: '{owner}' does not own expert '{name}'; only its owner may "
                    f"change its policy"
                )
            for ev in targets:
                if ev.policy != new:
                    s.add(PolicyEvent(
                        expert_version=ev, actor=owner, old_policy=ev.policy.value,
                        new_policy=new.value,
                    ))  # fmt: skip
                    ev.policy = new
                    ev.policy_updated_at = utcnow()
            s.flush()
            return [_version_dict(ev) for ev in targets]

    def _all_versions(self, s: Session, name: str) -> list[ExpertVersion]:
        expert = s.scalar(select(Expert).where(Expert.name == name))
        if expert is None:
            raise RegistryError(self._unknown(s, "expert", name))
        if not expert.versions:
            raise RegistryError(f"expert '{name}' has no versions")
        return list(expert.versions)

    # ---- integrity ------------------------------------------------------------------------------

    def verify(self, ref: str | None = None) -> tuple[int, list[VerifyProblem]]:
        """Re-hash stored blobs; return (blobs checked, problems), naming expert or base."""
        with self.registry.session() as s:
            subjects: list[tuple[str, Artifact]] = []
            if ref is not None:
                ev = self._resolve(s, ref)
                subjects.append((f"expert {ev.ref}", ev.artifact))
            else:
                for b in s.scalars(select(PublicModel).order_by(PublicModel.name)):
                    subjects.append((f"base {b.name}", b.artifact))
                for ev in s.scalars(select(ExpertVersion).join(Expert).order_by(Expert.name)):
                    subjects.append((f"expert {ev.ref}", ev.artifact))
            checked: dict[str, str | None] = {}
            problems: list[VerifyProblem] = []
            for subject, artifact in subjects:
                for f in artifact.files:
                    if f.blob_sha256 not in checked:
                        checked[f.blob_sha256] = self.store.verify(f.blob_sha256)
                    problem = checked[f.blob_sha256]
                    if problem:
                        problems.append(VerifyProblem(subject, f.relpath, f.blob_sha256, problem))
            return len(checked), problems

    # ---- reading artifacts back ------------------------------------------------------------

    def checkout(self, artifact: Artifact) -> Path:
        """A folder holding ``artifact``'s files, each re-hashed against its content address.

        Files are hard links to the (read-only) blobs where the filesystem allows, so a
        checkout costs no copy; every call re-verifies every file, so tampering is caught.
        """
        dest = self.home / "checkouts" / artifact.manifest_sha256
        for f in artifact.files:
            target = dest / f.relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                blob = self.store.path_for(f.blob_sha256)
                try:
                    os.link(blob, target)
                except FileExistsError:
                    pass  # a concurrent checkout made it
                except OSError:
                    self.store.copy_out(f.blob_sha256, target)
            problem = self.store.verify(f.blob_sha256)
            actual = hash_file(target)[0]
            if problem or actual != f.blob_sha256:
                raise IntegrityFailure(
                    f"{target}: stored bytes changed (expected sha256 {f.blob_sha256}); "
                    f"run `composer registry verify`"
                )
        return dest

    def base_for_build(self, name: str) -> tuple[PublicModel, Path]:
        with self.registry.session() as s:
            base = s.scalar(select(PublicModel).where(PublicModel.name == name))
            if base is None:
                raise RegistryError(self._unknown(s, "base", name))
            return base, self.checkout(base.artifact)

    def expert_for_build(self, ref: str) -> tuple[dict[str, Any], Path]:
        with self.registry.session() as s:
            ev = self._resolve(s, ref)
            return _version_dict(ev), self.checkout(ev.artifact)

    def record_build(self, **fields: Any) -> int:
        """Store a finished build (spec, inputs, outputs, metrics); return its id."""
        with self.registry.session() as s:
            row = Build(**fields)
            s.add(row)
            s.flush()
            return row.id

    def find_build(self, ref: str) -> dict[str, Any]:
        """A recorded build by id (``#12`` or ``12``) or by name (the newest build of that name)."""
        with self.registry.session() as s:
            key = ref.removeprefix("#")
            if key.isdigit():
                row = s.get(Build, int(key))
            else:
                stmt = select(Build).where(Build.name == ref).order_by(Build.id.desc()).limit(1)
                row = s.scalars(stmt).first()
            if row is None:
                raise RegistryError(f"no build {ref!r} in the registry (see `composer build`)")
            return {
                "id": row.id,
                "name": row.name,
                "method": row.method,
                "output_path": row.output_path,
                "spec_sha256": row.spec_sha256,
            }

    # ---- API keys -------------------------------------------------------------------------------

    def create_key(self, name: str, allow: list[str]) -> dict[str, Any]:
        check_name(name, "key name")
        secret = new_secret()
        try:
            with self.registry.session() as s:
                if s.scalar(select(ApiKey).where(ApiKey.name == name)):
                    raise RegistryError(f"key '{name}' already exists")
                experts = []
                for expert_name in dict.fromkeys(allow):
                    e = s.scalar(select(Expert).where(Expert.name == expert_name))
                    if e is None:
                        raise RegistryError(f"--allow: unknown expert '{expert_name}'")
                    experts.append(e)
                key = ApiKey(
                    name=name, key_sha256=hash_key(secret), prefix=secret[:8], allowed=experts
                )
                s.add(key)
                s.flush()
                return {
                    "id": key.id,
                    "name": name,
                    "key": secret,
                    "allow": [e.name for e in experts],
                }
        except IntegrityError as e:
            raise RegistryError(f"key '{name}' already exists") from e

    def list_keys(self) -> list[dict[str, Any]]:
        with self.registry.session() as s:
            return [
                {
                    "name": k.name,
                    "prefix": k.prefix,
                    "allow": [e.name for e in k.allowed],
                    "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                }
                for k in s.scalars(select(ApiKey).order_by(ApiKey.name))
            ]

    def revoke_key(self, name: str) -> dict[str, Any]:
        """Revoke a key for good: servers refuse it from their next policy refresh on."""
        with self.registry.session() as s:
            key = s.scalar(select(ApiKey).where(ApiKey.name == name))
            if key is None:
                raise RegistryError(f"unknown key '{name}' (see `composer keys list`)")
            if key.revoked_at is not None:
                raise RegistryError(f"key '{name}' was already revoked at {key.revoked_at}")
            key.revoked_at = utcnow()
            return {
                "name": key.name,
                "prefix": key.prefix,
                "revoked_at": key.revoked_at.isoformat(),
            }

    # ---- blob publication -----------------------------------------------------------------------

    @contextmanager
    def _publishing(self, info: CheckpointInfo, *, duplicate: str) -> Iterator[tuple[Session, Any]]:
        """A transaction in which ``artifact()`` gives the Artifact row for ``info``'s files.

        The caller adds its rows; the blobs are staged, the rows flushed, the blobs published
        and the transaction committed, all under the store lock. On any failure the rows roll
        back and the blobs this call published are deleted.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        staged: dict[str, Path] = {}
        published: list[str] = []
        with self._lock:
            try:
                with self.registry.session() as s:
                    holder: dict[str, Artifact] = {}

                    def artifact() -> Artifact:
                        if "a" not in holder:
                            holder["a"] = self._artifact_row(s, info, staged)
                        return holder["a"]

                    try:
                        yield s, artifact
                        s.flush()
                    except IntegrityError as e:
                        raise RegistryError(duplicate) from e
                    for sha, path in staged.items():
                        if self.store.publish(sha, path):
                            published.append(sha)
            except BaseException:
                for sha in published:
                    self.store.remove(sha)
                raise
            finally:
                for path in staged.values():
                    path.unlink(missing_ok=True)

    def _artifact_row(self, s: Session, info: CheckpointInfo, staged: dict[str, Path]) -> Artifact:
        existing = s.scalar(
            select(Artifact).where(Artifact.manifest_sha256 == info.manifest_sha256)
        )
        for f in info.files:
            if f.sha256 in staged or self.store.has(f.sha256):
                continue
            sha, _, tmp = self.store.stage(info.path / f.relpath)
            staged[sha] = tmp
            if sha != f.sha256:
                raise CheckpointError(f"{info.path / f.relpath}: file changed while registering")
        if existing is not None:
            return existing
        artifact = Artifact(
            manifest_sha256=info.manifest_sha256,
            total_size=info.total_size,
            files=[ArtifactFile(relpath=f.relpath, blob_sha256=f.sha256, size=f.size)
                   for f in info.files],
        )  # fmt: skip
        s.add(artifact)
        return artifact


# What `make demo` registers (in .demo/ of the repository), for the hint in "unknown" messages.
DEMO_NAMES = ("smollm2", "code", "legal", "manuals")


def register_hint(role: str, name: str) -> str:
    """The command that would register ``name`` as a base or an expert."""
    if role == "base":
        cmd = f"composer registry add-base PATH --name {name}"
    else:
        cmd = f"composer registry add-expert PATH --name {name} --owner O --base B --domain D"
    hint = f"register it with `{cmd}` (PATH: a Hugging Face checkpoint folder)"
    if name in DEMO_NAMES:
        hint += (
            f", or run `make demo`, which registers '{name}' in the repository's .demo/ "
            "(then set COMPOSER_HOME=.demo)"
        )
    return hint


def _refuse_same_files(expert: Expert, info: CheckpointInfo) -> None:
    """Registering bytes an existing version already holds would make a silent duplicate."""
    same = next(
        (v for v in expert.versions if v.artifact.manifest_sha256 == info.manifest_sha256), None
    )
    if same is not None:
        raise RegistryError(
            f"expert '{same.ref}' already holds these files (sha256 "
            f"{info.manifest_sha256[:12]}); nothing registered"
        )


def _find_version(expert: Expert, version: str) -> ExpertVersion | None:
    return next((v for v in expert.versions if v.version == version), None)


def _next_version(expert: Expert) -> str:
    numeric = [int(v.version) for v in expert.versions if v.version.isdigit()]
    return str(max(numeric, default=0) + 1)


def _check_same_expert(expert: Expert, owner: str, domain: str, kind: str) -> None:
    """A new version keeps its expert's owner, domain and kind."""
    if expert.owner.name != owner:
        raise RegistryError(
            f"--owner: expert '{expert.name}' belongs to '{expert.owner.name}', not '{owner}'"
        )
    if expert.domain != domain:
        raise RegistryError(
            f"--domain: expert '{expert.name}' has domain '{expert.domain}', not '{domain}'"
        )
    if expert.kind.value != kind:
        raise RegistryError(
            f"--kind: expert '{expert.name}' is of kind '{expert.kind.value}', not '{kind}'"
        )


def _base_dict(b: PublicModel) -> dict[str, Any]:
    return {
        "id": b.id,
        "name": b.name,
        "architecture": b.architecture,
        "fingerprint": b.fingerprint,
        "sha256": b.artifact.manifest_sha256,
        "size": b.artifact.total_size,
    }


def _version_dict(ev: ExpertVersion) -> dict[str, Any]:
    e = ev.expert
    return {
        "id": ev.id,
        "name": e.name,
        "version": ev.version,
        "ref": f"{e.name}@{ev.version}",
        "owner": e.owner.name,
        "domain": e.domain,
        "kind": e.kind.value,
        "policy": ev.policy.value,
        "base": ev.base.name,
        "base_fingerprint": ev.base_fingerprint,
        "sha256": ev.artifact.manifest_sha256,
        "size": ev.artifact.total_size,
        "created_at": ev.created_at.isoformat(),
        "lora": ev.lora,
    }


def init_registry(url: str | None = None) -> str:
    return db.upgrade(url)
