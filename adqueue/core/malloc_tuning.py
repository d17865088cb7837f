"""glibc malloc settings that stop PyTorch on CPU from paying for page faults on every batch.

By default glibc serves every allocation above 128 KiB-32 MiB with a fresh mmap and unmaps it on
free, so each forward pass page-faults its activations in again (zeroed by the kernel). Raising
the mmap and trim thresholds keeps those buffers in the heap for reuse: on this project's 2-core
machine that turned 6.6 s of system time into 0.1 s for the same batches (benchmarks/pipeline.py).
glibc reads these variables only at process start, hence the one-time re-exec.

The re-exec costs a second interpreter start, so only a command that runs detectors in this
process pays it: `worker`, `demo`, and train/score/evaluate/resume without a broker. That is read
from the arguments and the environment alone, before click or anything else is imported; a guess
wrong the other way only leaves malloc untuned.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
_MARK = "ADQUEUE_MALLOC_TUNED"
# Verbs that run detectors here: always, or only on the embedded default (no broker).
_ALWAYS_COMPUTE = frozenset({"worker", "demo"})
_COMPUTE_WITHOUT_BROKER = frozenset({"train", "score", "evaluate", "resume"})
# The group's options that take a value (adqueue/cli/__init__.py), so that a value is not taken
# for the verb.
_GLOBAL_WITH_VALUE = frozenset({"--db", "--broker", "--data-dir", "--queue"})
_HELP = frozenset({"-h", "--help", "--version"})


def computes(args: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether `adqueue ARGS` runs detectors in this process (rather than reading SQL, or
    submitting to a broker, or printing help)."""
    broker = environ.get("ADQUEUE_BROKER_URL", "")
    rest = iter(args)
    verb = None
    for arg in rest:
        if arg in _HELP:
            return False
        name, has_value, value = arg.partition("=")
        if name in _GLOBAL_WITH_VALUE:
            value = value if has_value else next(rest, "")
            if name == "--broker":
                broker = value
        elif not arg.startswith("-"):
            verb = arg
            break
    if verb is None or any(arg in _HELP for arg in rest):
        return False
    return verb in _ALWAYS_COMPUTE or (verb in _COMPUTE_WITHOUT_BROKER and not broker.strip())


def reexec_with_malloc_tuning() -> None:
    """Restart this command once with the tuning in its environment (Linux/glibc only), if it computes."""
    if (
        not sys.platform.startswith("linux")
        or os.environ.get("ADQUEUE_MALLOC_TUNING", "1") == "0"
        or os.environ.get(_MARK)
        or all(key in os.environ for key in _TUNING)
        or not computes(sys.argv[1:], os.environ)
    ):
        return
    env = {**_TUNING, **os.environ, _MARK: "1"}
    os.execve(sys.executable, [sys.executable, "-m", "adqueue", *sys.argv[1:]], env)
