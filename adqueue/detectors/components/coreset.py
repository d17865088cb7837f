"""Greedy coreset selection (farthest-point sampling), as PatchCore reduces its memory bank.

Roth et al. 2022 (Alg. 1): start from one random patch, then repeatedly add the patch farthest
from everything chosen so far. The chosen set covers the feature space with the smallest largest
gap, so rare normal patches survive where a random subsample would drop them. Distances are
taken after a random Gaussian projection to a few dimensions (Johnson-Lindenstrauss keeps them
close), which makes each of the many greedy steps cheap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CHUNK_ROWS = 1 << 16  # rows projected at a time: bounds the temporary copy to a few MB


def random_projection(features: Tensor, dim: int, seed: int) -> Tensor:
    """`features` [N, D] times a seeded Gaussian matrix [D, dim] / sqrt(dim), on their device.

    With dim >= D the features are returned as they are: projecting up adds nothing.
    """
    if dim >= features.shape[1]:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator, dtype=torch.float64)
    matrix = (matrix / dim**0.5).to(device=features.device, dtype=features.dtype)
    out = torch.empty(features.shape[0], dim, device=features.device, dtype=features.dtype)
    for start in range(0, features.shape[0], CHUNK_ROWS):
        out[start:start + CHUNK_ROWS] = features[start:start + CHUNK_ROWS] @ matrix
    return out


def greedy_coreset(
    features: Tensor,
    count: int,
    *,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Indices [count] into `features` [N, D] of a greedy farthest-point coreset, in pick order.

    Exact greedy on the (projected) features: each step adds the row whose distance to its nearest
    chosen row is largest. Works in the features' dtype and on their device; None projects nothing.
    `progress(n)` is told every n steps done.

    A plain step measures every row against the newest pick, which for a bank of many thousand
    picks out of most of a million patches takes far too long on a CPU. The triangle inequality
    skips most of it, exactly: a row assigned to pick j (its nearest) can only move to the new pick
    c if |c - j| < 2 r_j, r_j being the farthest row assigned to j; only rows of such picks are
    measured. Early picks still touch most rows; later ones only a few small clusters.
    """
    total = features.shape[0]
    if not 0 < count <= total:
        raise ValueError(f"a coreset of {count} rows cannot be taken from {total}")
    # Centred: |x|^2 - 2 x.c + |c|^2 then cancels less, and distances do not change.
    points = random_projection(features, projection_dim, seed) if projection_dim is not None else features
    points = points.sub_(points.mean(dim=0)) if points is not features else points - points.mean(dim=0)
    norms = (points * points).sum(dim=1)
    first = int(torch.randint(total, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = torch.empty(count, dtype=torch.long, device=points.device)
    chosen[0] = first
    picked = torch.empty(count, points.shape[1], dtype=points.dtype, device=points.device)
    picked[0] = points[first]
    nearest = (norms - 2.0 * (points @ picked[0]) + norms[first]).clamp_min(0.0)  # squared, to the nearest pick
    assign = torch.zeros(total, dtype=torch.long, device=points.device)  # which pick is nearest
    radius = torch.zeros(count, dtype=points.dtype, device=points.device)
    radius[0] = nearest.max().sqrt()
    step = max(1, count // 100)
    for index in range(1, count):
        newest = torch.argmax(nearest)
        chosen[index] = newest
        centre = points[newest]
        picked[index] = centre
        between = (norms[chosen[:index]] - 2.0 * (picked[:index] @ centre) + norms[newest]).clamp_min(0.0).sqrt()
        # A small slack keeps rounding from skipping a row that is in fact nearer to the new pick.
        reachable = between < 2.0 * radius[:index] * (1.0 + 1e-4) + 1e-6
        rows = torch.nonzero(reachable[assign]).squeeze(1)
        if 4 * rows.numel() > total:  # most rows: one pass over all beats copying them out first
            squared = torch.addmv(norms, points, centre, alpha=-2.0)[rows]
        else:
            squared = torch.addmv(norms[rows], points[rows], centre, alpha=-2.0)
        squared = squared.add_(norms[newest]).clamp_min_(0.0)
        closer = squared < nearest[rows]
        moved = rows[closer]
        nearest[moved] = squared[closer]
        assign[moved] = index
        # Exact radii again for every pick whose rows were looked at (all its rows were).
        radius[:index][reachable] = 0.0
        radius.scatter_reduce_(0, assign[rows], nearest[rows].sqrt(), reduce="amax")
        if progress is not None and index % step == 0:
            progress(step)
    return chosen


def coreset_size(total: int, fraction: float, limit: int = 0) -> int:
    """Rows kept from `total` at `fraction`, at most `limit` (0: no limit): at least one, at most all."""
    count = min(total, max(1, round(total * fraction)))
    return min(count, limit) if limit > 0 else count
