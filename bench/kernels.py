"""Time the fused MoE kernels against the torch reference on an NVIDIA GPU.

Usage (from the repository root): ``python bench/kernels.py [--tokens 1 16 256 4096]``.

Measures in the same run the device's peak copy bandwidth (a 2 GiB device-to-device copy) and
peak bf16 matmul rate (torch.matmul, 8192^3), then for the Mixtral-8x7B and OLMoE-like expert
shapes prints a markdown table: time of the Triton experts (eager, and replayed from a CUDA graph
when capture works), of the torch reference, achieved bandwidth and TFLOP/s, and the targets:
decode (<= 16 tokens) within 1.5x of reading the active experts' weights once at the measured
bandwidth; prefill (4096 tokens) at >= 50% of the measured bf16 matmul rate. Without CUDA it
prints "no CUDA device: nothing timed" and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    variant: str


SHAPES = (
    Shape("mixtral-8x7b", 4096, 14336, 8, 2, "mixtral"),
    Shape("olmoe-like", 2048, 1024, 64, 8, "flexolmo"),
)
DECODE_MAX_TOKENS = 16
PREFILL_TOKENS = 4096


def expert_flops(tokens: int, shape: Shape) -> float:
    """Multiply-adds x2 of the three expert GEMMs for every routed (token, k) pair."""
    return 2.0 * tokens * shape.top_k * 3 * shape.hidden * shape.inter


def expert_bytes(active_experts: int, tokens: int, shape: Shape, elt: int) -> float:
    """Least traffic: each active expert's weights once, the input read and the output written."""
    weights = active_experts * 3 * shape.hidden * shape.inter * elt
    return weights + 2 * tokens * shape.hidden * elt


def decode_target_ms(active_experts: int, shape: Shape, elt: int, bandwidth: float) -> float:
    """1.5x the time to read the active experts' weights once at the measured bandwidth."""
    return 1.5 * active_experts * 3 * shape.hidden * shape.inter * elt / bandwidth * 1e3


def _bench(fn: Callable[[], object], *, graph: bool = False) -> float:
    """Median milliseconds; the L2 cache is flushed between runs by do_bench."""
    import triton.testing

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 2 GiB device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint16, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def peak_matmul(device: torch.device) -> float:
    """FLOP per second of a bf16 8192^3 torch.matmul."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _bench(lambda: torch.matmul(a, b))
    return 2.0 * n**3 / (ms * 1e-3)


def _expert_row(
    shape: Shape, tokens: int, w13: torch.Tensor, w2: torch.Tensor, peaks: tuple[float, float]
) -> str:
    """Time one (shape, tokens) case and format its table row."""
    from serve.kernels import fused_experts_reference, route
    from serve.kernels.triton_experts import fused_experts_triton

    bandwidth, flops_peak = peaks
    dtype, elt = w13.dtype, w13.element_size()
    x = torch.randn(tokens, shape.hidden, device=w13.device, dtype=dtype)
    logits = torch.randn(tokens, shape.experts, device=w13.device)
    weights, ids = route(logits, shape.top_k, variant=shape.variant, backend="triton")
    active = int(ids.unique().numel())
    args = (x, w13, w2, weights, ids)
    ref = fused_experts_reference(*args)
    err = (fused_experts_triton(*args).float() - ref.float()).abs().max() / ref.float().abs().max()
    t_tri = _bench(partial(fused_experts_triton, *args))
    try:
        t_graph = _bench(partial(fused_experts_triton, *args), graph=True)
        graph_cell = f"{t_graph:.3f}"
    except Exception as exc:  # capture is an extra: say why it failed and go on
        t_graph, graph_cell = float("inf"), f"n/a ({type(exc).__name__})"
    t_ref = _bench(partial(fused_experts_reference, *args))
    best = min(t_tri, t_graph)
    gbs = expert_bytes(active, tokens, shape, elt) / (best * 1e-3)
    tfl = expert_flops(tokens, shape) / (best * 1e-3)
    met: bool | None = None
    target = "-"
    if tokens <= DECODE_MAX_TOKENS:
        limit = decode_target_ms(active, shape, elt, bandwidth)
        target, met = f"<= {limit:.3f} ms", best <= limit
    elif tokens >= PREFILL_TOKENS:
        target, met = ">= 50% matmul peak", tfl >= 0.5 * flops_peak
    met_cell = "-" if met is None else ("yes" if met else "no")
    return (
        f"| {shape.name} | {tokens} | {active} | {t_tri:.3f} | {graph_cell} | {t_ref:.3f} "
        f"| {t_ref / best:.1f}x | {gbs / 1e9:.0f} ({100 * gbs / bandwidth:.0f}%) "
        f"| {tfl / 1e12:.1f} ({100 * tfl / flops_peak:.0f}%) | {err.item():.1e} "
        f"| {target} | {met_cell} |"
    )


def _routing_row(shape: Shape, tokens: int, device: torch.device) -> str:
    """Time routing with one expert masked out, both backends, through the public API."""
    from serve.kernels import route

    logits = torch.randn(tokens, shape.experts, device=device)
    mask = torch.ones(tokens, shape.experts, dtype=torch.bool, device=device)
    mask[:, 0] = False
    times = [
        _bench(partial(route, logits, shape.top_k, variant=shape.variant, mask=mask, backend=b))
        for b in ("triton", "torch")
    ]
    cells = (
        shape.variant,
        tokens,
        shape.experts,
        shape.top_k,
        f"{times[0]:.3f}",
        f"{times[1]:.3f}",
    )
    return "| " + " | ".join(str(c) for c in cells) + " |"


def run(tokens_list: list[int], dtype: torch.dtype) -> None:
    import triton

    device = torch.device("cuda")
    torch.manual_seed(0)
    peaks = (peak_bandwidth(device), peak_matmul(device))
    print(f"device: {torch.cuda.get_device_name(device)}; date: {datetime.date.today()}")
    print(f"torch {torch.__version__}, triton {triton.__version__}, dtype {dtype}")
    print(
        f"measured peak: copy bandwidth {peaks[0] / 1e9:.0f} GB/s, "
        f"bf16 matmul {peaks[1] / 1e12:.0f} TFLOP/s\n"
    )
    print(
        "| shape | tokens | active experts | Triton ms | Triton ms (graph) | torch ref ms "
        "| speed-up | GB/s (% peak) | TFLOP/s (% peak) | max rel err | target | met |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for shape in SHAPES:
        w13 = torch.randn(shape.experts, 2 * shape.inter, shape.hidden, device=device, dtype=dtype)
        w2 = torch.randn(shape.experts, shape.hidden, shape.inter, device=device, dtype=dtype)
        w13 /= shape.hidden**0.5
        w2 /= shape.inter**0.5
        for tokens in tokens_list:
            print(_expert_row(shape, tokens, w13, w2, peaks), flush=True)
        w13 = w2 = torch.empty(0)
        torch.cuda.empty_cache()
    print("\n| routing | tokens | experts | top-k | Triton ms | torch ref ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for shape in SHAPES:
        for tokens in tokens_list:
            print(_routing_row(shape, tokens, device), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, PREFILL_TOKENS])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing timed")
        return 0
    run(args.tokens, getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
