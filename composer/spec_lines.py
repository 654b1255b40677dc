"""Where a value sits in a spec's YAML: the line of every key and item, and the dotted field
name of a location (``router.tune.steps``, ``experts[2]``). Spec errors carry both, so every
message reads ``file:line: field: problem``."""

from __future__ import annotations

from typing import Any

import yaml


def record_lines(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            lines[path + (k,)] = key.start_mark.line + 1
            record_lines(value, path + (k,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            record_lines(item, path + (i,), lines)


def line_for(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
