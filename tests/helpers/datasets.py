"""The shared defect datasets beside the repository, and what detector tests take from them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness.servers import REPO

SHARED = Path(os.environ.get("ADQUEUE_SHARED_DIR", REPO.parent / "shared"))
DATASETS = SHARED / "datasets"


def datasets_or_skip(name: str) -> Path:
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared datasets sit beside the repo on dev machines and CI)")
    return path


def load_split(root: Path, split: str, size: int) -> tuple[torch.Tensor, list]:
    """uint8 pixels [N, 3, size, size] and the items of one split of an MVTec-style folder."""
    from adqueue.data.loader import load_stream, stack_pixels
    from adqueue.data.preprocess import Preprocess
    from adqueue.data.sources import open_source

    items = list(open_source(root, split=split).items())
    return stack_pixels(list(load_stream(items, Preprocess(size, 3)))), items


def split_masks(items: list, size: int) -> np.ndarray:
    """Each item's defect mask at size x size (all False for a good image), stacked [N, size, size]."""
    from adqueue.data.io import read_mask

    return np.stack([read_mask(i.mask, (size, size)) if i.mask else np.zeros((size, size), bool) for i in items])
