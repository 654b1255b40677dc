"""Datasets of the composer_domains tasks, read from the JSONL files beside this module, so the
task runs offline wherever the package is installed (no hub download, no path to configure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"


def _load(domain: str) -> Any:
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (DATA_DIR / f"{domain}.jsonl").read_text().splitlines()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def code(**_: Any) -> Any:
    return _load("code")


def legal(**_: Any) -> Any:
    return _load("legal")


def manuals(**_: Any) -> Any:
    return _load("manuals")
