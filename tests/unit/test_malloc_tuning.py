"""The CLI restarts itself once with glibc malloc tuning, unless told not to, already tuned, or
not computing in this process (reading SQL, submitting to a broker, printing help)."""

import pytest

from adqueue.core import malloc_tuning


def _capture(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    monkeypatch.setattr(malloc_tuning.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setattr(malloc_tuning.sys, "argv", ["adqueue", "score", "--model", "m", "dump/"])
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "ADQUEUE_MALLOC_TUNED", "ADQUEUE_MALLOC_TUNING",
                "ADQUEUE_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_reexec_once_with_both_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _capture(monkeypatch)
    malloc_tuning.reexec_with_malloc_tuning()
    (_exe, argv, env), = calls
    assert argv[1:] == ["-m", "adqueue", "score", "--model", "m", "dump/"]
    assert env["MALLOC_MMAP_THRESHOLD_"] == env["MALLOC_TRIM_THRESHOLD_"] == str(4 << 30)
    monkeypatch.setenv("ADQUEUE_MALLOC_TUNED", "1")
    malloc_tuning.reexec_with_malloc_tuning()
    assert len(calls) == 1  # the restarted process does not restart again


def test_opt_out_and_user_settings_are_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _capture(monkeypatch)
    monkeypatch.setenv("ADQUEUE_MALLOC_TUNING", "0")
    malloc_tuning.reexec_with_malloc_tuning()
    assert calls == []
    monkeypatch.delenv("ADQUEUE_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    malloc_tuning.reexec_with_malloc_tuning()
    (_, _, env), = calls
    assert env["MALLOC_MMAP_THRESHOLD_"] == "1048576"  # a user's own value wins


@pytest.mark.parametrize(("argv", "broker", "computes"), [
    (["score", "--model", "m", "dump/"], "", True),
    (["--data-dir", "d", "-v", "train", "--data", "x", "--name", "n"], "", True),
    (["evaluate", "--model", "m", "--data", "x"], "  ", True),  # blank: no broker
    (["resume", "3"], "", True),
    (["worker"], "redis://h:6379/0", True),
    (["demo"], "", True),
    (["score", "--model", "m", "dump/"], "redis://h:6379/0", False),
    (["--broker", "redis://h:6379/0", "train", "--data", "x", "--name", "n"], "", False),
    (["--broker=redis://h:6379/0", "resume", "3"], "", False),
    (["--broker", "", "score", "--model", "m", "dump/"], "redis://h:6379/0", True),  # the flag wins
    (["--db", "score", "jobs"], "", False),  # a global option's value is not the verb
    (["jobs"], "", False),
    (["reconcile"], "", False),
    (["db", "upgrade"], "", False),
    (["score", "--help"], "", False),
    (["--help"], "", False),
    ([], "", False),
])
def test_only_commands_that_compute_here_restart(monkeypatch: pytest.MonkeyPatch, argv: list[str], broker: str,
                                                 computes: bool) -> None:
    calls = _capture(monkeypatch)
    monkeypatch.setattr(malloc_tuning.sys, "argv", ["adqueue", *argv])
    monkeypatch.setenv("ADQUEUE_BROKER_URL", broker)
    malloc_tuning.reexec_with_malloc_tuning()
    assert len(calls) == int(computes)
