"""The registry schema (SQLAlchemy 2.0 typed declarative). Migrations live in alembic/versions."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ExpertKind(enum.StrEnum):
    ffn = "ffn"  # FFN weights trained against a frozen public model (FlexOlmo)
    dense = "dense"  # full fine-tune of a base (BTX, dense merges)
    lora = "lora"  # PEFT LoRA adapter


class Policy(enum.StrEnum):
    opt_in = "opt_in"
    opt_out = "opt_out"
    restricted = "restricted"  # usable only by API keys that name the expert


class Owner(Base):
    __tablename__ = "owners"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    experts: Mapped[list[Expert]] = relationship(back_populates="owner")


class Artifact(Base):
    """A stored folder: relative path -> blob sha256, addressed by the hash of that manifest."""

    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    total_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    files: Mapped[list[ArtifactFile]] = relationship(
        back_populates="artifact", cascade="all, delete-orphan", order_by="ArtifactFile.relpath"
    )


class ArtifactFile(Base):
    __tablename__ = "artifact_files"
    __table_args__ = (UniqueConstraint("artifact_id", "relpath"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"))
    relpath: Mapped[str] = mapped_column(String(500))
    blob_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    artifact: Mapped[Artifact] = relationship(back_populates="files")


class PublicModel(Base):
    """A public model that experts are trained against."""

    __tablename__ = "base_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    architecture: Mapped[str] = mapped_column(String(200))
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # name -> [dtype, shape, sha256]: lets add-expert check shapes without loading weights.
    tensors: Mapped[dict[str, Any]] = mapped_column(JSON)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    artifact: Mapped[Artifact] = relationship()


class Expert(Base):
    __tablename__ = "experts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
    domain: Mapped[str] = mapped_column(String(200))
    kind: Mapped[ExpertKind] = mapped_column(Enum(ExpertKind, name="expert_kind"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    owner: Mapped[Owner] = relationship(back_populates="experts")
    versions: Mapped[list[ExpertVersion]] = relationship(
        back_populates="expert", order_by="ExpertVersion.id"
    )


class ExpertVersion(Base):
    __tablename__ = "expert_versions"
    __table_args__ = (UniqueConstraint("expert_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"))
    version: Mapped[str] = mapped_column(String(100))
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    # The fingerprint of the base this version was trained against, fixed at registration.
    base_fingerprint: Mapped[str] = mapped_column(String(64))
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"))
    policy: Mapped[Policy] = mapped_column(Enum(Policy, name="policy"), default=Policy.opt_in)
    policy_updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # LoRA versions: registry.lora.LoraSummary (rank, alpha, targets, layers, only_ffn); else None.
    lora: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=None)
    expert: Mapped[Expert] = relationship(back_populates="versions")
    base: Mapped[PublicModel] = relationship()
    artifact: Mapped[Artifact] = relationship()

    @property
    def ref(self) -> str:
        return f"{self.expert.name}@{self.version}"


class PolicyEvent(Base):
    """Append-only audit log of policy changes (UPDATE and DELETE are refused by triggers)."""

    __tablename__ = "policy_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    expert_version_id: Mapped[int] = mapped_column(ForeignKey("expert_versions.id"), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    old_policy: Mapped[str | None] = mapped_column(String(20))
    new_policy: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expert_version: Mapped[ExpertVersion] = relationship()


class ApiKey(Base):
    """A serving key; only its sha256 is stored, the secret is shown once at creation."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    allowed: Mapped[list[Expert]] = relationship(
        secondary="api_key_experts", order_by="Expert.name"
    )


class ApiKeyExpert(Base):
    __tablename__ = "api_key_experts"
    api_key_id: Mapped[int] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), primary_key=True)


class Build(Base):
    """One `composer build`: what went in, what came out, what it cost."""

    __tablename__ = "builds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    spec_sha256: Mapped[str] = mapped_column(String(64), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    method: Mapped[str] = mapped_column(String(50))
    output_path: Mapped[str] = mapped_column(Text)
    inputs: Mapped[list[Any]] = mapped_column(JSON)
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    wall_s: Mapped[float] = mapped_column(Float)
    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EvalRun(Base):
    """One `composer eval` of a recorded build: how it was asked, on which bytes, with which
    experts, and what it measured (figures and the PNGs' paths and hashes)."""

    __tablename__ = "eval_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id"), index=True)
    command: Mapped[str] = mapped_column(Text)
    # domain -> {"patterns", "files": [{"path", "sha256"}], "chunks", "seq_len"}
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    # {"request": the --experts choice, "used": experts in router order, "model": all experts}
    mask: Mapped[dict[str, Any]] = mapped_column(JSON)
    # {"perplexity", "opt_out_matrix", "routing"}
    results: Mapped[dict[str, Any]] = mapped_column(JSON)
    # figure name -> {"path", "sha256"}
    figures: Mapped[dict[str, Any]] = mapped_column(JSON)
    wall_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    build: Mapped[Build] = relationship()
