"""Shared fixtures: the datasets beside the repo, a small real-texture dataset, CLI helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from tests.servers import REPO

SHARED = Path(os.environ.get("ADQUEUE_SHARED_DIR", REPO.parent / "shared"))
DATASETS = SHARED / "datasets"
# Small and fast for tests; the default settings are exercised by the MTD tests and benchmarks.
FAST_MVG = ["--backbone", "efficientnet_lite0", "--set", "image_size=128"]

torch.set_num_threads(2)


def datasets_or_skip(name: str) -> Path:
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared datasets sit beside the repo on dev machines and CI)")
    return path


@pytest.fixture(scope="session")
def textures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MVTec-style root, flat dump with a corrupt PNG and a text file), built from real textures."""
    from adqueue.cli.demo import build_dataset

    return build_dataset(tmp_path_factory.mktemp("textures"), n_normal=24, n_dump=16)


def load_split(root: Path, split: str, size: int) -> tuple[torch.Tensor, list]:
    """uint8 pixels [N, 3, size, size] and the items of one split of an MVTec-style folder."""
    from adqueue.data.loader import load_stream, stack_pixels
    from adqueue.data.sources import open_source
    from adqueue.data.preprocess import Preprocess

    items = list(open_source(root, split=split).items())
    return stack_pixels(list(load_stream(items, Preprocess(size, 3)))), items


def split_masks(items: list, size: int) -> np.ndarray:
    """Each item's defect mask at size x size (all False for a good image), stacked [N, size, size]."""
    from adqueue.data.io import read_mask

    return np.stack([read_mask(i.mask, (size, size)) if i.mask else np.zeros((size, size), bool) for i in items])


def cli_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADQUEUE_")}
    env.update({"PYTHONUNBUFFERED": "1", "ADQUEUE_TORCH_THREADS": "1"})
    env.update(settings)
    return env


def run_cli(args: list[str], env: dict[str, str], *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`adqueue ARGS` in a fresh process, as a user would run it."""
    done = subprocess.run([sys.executable, "-m", "adqueue", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"adqueue {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def invoke_cli(data_dir: Path, *args: str, ok: bool = True, **env: str) -> Result:
    """`adqueue --data-dir DATA_DIR ARGS` in this process on the embedded default (no broker)."""
    from adqueue.cli import cli

    result = CliRunner().invoke(cli, ["--data-dir", str(data_dir), *args], env={"ADQUEUE_BROKER_URL": "", **env},
                                catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


def run_json(args: list[str], env: dict[str, str]) -> object:
    return json.loads(run_cli([*args, "--format", "json"], env).stdout)
