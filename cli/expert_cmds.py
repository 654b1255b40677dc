"""`composer expert train`: a data owner turns local text into a registrable FlexOlmo expert."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import handles_errors
from cli.output import err_console, print_json
from registry.errors import ComposerError

expert_app = typer.Typer(help="Owner-side expert work (the data never leaves this machine).")


@expert_app.command("train")
@handles_errors
def train(
    public: Annotated[Path, typer.Argument(help="The public model's checkpoint folder.")],
    data: Annotated[list[Path], typer.Argument(help="Text files, folders or globs to train on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the expert folder.")],
    domain: Annotated[str, typer.Option("--domain")],
    layers: Annotated[
        str | None, typer.Option("--layers", help="MoE layers, e.g. '0,4,8' or 'every:4'.")
    ] = None,
    steps: Annotated[int, typer.Option("--steps")] = 200,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    lr: Annotated[float, typer.Option("--lr")] = 1e-4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    bf16: Annotated[
        str,
        typer.Option(
            "--bf16",
            help="auto (bf16 autocast only where the CPU/GPU computes bf16 natively), true or "
            "false.",
        ),
    ] = "auto",
    lora: Annotated[
        int | None,
        typer.Option(
            "--lora",
            metavar="R",
            help="Train a LoRA expert of rank R on the FFN projections (public FFN frozen) and "
            "write a PEFT adapter folder instead of a full checkpoint.",
        ),
    ] = None,
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="LoRA alpha (scale alpha/R); default 2 x R.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Train an expert FFN (plus its router row and bias) against a frozen public model."""
    from composer.precision import parse_bf16
    from composer.train.expert import train_expert

    try:
        precision = parse_bf16(bf16)
    except ValueError as e:
        raise ComposerError(f"--bf16: {e}") from None
    if alpha is not None and lora is None:
        raise ComposerError("--alpha: needs --lora R (alpha scales a LoRA expert)")
    if lora is not None and lora < 1:
        raise ComposerError(f"--lora: rank must be >= 1, got {lora}")
    if alpha is not None and alpha <= 0:
        raise ComposerError(f"--alpha: must be > 0, got {alpha}")
    result = train_expert(
        public, [str(p) for p in data], out, domain=domain, layers=layers, steps=steps,
        seq_len=seq_len, batch_size=batch_size, lr=lr, seed=seed, progress=not json_out,
        bf16=precision, lora_rank=lora, lora_alpha=alpha,
    )  # fmt: skip
    doc = {
        "out_dir": str(result.out_dir),
        "layers": result.layers,
        "steps": len(result.losses),
        "final_loss": result.losses[-1] if result.losses else None,
        "heldout_ppl_public": result.public_ppl,
        "heldout_ppl_expert": result.expert_ppl,
        "lora": result.config.get("lora_rank"),
        "wall_s": round(result.wall_s, 2),
    }
    if json_out:
        print_json(doc)
    else:
        err_console.print(
            f"expert written to {result.out_dir}: held-out perplexity {result.public_ppl:.2f} "
            f"(public) -> {result.expert_ppl:.2f} (with expert), {result.wall_s:.0f} s"
        )
