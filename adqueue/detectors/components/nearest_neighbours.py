"""Exact k-nearest-neighbour Euclidean distances from query rows to a memory bank, in chunks.

A plain matrix product per chunk of queries (|q - b|^2 = |q|^2 - 2 q.b + |b|^2), on whatever device
the tensors are on. faiss-cpu's exact IndexFlatL2 did the same search (16 images x 1089 patches
against 6000 x 128 rows, 2 threads) in 330 ms per image against 417 ms here: a fifth faster, but on
the CPU only (a GPU worker would copy every batch back to the host) and one more binary
dependency; the scoring time stays within budget without it. Chunking bounds the
[queries x bank] distance block, whatever the batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_BLOCK_ELEMENTS = 1 << 24  # distance entries held at once: 64 MB of float32


def nearest_neighbours(
    queries: Tensor, bank: Tensor, k: int = 1, *, max_block: int = MAX_BLOCK_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Distances [Q, k] (ascending, not squared) and bank indices [Q, k] of each query's k nearest rows.

    `queries` [Q, D] and `bank` [M, D] share a device and dtype; k is capped at M.
    """
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    k = min(k, bank.shape[0])
    bank_norms = (bank * bank).sum(dim=1)
    rows = max(1, max_block // bank.shape[0])
    distances = torch.empty(queries.shape[0], k, dtype=queries.dtype, device=queries.device)
    indices = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    for start in range(0, queries.shape[0], rows):
        chunk = queries[start:start + rows]
        # |b|^2 - 2 q.b ranks the bank rows for q as well: |q|^2 is added to the k winners only,
        # which saves a pass over the block (most of the time outside the matrix product).
        partial = torch.addmm(bank_norms, chunk, bank.T, alpha=-2.0)
        if k == 1:
            best, where = partial.min(dim=1, keepdim=True)
        else:
            best, where = partial.topk(k, dim=1, largest=False, sorted=True)
        best += (chunk * chunk).sum(dim=1, keepdim=True)
        distances[start:start + rows] = best.clamp_min_(0.0).sqrt_()
        indices[start:start + rows] = where
    return distances, indices
