"""A neutral per-layer MoE structure and adapters to Mixtral state-dict layouts.

``MoELayer`` holds one sparse MoE block: router [E, H], gate w1 [E, I, H], up w3 [E, I, H],
down w2 [E, H, I]; an expert computes ``w2 @ (silu(w1 @ x) * (w3 @ x))``. Two key layouts are
read and written:
- checkpoint (what ``save_pretrained`` writes and vLLM reads):
  ``{p}.block_sparse_moe.gate.weight``, ``{p}.block_sparse_moe.experts.{e}.w1|w2|w3.weight``
- fused in-memory (transformers >= 5 module state dict):
  ``{p}.mlp.gate.weight``, ``{p}.mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first, then
  up), ``{p}.mlp.experts.down_proj`` [E, H, I]
with ``p = model.layers.{i}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from merge.errors import MergeError

Layout = Literal["checkpoint", "fused"]
_LAYER = re.compile(r"^(.*layers\.(\d+))\.(block_sparse_moe|mlp)\.gate\.weight$")


@dataclass
class MoELayer:
    router: Tensor  # [E, H]
    w1: Tensor  # [E, I, H] gate projection
    w3: Tensor  # [E, I, H] up projection
    w2: Tensor  # [E, H, I] down projection

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def validate(self, where: str = "MoE layer") -> None:
        e, h = self.router.shape
        if self.w1.dim() != 3 or self.w1.shape[0] != e or self.w1.shape[2] != h:
            raise MergeError(f"{where}: w1 has shape {tuple(self.w1.shape)}, want [{e}, I, {h}]")
        i = self.w1.shape[1]
        if self.w3.shape != self.w1.shape:
            raise MergeError(f"{where}: w3 has shape {tuple(self.w3.shape)}, want [{e}, {i}, {h}]")
        if tuple(self.w2.shape) != (e, h, i):
            raise MergeError(f"{where}: w2 has shape {tuple(self.w2.shape)}, want [{e}, {h}, {i}]")


def expert_forward(w1: Tensor, w3: Tensor, w2: Tensor, x: Tensor) -> Tensor:
    """One SwiGLU expert on x [T, H] -> [T, H]."""
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def moe_forward(layer: MoELayer, x: Tensor, top_k: int) -> Tensor:
    """Mixtral routing (softmax, top-k, renormalise) over x [T, H]; a reference for tests."""
    probs = F.softmax(x @ layer.router.T, dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(layer.num_experts):
        rows, slot = torch.where(top_i == e)
        if rows.numel():
            y = expert_forward(layer.w1[e], layer.w3[e], layer.w2[e], x[rows])
            out.index_add_(0, rows, y * top_w[rows, slot, None])
    return out


def moe_layer_prefixes(sd: Mapping[str, Tensor]) -> dict[int, tuple[str, Layout]]:
    """Layer index -> (key prefix, layout) for every MoE block in a Mixtral-style state dict."""
    found: dict[int, tuple[str, Layout]] = {}
    for key in sd:
        m = _LAYER.match(key)
        if m:
            layout: Layout = "checkpoint" if m.group(3) == "block_sparse_moe" else "fused"
            found[int(m.group(2))] = (m.group(1), layout)
    return dict(sorted(found.items()))


def _get(sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise MergeError(f"state dict lacks tensor {key!r}")
    return sd[key]


def read_moe_layer(sd: Mapping[str, Tensor], prefix: str, layout: Layout) -> MoELayer:
    """Read one MoE block from ``sd`` (see the module docstring for key layouts)."""
    if layout == "fused":
        router = _get(sd, f"{prefix}.mlp.gate.weight")
        gate_up = _get(sd, f"{prefix}.mlp.experts.gate_up_proj")
        w1, w3 = gate_up.chunk(2, dim=1)
        layer = MoELayer(router, w1, w3, _get(sd, f"{prefix}.mlp.experts.down_proj"))
    else:
        router = _get(sd, f"{prefix}.block_sparse_moe.gate.weight")
        ex = f"{prefix}.block_sparse_moe.experts"
        e = router.shape[0]
        stack = {
            w: [_get(sd, f"{ex}.{j}.{w}.weight") for j in range(e)] for w in ("w1", "w2", "w3")
        }
        for w, ts in stack.items():
            for j, t in enumerate(ts):
                if t.shape != ts[0].shape:
                    raise MergeError(
                        f"tensor '{ex}.{j}.{w}.weight': expert {j} has shape {tuple(t.shape)} "
                        f"but expert 0 has {tuple(ts[0].shape)}"
                    )
        layer = MoELayer(
            router, torch.stack(stack["w1"]), torch.stack(stack["w3"]), torch.stack(stack["w2"])
        )
    layer.validate(prefix)
    return layer


def moe_layer_tensors(layer: MoELayer, prefix: str, layout: Layout) -> dict[str, Tensor]:
    """The state-dict entries of ``layer`` under ``prefix`` in ``layout``."""
    if layout == "fused":
        return {
            f"{prefix}.mlp.gate.weight": layer.router.contiguous(),
            f"{prefix}.mlp.experts.gate_up_proj": torch.cat([layer.w1, layer.w3], 1).contiguous(),
            f"{prefix}.mlp.experts.down_proj": layer.w2.contiguous(),
        }
    ex = f"{prefix}.block_sparse_moe.experts"
    out = {f"{prefix}.block_sparse_moe.gate.weight": layer.router.contiguous()}
    for j in range(layer.num_experts):
        out[f"{ex}.{j}.w1.weight"] = layer.w1[j].contiguous()
        out[f"{ex}.{j}.w2.weight"] = layer.w2[j].contiguous()
        out[f"{ex}.{j}.w3.weight"] = layer.w3[j].contiguous()
    return out


def replace_moe_layers(
    sd: Mapping[str, Tensor], layers: Mapping[int, MoELayer]
) -> dict[str, Tensor]:
    """A copy of ``sd`` with the given MoE blocks replaced (expert counts may change)."""
    prefixes = moe_layer_prefixes(sd)
    out = dict(sd)
    for idx, layer in layers.items():
        if idx not in prefixes:
            raise MergeError(f"state dict has no MoE block in layer {idx}")
        prefix, layout = prefixes[idx]
        moe = (f"{prefix}.block_sparse_moe.", f"{prefix}.mlp.gate.", f"{prefix}.mlp.experts.")
        for key in [k for k in out if k.startswith(moe)]:
            del out[key]
        out.update(moe_layer_tensors(layer, prefix, layout))
    return out
