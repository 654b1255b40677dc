"""tiny_words' documents, from docs.jsonl beside this file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def docs(**_: Any) -> Any:
    from datasets import Dataset, DatasetDict

    lines = (Path(__file__).parent / "docs.jsonl").read_text().splitlines()
    return DatasetDict({"test": Dataset.from_list([json.loads(x) for x in lines])})
