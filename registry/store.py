"""Content-addressed, immutable blob store under `$COMPOSER_HOME/blobs`.

A blob's name is the sha256 of its bytes. Writes go to a staging file and are renamed into place
(atomic on POSIX); finished blobs are read-only; every read re-hashes and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from registry.errors import IntegrityFailure

CHUNK = 8 * 1024 * 1024


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:]

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def stage(self, src: Path) -> tuple[str, int, Path]:
        """Copy ``src`` into the staging area while hashing it; return (sha256, size, path)."""
        staging = self.root / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f"{uuid.uuid4().hex}.part"
        h = hashlib.sha256()
        size = 0
        try:
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while buf := fin.read(CHUNK):
                    h.update(buf)
                    fout.write(buf)
                    size += len(buf)
                fout.flush()
                os.fsync(fout.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return h.hexdigest(), size, tmp

    def publish(self, sha256: str, staged: Path) -> bool:
        """Move a staged file to its content address; False if that blob already existed."""
        dest = self.path_for(sha256)
        if dest.exists():
            staged.unlink(missing_ok=True)
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, 0o444)
        os.replace(staged, dest)
        return True

    def remove(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def verify(self, sha256: str) -> str | None:
        """None if the blob is intact, else what is wrong with it."""
        p = self.path_for(sha256)
        if not p.is_file():
            return "missing"
        actual = file_sha256(p)
        return None if actual == sha256 else f"content hash is {actual}"

    def copy_out(self, sha256: str, dest: Path) -> None:
        """Copy a blob to ``dest`` (a new file), verifying its hash on the way."""
        src = self.path_for(sha256)
        if not src.is_file():
            raise IntegrityFailure(f"blob {sha256} is missing from {self.root}")
        h = hashlib.sha256()
        tmp = dest.with_name(dest.name + f".{uuid.uuid4().hex}.part")
        try:
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while buf := fin.read(CHUNK):
                    h.update(buf)
                    fout.write(buf)
            if h.hexdigest() != sha256:
                raise IntegrityFailure(
                    f"blob {src} is corrupted: content hash {h.hexdigest()} != {sha256}"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def file_sha256(p: Path) -> str:
    """sha256 of a file's bytes, read in CHUNK blocks."""
    h = hashlib.sha256()
    with p.open("rb") as f:
        while buf := f.read(CHUNK):
            h.update(buf)
    return h.hexdigest()
