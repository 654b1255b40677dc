"""Owner-side FlexOlmo expert training (library part of ``composer expert train``).

A data owner turns local text into a registrable FlexOlmo expert without sharing the text:

1. the owner's files are read (``.gz`` gunzipped, roff stripped from man pages), split into
   train and held-out files by a hash of each path, tokenised with the public model's tokenizer
   and packed into ``seq_len`` blocks;
2. the domain embedding (mean FFN input per MoE layer) is measured on the PUBLIC model;
3. in each chosen layer the MLP is replaced by a 2-expert MoE (router_train.PairFFN): the public FFN
   and router row frozen, a copy of the FFN + its router row + a negative bias trained; attention,
   norms and embeddings frozen;
4. the artifact is written atomically: a checkpoint of the public architecture whose ``mlp.*`` are
   the trained FFN (every other tensor copied byte for byte) plus ``composer_expert.safetensors``.

Tiny test models have no tokenizer: pass ``tokenizer="bytes"`` (UTF-8 bytes as ids 0..255, needs a
vocabulary of at least 256) or pre-tokenised :class:`TokenChunks` instead of paths.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from torch import nn

from composer import precision
from composer.precision import Bf16Setting
from router_train.domain_embedding import FfnInputMeans
from router_train.pair_ffn import PairFFN, init_router_from_domain_embedding, public_router_row

EXTRAS_FILE = "composer_expert.safetensors"
FORMAT_TAG = "flexolmo-expert/1"
WEIGHTS_FILE = "model.safetensors"

# ---------------------------------------------------------------------------------------------
# Tokenisers
# ---------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for tiny test models, which ship no tokenizer)."""

    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """The public model's own tokenizer, without special tokens; documents end with EOS."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_id = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(public_dir: str | Path, tokenizer: str | Tokenizer | None) -> Tokenizer:
    """``None``: the tokenizer saved in ``public_dir``; ``"bytes"``: :class:`ByteTokenizer`."""
    if tokenizer is None:
        return HFTokenizer(public_dir)
    if tokenizer == "bytes":
        return ByteTokenizer()
    if isinstance(tokenizer, str):
        return HFTokenizer(tokenizer)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Data: files -> documents -> token chunks
# ---------------------------------------------------------------------------------------------

_MAN_NAME = re.compile(r"\.[0-9][a-z0-9]*(\.gz)?$", re.IGNORECASE)
_ROFF_ESCAPES = re.compile(r"\\f[BIRP]|\\f\(..|\\&|\\\(..|\\\*.")


def collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of files.

    ``__pycache__`` folders and hidden files are skipped; a path that matches nothing is an error.
    """
    found: set[Path] = set()
    for p in paths:
        p = Path(p).expanduser()
        matches = [Path(m) for m in glob(str(p), recursive=True)] if not p.exists() else [p]
        if not matches:
            raise FileNotFoundError(f"no files match {p}")
        for m in matches:
            candidates = m.rglob("*") if m.is_dir() else [m]
            for f in candidates:
                parts = f.parts
                if f.is_file() and "__pycache__" not in parts and not f.name.startswith("."):
                    found.add(f)
    return sorted(found)


def strip_roff(text: str) -> str:
    """Crudely turn roff (man page) source into text: drop request/comment lines, font escapes."""
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'", '\\"')):
            continue
        lines.append(_ROFF_ESCAPES.sub("", line).replace("\\-", "-").replace("\\e", "\\"))
    return "\n".join(lines)


def read_document(path: Path, strip: bool | None = None, max_bytes: int = 2_000_000) -> str | None:
    """Text of one file (``.gz`` decompressed), or None when binary or larger than ``max_bytes``.

    ``strip``: remove roff markup; None = do it for names that look like man pages (``ls.1.gz``).
    """
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) > max_bytes or b"\x00" in raw[:4096]:
        return None
    text = raw.decode("utf-8", errors="replace")
    if strip or (strip is None and _MAN_NAME.search(path.name)):
        text = strip_roff(text)
    return text if text.strip() else None


def _path_hash(path: Path) -> bytes:
    return hashlib.sha256(str(path.resolve()).encode()).digest()


def is_heldout(path: Path, fraction: float) -> bool:
    """Deterministic split: a file is held out when the hash of its absolute path falls below."""
    return int.from_bytes(_path_hash(path)[:8], "big") / 2**64 < fraction


def split_files(
    paths: Sequence[str | Path], heldout_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of ``paths``, split by path hash, each shuffled (seeded):
    the order in which :func:`load_token_chunks` reads them."""
    files = collect_files(paths)
    heldout = [f for f in files if is_heldout(f, heldout_fraction)]
    train = [f for f in files if not is_heldout(f, heldout_fraction)]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


@dataclass(frozen=True)
class TokenChunks:
    """Packed token blocks: ``train`` and ``heldout`` are int64 [n, seq_len]."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_files: int = 0
    heldout_files: int = 0


def _pack(
    files: list[Path], tok: Tokenizer, seq_len: int, max_chunks: int, strip: bool | None
) -> tuple[torch.Tensor, int]:
    buf: list[int] = []
    used = 0
    need = max_chunks * seq_len
    for f in files:
        if len(buf) >= need:
            break
        text = read_document(f, strip)
        if text is None:
            continue
        ids = tok.encode(text)
        buf.extend(ids if tok.eos_id is None else [*ids, tok.eos_id])
        used += 1
    n = min(len(buf) // seq_len, max_chunks)
    return torch.tensor(buf[: n * seq_len], dtype=torch.long).reshape(n, seq_len), used


def load_token_chunks(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    max_train_chunks: int,
    max_heldout_chunks: int,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    strip: bool | None = None,
) -> TokenChunks:
    """Read, split by path hash, shuffle (seeded), tokenise and pack files until enough chunks.

    Only as many files as needed are read, so a folder of thousands of files costs little. When the
    held-out side gets no chunk (no file hashed there, or only binary / too short ones), training
    files move there, smallest hash first, until one gives a chunk.
    """
    train, heldout = split_files(paths, heldout_fraction, seed)
    held_t, n_held = _pack(heldout, tokenizer, seq_len, max_heldout_chunks, strip)
    if held_t.shape[0] == 0 and heldout_fraction > 0 and max_heldout_chunks > 0:
        for f in sorted(train, key=_path_hash)[:-1]:  # keep at least one training file
            train.remove(f)
            held_t, n_held = _pack([f], tokenizer, seq_len, max_heldout_chunks, strip)
            if held_t.shape[0]:
                break
    train_t, n_train = _pack(train, tokenizer, seq_len, max_train_chunks, strip)
    if train_t.shape[0] == 0:
        raise ValueError(f"not enough text for one chunk of {seq_len} tokens in {list(paths)}")
    return TokenChunks(train_t, held_t, n_train, n_held)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def load_causal_lm(model_dir: str | Path) -> nn.Module:
    """Any HF causal LM checkpoint folder, float32, eval mode (a composed one with its router
    bias, see router_train/biased_router.py)."""
    from router_train.biased_router import load_composed

    return load_composed(model_dir, torch.float32)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama / OLMo-2 style ``*ForCausalLM`` (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no model.layers; not a Llama/OLMo-2 style model")
    return layers


def parse_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Layers to train: None/"all", a list, "0,4,8", "every:4" (0,4,8,...) or "last:8"."""
    if spec is None or spec == "all":
        out = list(range(num_layers))
    elif isinstance(spec, str) and spec.startswith("every:"):
        out = list(range(0, num_layers, int(spec.split(":", 1)[1])))
    elif isinstance(spec, str) and spec.startswith("last:"):
        n = int(spec.split(":", 1)[1])
        out = list(range(max(0, num_layers - n), num_layers))
    elif isinstance(spec, str):
        out = [int(x) for x in spec.split(",") if x.strip()]
    else:
        out = [int(x) for x in spec]
    out = sorted(set(out))
    if not out or out[0] < 0 or out[-1] >= num_layers:
        raise ValueError(f"layers {spec!r} invalid for a model with {num_layers} layers")
    return out


def _batches(chunks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, chunks.shape[0], batch_size):
        yield chunks[i : i + batch_size]


def _as_chunks(token_chunks: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    t = torch.as_tensor(token_chunks, dtype=torch.long)
    if t.ndim != 2:
        raise ValueError("token_chunks must be 2-D [n, seq_len]")
    return t


@torch.no_grad()
def compute_domain_embeddings(
    model: nn.Module,
    token_chunks: torch.Tensor | Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """Mean FFN input per layer (float32 [hidden]) over every token of ``token_chunks``."""
    mlps = {i: decoder_layers(model)[i].mlp for i in layers}
    with FfnInputMeans(mlps) as acc:
        for batch in _batches(_as_chunks(token_chunks), batch_size):
            model(input_ids=batch, use_cache=False)
    return acc.means()


@torch.no_grad()
def mean_nll(
    model: nn.Module,
    token_chunks: torch.Tensor | Sequence[Sequence[int]],
    batch_size: int = 8,
    compute_dtype: torch.dtype = torch.float32,
) -> float:
    """Mean next-token NLL over all predicted positions of the chunks, each scored independently
    (``compute_dtype`` bfloat16: autocast in the forward pass, see composer.precision); NaN when
    there is nothing to predict."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(_as_chunks(token_chunks), batch_size):
        with precision.autocast(compute_dtype, model):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += target.numel()
    model.train(was_training)
    return total / count if count else float("nan")


def perplexity(
    model: str | Path | nn.Module,
    token_chunks: torch.Tensor | Sequence[Sequence[int]],
    batch_size: int = 8,
    bf16: Bf16Setting = "auto",
) -> float:
    """exp(mean next-token NLL) over all predicted positions of the chunks (dense or MoE, any HF
    causal LM; a path is loaded in float32). Each chunk is scored independently; ``bf16``
    picks the forward precision (auto: bf16 autocast only where it is native)."""
    m = load_causal_lm(model) if isinstance(model, str | Path) else model
    return math.exp(mean_nll(m, token_chunks, batch_size, precision.choose(bf16, m)))


def seeded_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into ``n`` items, drawn from a seeded permutation that is
    re-drawn when used up (a batch may span two permutations)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order.extend(torch.randperm(n, generator=gen).tolist())
        yield order[:batch_size]
        order = order[batch_size:]


def install_pair_ffns(
    model: nn.Module,
    domain_embeddings: dict[int, torch.Tensor],
    *,
    top_k: int = 2,
    bias_margin: float = 0.0,
) -> dict[int, PairFFN]:
    """Replace ``layer.mlp`` by a PairFFN in every layer that has a domain embedding and freeze all
    parameters except each expert FFN, expert router row and bias."""
    for p in model.parameters():
        p.requires_grad_(False)
    pairs: dict[int, PairFFN] = {}
    layers = decoder_layers(model)
    for i, emb in sorted(domain_embeddings.items()):
        row, bias = init_router_from_domain_embedding(emb, bias_margin)
        pair = PairFFN(layers[i].mlp, expert_row=row, expert_bias=bias, top_k=top_k)
        for p in pair.trainable_parameters():
            p.requires_grad_(True)
        layers[i].mlp = pair
        pairs[i] = pair
    return pairs


# ---------------------------------------------------------------------------------------------
# Artifact
# ---------------------------------------------------------------------------------------------


def _checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    files = [f for f in files if f.name != EXTRAS_FILE]
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = fh.get_tensor(k)
    return out


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file with a byte-stable layout (sorted names and metadata keys).

    ``safetensors.torch.save_file`` orders metadata through a hash map, so equal content can give
    different bytes; the registry addresses artifacts by file hash, so we write the (simple) format
    ourselves: u64 header length, JSON header padded with spaces to 8 bytes, raw little-endian data.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for b in blobs:
            fh.write(b)


def write_expert_artifact(
    public_dir: str | Path,
    out_dir: str | Path,
    ffn_weights: dict[str, torch.Tensor],
    extras: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the expert checkpoint atomically (temp folder in the same parent, then rename).

    ``ffn_weights`` replace the public tensors of the same names (cast to their dtype and shape must
    match); every other tensor and every non-weight file (config, tokenizer) is copied unchanged.
    On any failure the temp folder is removed and ``out_dir`` is left as it was.
    """
    public_dir, out_dir = Path(public_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    tensors = _checkpoint_tensors(public_dir)
    for name, t in ffn_weights.items():
        if name not in tensors or ".mlp." not in name:
            raise KeyError(f"{name} is not an FFN tensor of the public checkpoint")
        if tuple(t.shape) != tuple(tensors[name].shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(tensors[name].shape)}")
        tensors[name] = t.detach().to(tensors[name].dtype).contiguous()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for f in public_dir.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(f, tmp / f.name)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        extras_c = {k: v.detach().to(torch.float32).contiguous() for k, v in extras.items()}
        save_file(extras_c, str(tmp / EXTRAS_FILE), metadata=metadata)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_expert_extras(expert_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an artifact's ``composer_expert.safetensors``."""
    with safe_open(str(Path(expert_dir) / EXTRAS_FILE), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class TrainConfig(BaseModel):
    """Hyper-parameters of one expert training run."""

    model_config = ConfigDict(extra="forbid")

    domain: str
    layers: list[int] | str | None = None
    steps: int = Field(200, ge=0)
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    router_lr: float | None = Field(None, gt=0, description="default: 10 x lr")
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    top_k: int = Field(2, ge=1, le=2)
    bias_margin: float = Field(0.0, description="extra negative offset of the initial bias")
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    max_heldout_chunks: int = Field(32, ge=0)
    embed_chunks: int = Field(32, ge=1, description="train chunks for the domain embedding")
    bf16: Bf16Setting = Field(
        "auto", description="bf16 autocast in the forward pass; auto: where bf16 is native"
    )
    num_threads: int | None = None


@dataclass
class TrainResult:
    out_dir: Path
    losses: list[float]
    public_ppl: float
    expert_ppl: float  # the trained 2-expert model on the held-out chunks
    layers: list[int]
    train_chunks: int
    heldout_chunks: int
    wall_s: float
    train_s: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        return len(self.losses) / self.train_s if self.train_s > 0 else float("nan")


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_pairs(
    model: nn.Module,
    pairs: dict[int, PairFFN],
    train_chunks: torch.Tensor,
    cfg: TrainConfig,
    progress: bool = True,
) -> list[float]:
    """AdamW on the expert FFNs, rows and biases; batches drawn from a seeded permutation of the
    chunks (re-shuffled each epoch). Returns the loss of every step."""
    from tqdm.auto import tqdm

    ffn_params = [p for pr in pairs.values() for p in pr.expert_ffn.parameters()]
    router_params = [p for pr in pairs.values() for p in (pr.expert_row, pr.expert_bias)]
    base_lrs = [cfg.lr, cfg.router_lr or 10 * cfg.lr]
    opt = torch.optim.AdamW(
        [{"params": ffn_params, "lr": base_lrs[0]}, {"params": router_params, "lr": base_lrs[1]}],
        weight_decay=0.0,
    )
    batches = seeded_batches(train_chunks.shape[0], cfg.batch_size, cfg.seed)
    compute_dtype = precision.choose(cfg.bf16, model)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"expert {cfg.domain}", disable=not progress, leave=False)
    for step in bar:
        batch = train_chunks[next(batches)]
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * _lr_factor(step, cfg.steps, cfg.warmup_steps)
        with precision.autocast(compute_dtype, model):
            out = model(input_ids=batch, labels=batch, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ffn_params + router_params, cfg.grad_clip)
        opt.step()
        losses.append(float(out.loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def train_expert(
    public_dir: str | Path,
    data_paths: Sequence[str | Path] | TokenChunks,
    out_dir: str | Path,
    *,
    domain: str,
    layers: Sequence[int] | str | None = None,
    steps: int = 200,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    tokenizer: str | Tokenizer | None = None,
    overwrite: bool = False,
    **options: Any,
) -> TrainResult:
    """Train a FlexOlmo expert of ``public_dir`` on local data; write its artifact to ``out_dir``.

    ``data_paths``: files / folders / globs (tokenised with ``tokenizer``: None = the public
    model's, ``"bytes"`` = UTF-8 bytes) or pre-tokenised :class:`TokenChunks`. Further ``options``
    are the fields of :class:`TrainConfig` (router_lr, top_k, bias_margin, bf16, ...).
    """
    t0 = time.perf_counter()
    cfg = TrainConfig(
        domain=domain,
        layers=list(layers) if layers is not None and not isinstance(layers, str) else layers,
        steps=steps,
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        **options,
    )
    public_dir, out_dir = Path(public_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    if isinstance(data_paths, TokenChunks):
        data = data_paths
    else:
        tok = load_tokenizer(public_dir, tokenizer)
        data = load_token_chunks(
            data_paths,
            tok,
            cfg.seq_len,
            max_train_chunks=max(cfg.steps * cfg.batch_size, cfg.embed_chunks),
            max_heldout_chunks=cfg.max_heldout_chunks,
            heldout_fraction=cfg.heldout_fraction,
            seed=cfg.seed,
        )
    heldout = data.heldout[: cfg.max_heldout_chunks]

    model = load_causal_lm(public_dir)
    layer_ids = parse_layers(cfg.layers, len(decoder_layers(model)))
    public_ppl = (
        perplexity(model, heldout, cfg.batch_size, cfg.bf16) if len(heldout) else float("nan")
    )
    embeddings = compute_domain_embeddings(
        model, data.train[: cfg.embed_chunks], layer_ids, cfg.batch_size
    )
    pairs = install_pair_ffns(model, embeddings, top_k=cfg.top_k, bias_margin=cfg.bias_margin)

    t_train = time.perf_counter()
    losses = train_pairs(model, pairs, data.train, cfg, progress)
    train_s = time.perf_counter() - t_train
    expert_ppl = (
        perplexity(model, heldout, cfg.batch_size, cfg.bf16) if len(heldout) else float("nan")
    )

    ffn_weights: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for i, pair in pairs.items():
        for k, v in pair.expert_ffn.state_dict().items():
            ffn_weights[f"model.layers.{i}.mlp.{k}"] = v
        extras[f"model.layers.{i}.domain_embedding"] = embeddings[i]
        extras[f"model.layers.{i}.router_row"] = pair.expert_row.detach()
        extras[f"model.layers.{i}.router_bias"] = pair.expert_bias.detach()
        extras[f"model.layers.{i}.public_router_row"] = public_router_row(embeddings[i].numel())
    metadata = {
        "composer_format": FORMAT_TAG,
        "domain": domain,
        "layers": ",".join(str(i) for i in layer_ids),
        "top_k": str(cfg.top_k),
        "steps": str(cfg.steps),
        "seed": str(cfg.seed),
    }
    write_expert_artifact(public_dir, out_dir, ffn_weights, extras, metadata, overwrite=overwrite)
    return TrainResult(
        out_dir=out_dir,
        losses=losses,
        public_ppl=public_ppl,
        expert_ppl=expert_ppl,
        layers=layer_ids,
        train_chunks=int(data.train.shape[0]),
        heldout_chunks=int(heldout.shape[0]),
        wall_s=time.perf_counter() - t0,
        train_s=train_s,
        config=cfg.model_dump(),
    )
