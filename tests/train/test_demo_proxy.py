"""The demo's proxy sample: beginnings of the owner's training files, never a held-out file."""

from __future__ import annotations

import gzip
from pathlib import Path

from composer.demo import write_proxy_sample
from composer.text import ByteTokenizer
from composer.train.data import is_heldout


def test_proxy_sample_takes_file_beginnings_from_the_training_split(tmp_path: Path) -> None:
    src = tmp_path / "owner"
    src.mkdir()
    texts = {f"doc{i:02d}.txt": f"document {i} " * 50 for i in range(40)}  # 600+ chars each
    for name, text in texts.items():
        (src / name).write_text(text)
    (src / "ls.1.gz").write_bytes(gzip.compress(b".TH LS 1\n.SH NAME\nls \\- list files\n"))

    n_files, n_tokens = write_proxy_sample(
        [str(src)], tmp_path / "proxy", ByteTokenizer(), 2000, 100
    )

    written = sorted((tmp_path / "proxy").iterdir())
    sizes = [len(f.read_bytes()) for f in written]
    assert len(written) == n_files and n_tokens == sum(sizes)  # bytes = tokens, no EOS
    assert sum(sizes[:-1]) < 2000 <= n_tokens  # it stops at the first file that reaches 2000
    assert sizes.count(100) >= 19  # every document cut to its first 100 characters
    for f in written:
        original = src / f.name.split("-", 1)[1].removesuffix(".txt")
        original = original if original.exists() else original.with_name(original.name + ".gz")
        assert not is_heldout(original, 0.1), f.name
        if original.suffix == ".gz":
            assert f.read_text() == "ls - list files"  # decompressed, roff removed
        else:
            assert f.read_text() == texts[original.name][:100]
