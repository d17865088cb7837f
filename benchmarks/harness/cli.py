"""`adqueue` as a user runs it: a fresh process, with the environment a test or benchmark sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .servers import REPO

# Small and fast for tests; the default settings are exercised by the MTD tests and benchmarks.
FAST_MVG = ["--backbone", "efficientnet_lite0", "--set", "image_size=128"]


def cli_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADQUEUE_")}
    env.update({"PYTHONUNBUFFERED": "1", "ADQUEUE_TORCH_THREADS": "1"})
    env.update(settings)
    return env


def run_cli(args: list[str], env: dict[str, str], *, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`adqueue ARGS` in a fresh process, as a user would run it."""
    done = subprocess.run([sys.executable, "-m", "adqueue", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)  # checked here, with stderr in the message
    if check and done.returncode != 0:
        raise AssertionError(f"adqueue {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def run_json(args: list[str], env: dict[str, str]) -> object:
    return json.loads(run_cli([*args, "--format", "json"], env).stdout)
