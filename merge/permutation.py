"""Neuron permutation alignment of SwiGLU experts (weight matching, Hungarian algorithm).

Permuting the intermediate neurons of an expert (rows of w1 and w3, columns of w2 by the same
permutation) leaves its function unchanged; aligning one expert's neurons to another's before
averaging makes the merge happen in one basis (Git Re-Basin style weight matching, as M-SMoE
does).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def max_weight_matching(similarity: Tensor) -> Tensor:
    """perm maximising sum_j similarity[j, perm[j]] over permutations (square matrix).

    scipy's linear_sum_assignment (a Jonker-Volgenant variant of the Hungarian algorithm,
    O(n^3)) handles thousands of neurons in seconds.
    """
    from scipy.optimize import linear_sum_assignment  # imported here: ~1 s, M-SMoE only

    sim = similarity.detach().double().cpu().numpy()
    rows, cols = linear_sum_assignment(sim, maximize=True)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.from_numpy(perm).long()


def neuron_features(w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """One row per intermediate neuron: its gate row, up row and down column, [I, 3H]."""
    return torch.cat([w1, w3, w2.T], dim=1).float()


def align_neurons(
    ref: tuple[Tensor, Tensor, Tensor], other: tuple[Tensor, Tensor, Tensor]
) -> Tensor:
    """perm such that ``permute_expert(*other, perm)`` has its neurons matched to ``ref``'s."""
    a, b = neuron_features(*ref), neuron_features(*other)
    return max_weight_matching(a @ b.T)


def permute_expert(
    w1: Tensor, w3: Tensor, w2: Tensor, perm: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Reorder intermediate neurons: neuron j of the result is neuron perm[j] of the input."""
    return w1[perm], w3[perm], w2[:, perm]
