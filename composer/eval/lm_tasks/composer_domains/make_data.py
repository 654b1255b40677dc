"""Write the `composer_domains` task's questions from the demo domains' held-out files.

Each question shows a few consecutive lines of a held-out document (Python standard library,
Debian licence texts, man pages: the files `composer expert train` holds out, so no demo expert
trained on them) and asks which of four lines comes next: the true next line, or a line of the
same length range from another held-out document of the same domain. A domain expert should
know its domain's line shapes; excluding it should cost accuracy on its domain only.

    python -m composer.eval.lm_tasks.composer_domains.make_data   # rewrites data/*.jsonl

Seeded: the same files give the same questions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
PER_DOMAIN = 40
CONTEXT_LINES = 3
MAX_CONTEXT_CHARS = 240
LINE_CHARS = (24, 90)


def _usable(line: str) -> bool:
    s = line.strip()
    return LINE_CHARS[0] <= len(s) <= LINE_CHARS[1] and s.isascii() and any(c.isalpha() for c in s)


def _lines(path: Path) -> list[str]:
    from composer.train.data import read_document

    text = read_document(path)
    return [] if text is None else [ln.rstrip() for ln in text.splitlines() if ln.strip()]


def domain_questions(paths: list[str], n: int, seed: int) -> list[dict[str, object]]:
    """``n`` questions from the held-out files of one domain (one question per file at most)."""
    from composer.train.data import split_files

    rng = random.Random(seed)
    _, heldout = split_files(paths, heldout_fraction=0.1, seed=0)
    docs = [ls for ls in (_lines(p) for p in heldout[: 20 * n]) if len(ls) > CONTEXT_LINES + 1]
    pool = [(i, ln.strip()) for i, ls in enumerate(docs) for ln in ls if _usable(ln)]
    out: list[dict[str, object]] = []
    for doc_index, lines in enumerate(docs):
        spots = [
            k
            for k in range(CONTEXT_LINES, len(lines))
            if _usable(lines[k])
            and len("\n".join(lines[k - CONTEXT_LINES : k])) <= MAX_CONTEXT_CHARS
        ]
        if not spots:
            continue
        k = rng.choice(spots)
        gold = lines[k].strip()
        others = [ln for i, ln in pool if i != doc_index and ln != gold]
        near = [ln for ln in others if abs(len(ln) - len(gold)) <= max(8, len(gold) // 3)]
        distractors = rng.sample(near if len(near) >= 3 else others, 3)
        choices = [gold, *distractors]
        rng.shuffle(choices)
        out.append({
            "context": "\n".join(lines[k - CONTEXT_LINES : k]),
            "choices": choices,
            "gold": choices.index(gold),
        })  # fmt: skip
        if len(out) == n:
            break
    return out


def main() -> None:
    from composer.demo import DOMAINS

    DATA_DIR.mkdir(exist_ok=True)
    for seed, (domain, paths) in enumerate(DOMAINS.items()):
        rows = domain_questions(paths, PER_DOMAIN, seed)
        with (DATA_DIR / f"{domain}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{domain}: {len(rows)} questions -> {DATA_DIR / f'{domain}.jsonl'}")


if __name__ == "__main__":
    main()
