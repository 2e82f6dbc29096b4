"""Catalog tables (SQLAlchemy 2 typed declarative); Alembic migrations create and evolve them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, String, UniqueConstraint, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class RepositoryRecord(Base):
    """A repository (storage node) the master knows, by its location."""

    __tablename__ = "repositories"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    location: Mapped[str] = mapped_column(String(2000), unique=True)  # path or s3://bucket/prefix
    s3_endpoint: Mapped[str | None] = mapped_column(String(500))
    repo_id: Mapped[str] = mapped_column(String(64))  # the repository's own id, from its config
    encrypted: Mapped[bool]
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    used_bytes: Mapped[int | None] = mapped_column(BigInteger)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    scanned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    points: Mapped[list[RestorePointRecord]] = relationship(back_populates="repository", cascade="all, delete-orphan",
                                                            passive_deletes=True)


class RestorePointRecord(Base):
    """One restore point, as its manifest describes it."""

    __tablename__ = "restore_points"
    __table_args__ = (
        UniqueConstraint("repository_id", "name", "point_id"),
        Index("ix_restore_points_name_created", "name", "created"),
        Index("ix_restore_points_created", "created"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    repository_id: Mapped[int] = mapped_column(ForeignKey("repositories.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))  # the VM or image name
    point_id: Mapped[str] = mapped_column(String(64))
    parent: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(20))  # vm or image
    mode: Mapped[str | None] = mapped_column(String(20))  # full or incremental
    transport: Mapped[str | None] = mapped_column(String(20))
    consistency: Mapped[str | None] = mapped_column(String(20))
    logical_bytes: Mapped[int] = mapped_column(BigInteger)
    read_bytes: Mapped[int | None] = mapped_column(BigInteger)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    disks: Mapped[dict[str, Any]]  # disk name → size

    repository: Mapped[RepositoryRecord] = relationship(back_populates="points")
