"""Crash points for fault tests: a process dies by SIGKILL exactly where a test needs it to.

`ADQUEUE_FAILPOINT=name` kills this process the first time it reaches `failpoint("name")`;
`name@N` the Nth time; `name@N=stop` stops it there instead (SIGSTOP), for a test to do something
at that exact moment and let it go on with SIGCONT. Some crashes (between a shard's commit and its job's end, in the middle
of an evaluate job's metrics) last microseconds and cannot be hit from outside by timing; this
makes them happen for real, in a real worker, with no other change in behaviour. Unset (always,
outside tests), a failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def _armed() -> tuple[str, int, str] | None:
    spec = os.environ.get("ADQUEUE_FAILPOINT")
    if not spec:
        return None
    spec, _, action = spec.partition("=")
    name, _, count = spec.partition("@")
    return name, int(count or 1), action or "kill"


def failpoint(name: str) -> None:
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == armed[1] and armed[2] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif _hits[name] >= armed[1] and armed[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
