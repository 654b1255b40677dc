"""Everything a registry command could change: every row of every table and every blob file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, create_engine, select


def snapshot(db_url: str, home: Path) -> dict[str, Any]:
    engine = create_engine(db_url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            rows = {
                name: sorted(repr(tuple(r)) for r in conn.execute(select(table)))
                for name, table in sorted(meta.tables.items())
            }
    finally:
        engine.dispose()
    blobs = home / "blobs"
    files = sorted(str(p.relative_to(blobs)) for p in blobs.rglob("*") if p.is_file())
    return {"rows": rows, "blob_files": files}


def blob_files(home: Path) -> set[str]:
    blobs = home / "blobs"
    return {
        p.parent.name + p.name
        for p in blobs.rglob("*")
        if p.is_file() and p.parent.name != "staging"
    }
