"""Compile the Triton kernels for an NVIDIA target without a GPU, and report what ptxas says.

``python -m serve.kernels.compile_check [--cc 90]`` prints one JSON line per kernel variant (the
tiles ``pick_config`` chooses for decode, middle and prefill in bf16, fp16 and fp32; routing):
shared memory, registers, spills, whether loads are pipelined (cp.async) and whether Hopper
warp-group MMA is used. It runs on a CPU-only host with triton's bundled ptxas, so CI can catch
kernels that do not compile, spill or lose pipelining. Needs ``TRITON_INTERPRET`` unset.

Integer sizes and strides get the divisibility-by-16 hint that Triton's JIT gives them at run
time when they are multiples of 16 (true of every production shape).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from serve.kernels import triton_align as ta
from serve.kernels import triton_experts as te
from serve.kernels import triton_routing as tr
from serve.kernels.align import padded_length

_DIVISIBLE = {"hidden_size", "inter_size", "stride_xt", "stride_we", "stride_wn", "stride_at"}
_DIVISIBLE |= {"stride_rt", "stride_lt", "stride_mt"}
_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    variant: str
    shared_bytes: int
    registers: int
    spill_bytes: int
    pipelined: bool
    wgmma: bool


def _ptxas() -> str:
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version triton emits
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no ptxas in {folder}")


def _compile(
    fn: Any, types: dict[str, str], consts: dict[str, Any], options: dict[str, int], cc: int
) -> tuple[int, int, int, bool, bool]:
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels were created by the interpreter: unset TRITON_INTERPRET")
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if n not in consts and (signature[n].startswith("*") or n in _DIVISIBLE)
    }
    kernel = triton.compile(
        ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", cc, 32), options=options
    )
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        log = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(tmp, "k.o")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))  # type: ignore[union-attr]
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    ttgir = kernel.asm["ttgir"]
    return (
        int(kernel.metadata.shared),
        registers,
        spills,
        "async_copy_global_to_local" in ttgir,
        "warp_group_dot " in ttgir,
    )


def check(cc: int = 90) -> list[KernelReport]:
    """Compile every production variant of the three kernels for ``sm_<cc>``."""
    reports = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = _TL[dtype]
        for stage, pairs in (("decode", 2), ("middle", 512), ("prefill", 8192)):
            cfg = te.pick_config(pairs, 8, dtype, interpret=False)
            options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            common = {
                "sorted_ids_ptr": "*i32",
                "block_expert_ptr": "*i32",
                "block_rows_ptr": "*i32",
            }
            kernels = (
                (
                    te._gate_up_kernel,
                    cfg.block_n_gate_up,
                    {"x_ptr": f"*{t}", "w13_ptr": f"*{t}"} | {"act_ptr": f"*{t}"},
                ),
                (
                    te._down_kernel,
                    cfg.block_n_down,
                    {"act_ptr": f"*{t}", "w2_ptr": f"*{t}"}
                    | {"weights_ptr": "*fp32", "rows_ptr": "*fp32"},
                ),
            )
            for fn, block_n, types in kernels:
                consts = {
                    "BLOCK_M": cfg.block_m,
                    "BLOCK_N": block_n,
                    "BLOCK_K": cfg.block_k,
                    "GROUP_M": cfg.group_m,
                    "UPCAST": False,
                    "IEEE": dtype == torch.float32,
                }
                result = _compile(fn, types | common, consts, options, cc)
                tiles = f"{t} {stage} {cfg.block_m}x{block_n}x{cfg.block_k}"
                reports.append(KernelReport(fn.__name__, tiles, *result))
    for top_k, experts, over_chosen in ((2, 8, True), (8, 64, False)):
        consts = {
            "TOP_K": top_k,
            "HAS_BIAS": True,
            "HAS_MASK": True,
            "SOFTMAX_OVER_CHOSEN": over_chosen,
            "BLOCK_T": min(64, 4096 // experts),
            "BLOCK_E": experts,
            "BLOCK_K": triton.next_power_of_2(top_k),
        }
        types = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "mask_ptr": "*u8"}
        types |= {"weights_ptr": "*fp32", "ids_ptr": "*i32"}
        result = _compile(tr._route_kernel, types, consts, {"num_warps": 4}, cc)
        reports.append(KernelReport("_route_kernel", f"E={experts} k={top_k}", *result))
    for pairs, experts in ((2, 8), (128, 64)):  # Mixtral decode 1 token, OLMoE decode 16 tokens
        blocks = padded_length(pairs, experts, 16) // 16
        consts = {
            "BLOCK_M": 16,
            "N_PAD": triton.next_power_of_2(pairs),
            "E_PAD": triton.next_power_of_2(experts),
            "B_PAD": triton.next_power_of_2(blocks),
        }
        types = {"ids_ptr": "*i32", "sorted_ids_ptr": "*i32"}
        types |= {"block_expert_ptr": "*i32", "block_rows_ptr": "*i32"}
        result = _compile(ta._align_kernel, types, consts, {"num_warps": 8}, cc)
        reports.append(KernelReport("_align_kernel", f"pairs={pairs} E={experts}", *result))
    consts = {"TOP_K": 8, "BLOCK_H": 1024}
    types = {"rows_ptr": "*fp32", "out_ptr": "*bf16"}
    result = _compile(te._sum_k_kernel, types, consts, {"num_warps": 4}, cc)
    reports.append(KernelReport("_sum_k_kernel", "bf16 k=8", *result))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description="compile the MoE kernels for an NVIDIA target")
    parser.add_argument("--cc", type=int, default=90, help="compute capability, e.g. 90 (H100)")
    args = parser.parse_args()
    for report in check(args.cc):
        print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
