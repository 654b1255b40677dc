"""The engine as evaluation sees it, and perplexity from token logprobs.

composer/ may not import serve/ (ARCHITECTURE.md), so the engine is described here as a
protocol: serve.offline.OfflineEngine implements it (the CLI opens one and hands it over), and
the policy stays serve's: :meth:`Scorer.select` is the only way to an expert set, and
:meth:`Scorer.prompt_logprobs` refuses experts the policy does not grant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol


class Scorer(Protocol):
    names: list[str]  # the model's experts, router order

    def select(self, experts: Any) -> tuple[str, ...]: ...

    def prompt_logprobs(
        self,
        chunks: Sequence[Sequence[int]],
        allowed: Sequence[str],
        on_batch: Callable[[int], None] | None = None,
    ) -> list[list[float]]: ...


def perplexity(logprobs: Sequence[Sequence[float]]) -> float:
    """exp(mean next-token NLL) over every predicted position of every chunk: the same figure
    as composer.train.evaluate.perplexity (router_train.loss.mean_nll) in transformers."""
    total = sum(sum(chunk) for chunk in logprobs)
    count = sum(len(chunk) for chunk in logprobs)
    return math.exp(-total / count) if count else float("nan")


def domain_perplexities(
    scorer: Scorer,
    chunks: Mapping[str, Sequence[Sequence[int]]],
    allowed: Sequence[str],
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Perplexity of each domain's chunks with only ``allowed`` experts routed."""
    return {
        name: perplexity(scorer.prompt_logprobs(c, allowed, on_batch)) for name, c in chunks.items()
    }
