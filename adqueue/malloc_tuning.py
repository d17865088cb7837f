"""glibc malloc settings that stop PyTorch on CPU from paying for page faults on every batch.

By default glibc serves every allocation above 128 KiB-32 MiB with a fresh mmap and unmaps it on
free, so each forward pass page-faults its activations in again (zeroed by the kernel). Raising
the mmap and trim thresholds keeps those buffers in the heap for reuse: on this project's 2-core
machine that turned 6.6 s of system time into 0.1 s for the same batches (benchmarks/pipeline.py).
glibc reads these variables only at process start, hence the one-time re-exec.
"""

from __future__ import annotations

import os
import sys

_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
_MARK = "ADQUEUE_MALLOC_TUNED"


def reexec_with_malloc_tuning() -> None:
    """Restart this command once with the tuning in its environment (Linux/glibc only)."""
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("ADQUEUE_MALLOC_TUNING", "1") == "0"
        or os.environ.get(_MARK)
        or all(key in os.environ for key in _TUNING)
    ):
        return
    env = {**_TUNING, **os.environ, _MARK: "1"}
    os.execve(sys.executable, [sys.executable, "-m", "adqueue", *sys.argv[1:]], env)
