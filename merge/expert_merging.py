"""Expert Merging and Expert Merging++ (Zhang et al. 2025, arXiv 2509.25712).

The merged model is ``base + sum_i c_{i,t} tau_{i,t}`` for every tensor t whose task vectors are
not all zero. Only the coefficients c train; every weight stays frozen and the model runs
through ``torch.func.functional_call``. The loss, on a few unlabeled calibration batches per
expert, aligns the merged model with each expert on that expert's own data:

    sum_k a_k [ KL(expert_k logits || merged logits) + beta * MSE(merged h_l, expert_k h_l) ]
      + gamma * sum |c - c_init|

with h_l the hidden states of the chosen layers and a_k optional per-expert loss weights. (The
paper's soft cross-entropy differs from this KL by the target entropy, a constant: same
gradients.) Each step uses one calibration batch per expert, picked with ``seed``.

Parameterisation: c = c_init + c_max * (sigmoid(s) - sigmoid(s_0)), s_0 = logit(c_init / c_max).
c spans (0, c_max) like the paper's sigmoid coefficients, and at s = s_0 it is c_init *exactly*,
so a run frozen at its init is bit-identical to task arithmetic (both use ``dense.combine``).

Expert Merging++ (stage 2): score each tensor's importance as
    I_t = sum_i |c_{i,t}| * ||tau_{i,t}||_F / sqrt(n_t) * log(n_t)   (normalised to sum to 1)
i.e. the learned per-parameter update size weighted by the (log) parameter count, then give the
top ``top_fraction`` of tensors ``chunks`` coefficients per expert along dim 0 (initialised from
stage 1) and train again. The exact importance formula of the paper is not reproduced here; this
one uses the three ingredients it names (coefficients, task-vector magnitudes, parameter counts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call

from merge.errors import MergeError
from merge.task_vectors import (
    check_tensors,
    combine,
    task_arithmetic_coefficients,
    task_vectors,
)


class ExpertMergingParams(BaseModel):
    """Parameters of ``method: expert_merging``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    weight: list[float] | None = None  # task-arithmetic init: c_init = lambda * weight
    lambda_: float = Field(0.3, alias="lambda")
    c_max: float = 1.0  # coefficients live in (0, c_max)
    steps: int = Field(30, ge=0)
    lr: float = Field(0.05, ge=0)
    beta: float = Field(1.0, ge=0)  # hidden-state MSE weight
    gamma: float = Field(1e-3, ge=0)  # L1 pull toward the init
    temperature: float = Field(1.0, gt=0)
    hidden_layers: list[int] | None = None  # indices into hidden_states; None: the middle one
    expert_loss_weights: list[float] | None = None  # task-weighted trade-off a_k
    seed: int = 0  # picks one calibration batch per expert per step


class ExpertMergingPlusParams(ExpertMergingParams):
    """Parameters of ``method: expert_merging++`` (stage 1 as above, then chunked stage 2)."""

    chunks: int = Field(4, ge=2)
    top_fraction: float = Field(0.25, gt=0, le=1)
    steps_stage2: int = Field(30, ge=0)


@dataclass
class ExpertMergingResult:
    state_dict: dict[str, Tensor]  # merged weights, base dtype
    coefficients: dict[str, Tensor]  # per tensor: [N] or [N, chunks] (float32)
    losses: list[float] = field(default_factory=list)  # total loss per step
    initial_alignment: float = 0.0  # alignment loss (no regulariser) at the init
    final_alignment: float = 0.0  # alignment loss (no regulariser) of the result
    chunked: list[str] = field(default_factory=list)  # tensors given chunk coefficients (++)


Batches = Sequence[Tensor] | Tensor


class _Problem:
    """Frozen inputs shared by both stages: base, task vectors, expert targets."""

    def __init__(
        self,
        model: nn.Module,
        base: Mapping[str, Tensor],
        experts: Sequence[Mapping[str, Tensor]],
        calibration: Sequence[Batches],
        p: ExpertMergingParams,
        expert_names: Sequence[str] | None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        n = len(experts)
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise MergeError(f"expert_merging: compute dtype {compute_dtype} is not supported")
        self.bf16 = compute_dtype == torch.bfloat16
        if n == 0:
            raise MergeError("expert_merging: no experts")
        if len(calibration) != n:
            raise MergeError(
                f"expert_merging: {len(calibration)} calibration sets for {n} experts "
                "(one list of token-id batches per expert)"
            )
        self.batches = [
            [calibration[k]] if isinstance(calibration[k], Tensor) else list(calibration[k])
            for k in range(n)
        ]
        for k, bs in enumerate(self.batches):
            if not bs:
                raise MergeError(f"expert_merging: expert #{k} has no calibration batch")
            for b in bs:
                if b.dim() != 2 or b.dtype not in (torch.int64, torch.int32):
                    raise MergeError(
                        f"expert_merging: calibration of expert #{k} must be [batch, seq] token "
                        f"ids, got {tuple(b.shape)} {b.dtype}"
                    )
        self.loss_w = p.expert_loss_weights or [1.0] * n
        if len(self.loss_w) != n:
            raise MergeError(
                f"expert_merging: parameter 'expert_loss_weights' has {len(self.loss_w)} values "
                f"for {n} experts"
            )
        if p.weight is not None and len(p.weight) != n:
            raise MergeError(
                f"expert_merging: parameter 'weight' has {len(p.weight)} values for {n} experts"
            )
        self.c_init = task_arithmetic_coefficients(n, p.weight, p.lambda_, False, "expert_merging")
        for i, c in enumerate(self.c_init.tolist()):
            if not (0.0 < c < p.c_max):
                raise MergeError(
                    f"expert_merging: initial coefficient lambda*weight of expert #{i} is {c}; "
                    f"it must lie in (0, c_max={p.c_max})"
                )
        self.s0 = torch.logit(self.c_init / p.c_max)
        self.sig_s0 = torch.sigmoid(self.s0)
        self.c_max = p.c_max
        self.model = model.eval()  # no dropout: the loss must be a function of c alone
        self.base32: dict[str, Tensor] = {}
        self.taus: dict[str, Tensor] = {}
        self.dtypes = {k: v.dtype for k, v in base.items()}
        for name, b in base.items():
            others = []
            for i, e in enumerate(experts):
                if name not in e:
                    who = f"expert {expert_names[i]!r} (#{i})" if expert_names else f"expert #{i}"
                    raise MergeError(f"expert_merging: {who} lacks tensor {name!r} of the base")
                others.append(e[name])
            if not b.is_floating_point():
                self.base32[name] = b
                continue
            check_tensors(b, others, name=name, expert_names=expert_names)
            self.base32[name] = b.float()
            tau = task_vectors(b, others)
            if torch.any(tau != 0):
                self.taus[name] = tau
        if not self.taus:
            raise MergeError("expert_merging: every expert equals the base; nothing to learn")
        self.temperature = p.temperature
        self.beta = p.beta
        self.layers = p.hidden_layers
        self.targets = [
            [
                self._forward(
                    {k: e[k].float() if e[k].is_floating_point() else e[k] for k in base}, b
                )
                for b in bs
            ]
            for e, bs in zip(experts, self.batches, strict=True)
        ]

    def _forward(self, params: Mapping[str, Tensor], ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        grad = any(t.requires_grad for t in params.values())
        device = next(iter(params.values())).device.type
        with (
            torch.set_grad_enabled(grad),
            torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            out = functional_call(
                self.model, dict(params), (ids,), {"output_hidden_states": True, "use_cache": False}
            )
        hs = [h.float() for h in out.hidden_states]  # no-ops in float32
        layers = self.layers if self.layers is not None else [len(hs) // 2]
        for li in layers:
            if not -len(hs) <= li < len(hs):
                raise MergeError(
                    f"expert_merging: parameter 'hidden_layers' entry {li} is out of range for "
                    f"{len(hs)} hidden states"
                )
        return out.logits.float(), [hs[li] for li in layers]

    def coefs(self, s: Tensor) -> Tensor:
        """c from s; s is [N] or [N, K] (chunks)."""
        shape = [-1] + [1] * (s.dim() - 1)
        return self.c_init.view(shape) + self.c_max * (torch.sigmoid(s) - self.sig_s0.view(shape))

    def merged(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        params = dict(self.base32)
        for name, s in scores.items():
            tau = self.taus[name]
            c = self.coefs(s)
            if s.dim() == 2:  # chunk-wise: expand chunk coefficients to rows of dim 0
                rows = _chunk_rows(tau.shape[1], s.shape[1])
                c = c[:, rows].view(c.shape[0], -1, *([1] * (tau.dim() - 2)))
            params[name] = combine(self.base32[name], tau, c)
        return params

    def alignment(self, params: Mapping[str, Tensor], pick: Sequence[int] | None) -> Tensor:
        total = torch.zeros(())
        for k, bs in enumerate(self.batches):
            idx = range(len(bs)) if pick is None else [pick[k]]
            for j in idx:
                logits, hidden = self._forward(params, bs[j])
                t_logits, t_hidden = self.targets[k][j]
                t = self.temperature
                # KL = soft cross-entropy minus the (constant) target entropy: same gradient,
                # but 0 means perfect alignment, which makes the reported figures readable.
                log_p = F.log_softmax(t_logits / t, -1)
                log_q = F.log_softmax(logits / t, -1)
                ce = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
                mse = sum(F.mse_loss(h, th) for h, th in zip(hidden, t_hidden, strict=True))
                total = total + self.loss_w[k] * (ce + self.beta * mse) / len(idx)
        return total

    def regulariser(self, scores: Mapping[str, Tensor]) -> Tensor:
        reg = torch.zeros(())
        for s in scores.values():
            shape = [-1] + [1] * (s.dim() - 1)
            reg = reg + (self.coefs(s) - self.c_init.view(shape)).abs().sum()
        return reg


def _chunk_rows(rows: int, chunks: int) -> Tensor:
    """Chunk index of each row when ``rows`` are split into ``chunks`` near-equal parts."""
    return torch.cat(
        [torch.full((len(c),), i) for i, c in enumerate(torch.arange(rows).tensor_split(chunks))]
    )


def _train(
    prob: _Problem, scores: dict[str, Tensor], steps: int, lr: float, gamma: float, seed: int
) -> list[float]:
    leaves = list(scores.values())
    for s in leaves:
        s.requires_grad_(True)
    opt = torch.optim.Adam(leaves, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        pick = [int(torch.randint(len(bs), (1,), generator=gen)) for bs in prob.batches]
        opt.zero_grad()
        loss = prob.alignment(prob.merged(scores), pick) + gamma * prob.regulariser(scores)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for s in leaves:
        s.requires_grad_(False)
    return losses


def _result(
    prob: _Problem, scores: dict[str, Tensor], losses: list[float], init: float, chunked: list[str]
) -> ExpertMergingResult:
    with torch.no_grad():
        params = prob.merged(scores)
        final = float(prob.alignment(params, None))
        coefs = {k: prob.coefs(s).detach().clone() for k, s in scores.items()}
    sd = {k: v.detach().to(prob.dtypes[k]) for k, v in params.items()}
    return ExpertMergingResult(sd, coefs, losses, init, final, chunked)


def expert_merging(
    model: nn.Module,
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    calibration: Sequence[Batches],
    params: ExpertMergingParams | None = None,
    expert_names: Sequence[str] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> ExpertMergingResult:
    """Learn one coefficient per expert and tensor (stage 1 of the paper).

    ``model``: a module of the base architecture (e.g. a transformers CausalLM built from the
    base config); its own weights are ignored. ``base``/``experts``: state dicts with the
    model's keys. ``calibration[k]``: expert k's unlabeled token-id batches ([batch, seq],
    unpadded, or one such tensor). Expert targets are computed once, before training.
    ``compute_dtype`` bfloat16 runs the forward passes under bf16 autocast (the caller decides
    where that is native; coefficients, losses and merged weights stay float32).
    """
    p = params or ExpertMergingParams()
    prob = _Problem(model, base, experts, calibration, p, expert_names, compute_dtype)
    scores = {k: prob.s0.clone() for k in prob.taus}
    with torch.no_grad():
        init = float(prob.alignment(prob.merged(scores), None))
    losses = _train(prob, scores, p.steps, p.lr, p.gamma, p.seed)
    return _result(prob, scores, losses, init, [])


def layer_importance(
    coefficients: Mapping[str, Tensor], taus: Mapping[str, Tensor]
) -> dict[str, float]:
    """Normalised importance per tensor: sum_i |c_i| ||tau_i|| / sqrt(n) * log(n) (sums to 1)."""
    raw = {}
    for name, c in coefficients.items():
        tau = taus[name]
        n = tau[0].numel()
        norms = tau.flatten(1).norm(dim=1)
        c_mean = c.abs() if c.dim() == 1 else c.abs().mean(1)
        raw[name] = float((c_mean * norms).sum()) / math.sqrt(n) * math.log(max(n, 2))
    total = sum(raw.values()) or 1.0
    return {k: v / total for k, v in raw.items()}


def expert_merging_plus(
    model: nn.Module,
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    calibration: Sequence[Batches],
    params: ExpertMergingPlusParams | None = None,
    expert_names: Sequence[str] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> ExpertMergingResult:
    """Expert Merging++: stage 1, then chunk-wise coefficients for the most important tensors
    (``compute_dtype`` as in :func:`expert_merging`)."""
    p = params or ExpertMergingPlusParams()
    prob = _Problem(model, base, experts, calibration, p, expert_names, compute_dtype)
    scores = {k: prob.s0.clone() for k in prob.taus}
    with torch.no_grad():
        init = float(prob.alignment(prob.merged(scores), None))
    losses = _train(prob, scores, p.steps, p.lr, p.gamma, p.seed)
    with torch.no_grad():
        coefs = {k: prob.coefs(s) for k, s in scores.items()}
    importance = layer_importance(coefs, prob.taus)
    # Chunks split dim 0 of the tensor (dim 1 of the stacked task vectors).
    eligible = [k for k, t in prob.taus.items() if t.dim() >= 3 and t.shape[1] >= p.chunks]
    n_top = max(1, round(p.top_fraction * len(eligible))) if eligible else 0
    chunked = sorted(eligible, key=lambda k: -importance[k])[:n_top]
    for k in chunked:
        scores[k] = scores[k].detach().unsqueeze(1).repeat(1, p.chunks)
    losses += _train(prob, scores, p.steps_stage2, p.lr, p.gamma, p.seed + 1)
    return _result(prob, scores, losses, init, sorted(chunked))
