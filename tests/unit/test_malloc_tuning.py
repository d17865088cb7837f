"""The CLI restarts itself once with glibc malloc tuning, unless told not to or already tuned."""

import pytest

from adqueue import malloc_tuning


def _capture(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    monkeypatch.setattr(malloc_tuning.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setattr(malloc_tuning.sys, "argv", ["adqueue", "score", "--model", "m", "dump/"])
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "ADQUEUE_MALLOC_TUNED", "ADQUEUE_MALLOC_TUNING"):
        monkeypatch.delenv(key, raising=False)
    return calls


def test_reexec_once_with_both_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _capture(monkeypatch)
    malloc_tuning.reexec_with_malloc_tuning()
    (exe, argv, env), = calls
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
