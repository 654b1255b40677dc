"""What a checkpoint tensor's name says: its decoder layer and whether it is FFN (expert) weight.

One spelling shared by the registry (does an expert fit its base), composer (which tensors an
expert brings) and serve (which layer a weight belongs to), so the three never disagree.
"""

from __future__ import annotations


def layer_of(name: str) -> int | None:
    """Layer index of a tensor name like ``model.layers.3.mlp.up_proj.weight``."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def is_ffn(name: str) -> bool:
    """FFN weights are what a FlexOlmo expert trains; everything else is shared."""
    return ".mlp." in name
