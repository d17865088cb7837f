"""Shared fixtures: a small real-texture dataset. Shared code lives in tests/helpers/ and, where
benchmarks use it too, in benchmarks/harness/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def textures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MVTec-style root, flat dump with a corrupt PNG and a text file), built from real textures."""
    from adqueue.cli.demo import build_dataset

    return build_dataset(tmp_path_factory.mktemp("textures"), n_normal=24, n_dump=16)
