"""An owner's training data on disk: files, documents, and the train / held-out split by file.

Files are found (folders recursively, globs), read (``.gz`` gunzipped, roff stripped from man
pages, binary or huge files skipped) and split deterministically by a hash of each path, so the
same files are held out on every run and machine. composer.text tokenises what this returns.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import re
from collections.abc import Sequence
from glob import glob
from pathlib import Path

_MAN_NAME = re.compile(r"\.[0-9][a-z0-9]*(\.gz)?$", re.IGNORECASE)
_ROFF_ESCAPES = re.compile(r"\\f[BIRP]|\\f\(..|\\&|\\\(..|\\\*.")


def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of files.

    ``__pycache__`` folders and hidden files are skipped; a path that matches nothing is an error.
    """
    found: set[Path] = set()
    for p in paths:
        p = Path(p).expanduser()
        matches = [Path(m) for m in glob(str(p), recursive=True)] if not p.exists() else [p]
        if not matches:
            raise FileNotFoundError(f"no files match {p}")
        for m in matches:
            candidates = m.rglob("*") if m.is_dir() else [m]
            for f in candidates:
                parts = f.parts
                if f.is_file() and "__pycache__" not in parts and not f.name.startswith("."):
                    found.add(f)
    return sorted(found)


def strip_roff(text: str) -> str:
    """Crudely turn roff (man page) source into text: drop request/comment lines, font escapes."""
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'", '\\"')):
            continue
        lines.append(_ROFF_ESCAPES.sub("", line).replace("\\-", "-").replace("\\e", "\\"))
    return "\n".join(lines)


def read_document(path: Path, strip: bool | None = None, max_bytes: int = 2_000_000) -> str | None:
    """Text of one file (``.gz`` decompressed), or None when binary or larger than ``max_bytes``.

    ``strip``: remove roff markup; None = do it for names that look like man pages (``ls.1.gz``).
    """
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) > max_bytes or b"\x00" in raw[:4096]:
        return None
    text = raw.decode("utf-8", errors="replace")
    if strip or (strip is None and _MAN_NAME.search(path.name)):
        text = strip_roff(text)
    return text if text.strip() else None


def path_hash(path: Path) -> bytes:
    """sha256 of the absolute path: the key of the held-out split."""
    return hashlib.sha256(str(path.resolve()).encode()).digest()


def is_heldout(path: Path, fraction: float) -> bool:
    """Deterministic split: a file is held out when the hash of its absolute path falls below."""
    return int.from_bytes(path_hash(path)[:8], "big") / 2**64 < fraction


def split_files(
    paths: Sequence[str | Path], heldout_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of ``paths``, split by path hash, each shuffled (seeded):
    the order in which composer.text.load_token_chunks reads them."""
    files = collect_files(paths)
    heldout = [f for f in files if is_heldout(f, heldout_fraction)]
    train = [f for f in files if not is_heldout(f, heldout_fraction)]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout
