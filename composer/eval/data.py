"""Evaluation data: `--data NAME=PATH_OR_GLOB` arguments -> the files of each domain, their
hashes (recorded with the run, so a figure can be traced to the exact bytes) and token chunks.

Text becomes tokens only through composer/text.py: the checkpoint's tokenizer (UTF-8 bytes for
tiny test models), EOS after each document, full blocks of ``seq_len`` (pack_documents), files
in sorted order so every run of the same data scores the same chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from composer.text import Tokenizer, pack_documents
from composer.train.data import collect_files
from registry.checkpoint import hash_file
from registry.errors import ComposerError
from registry.refs import check_name


class DataError(ComposerError):
    """A `--data` argument that does not give usable text (names the argument)."""


@dataclass(frozen=True)
class Domain:
    """One domain's held-out files (sorted) and their sha256."""

    name: str
    patterns: tuple[str, ...]
    files: tuple[Path, ...]
    sha256: tuple[str, ...]

    def record(self) -> dict[str, object]:
        """What an eval run records about its data."""
        return {
            "patterns": list(self.patterns),
            "files": [
                {"path": str(f), "sha256": h} for f, h in zip(self.files, self.sha256, strict=True)
            ],
        }


def parse_data_args(values: Sequence[str]) -> list[Domain]:
    """`NAME=PATH_OR_GLOB` (a file, a folder, or a glob; a name given twice adds files)."""
    if not values:
        raise DataError("--data: give at least one NAME=PATH_OR_GLOB")
    patterns: dict[str, list[str]] = {}
    for v in values:
        name, sep, pattern = v.partition("=")
        if not sep or not name or not pattern:
            raise DataError(f"--data {v}: expected NAME=PATH_OR_GLOB")
        try:
            check_name(name, f"--data {v}: domain name")
        except ComposerError as e:
            raise DataError(str(e)) from None
        patterns.setdefault(name, []).append(pattern)
    domains = []
    for name, pats in patterns.items():
        files: set[Path] = set()
        for p in pats:
            try:
                files.update(collect_files([p]))
            except FileNotFoundError:
                raise DataError(f"--data {name}={p}: no files match") from None
        ordered = tuple(sorted(files))
        hashes = tuple(hash_file(f)[0] for f in ordered)
        domains.append(Domain(name, tuple(pats), ordered, hashes))
    return domains


def domain_chunks(
    domain: Domain, tokenizer: Tokenizer, seq_len: int, max_chunks: int
) -> list[list[int]]:
    """The domain's text as at most ``max_chunks`` blocks of ``seq_len`` token ids."""
    blocks, _ = pack_documents(list(domain.files), tokenizer, seq_len, max_chunks, None)
    if blocks.shape[0] == 0:
        raise DataError(
            f"--data {domain.name}: its {len(domain.files)} file(s) give fewer than {seq_len} "
            f"tokens of text (one chunk of --seq-len)"
        )
    return blocks.tolist()
