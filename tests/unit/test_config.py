"""Settings: flags over environment over defaults, and clear errors."""

from pathlib import Path

import pytest

from adqueue.core.config import Settings
from adqueue.core.errors import ConfigError


def test_defaults_are_embedded_sqlite_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("DATA_DIR", "DATABASE_URL", "BROKER_URL", "QUEUE", "DEVICE", "TORCH_THREADS"):
        monkeypatch.delenv(f"ADQUEUE_{key}", raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings.load()
    assert settings.embedded and settings.data_dir == tmp_path / "adqueue-data"
    assert settings.database_url == f"sqlite:///{tmp_path / 'adqueue-data' / 'adqueue.db'}"
    assert settings.queue == "gpu" and settings.max_attempts == 3 and settings.torch_threads is None


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADQUEUE_BROKER_URL", "redis://envhost:6379/0")
    monkeypatch.setenv("ADQUEUE_QUEUE", "cpu")
    monkeypatch.setenv("ADQUEUE_RETRY_DELAY", "0.5")
    settings = Settings.load(broker_url="redis://flaghost:6379/1", data_dir=tmp_path)
    assert settings.broker_url == "redis://flaghost:6379/1" and settings.queue == "cpu"
    assert settings.retry_delay_s == 0.5
    monkeypatch.setenv("ADQUEUE_BROKER_URL", "")
    assert Settings.load(data_dir=tmp_path).embedded  # an empty value switches the queue off
    child = Settings.load(data_dir=tmp_path).export_env()
    assert child["ADQUEUE_DATA_DIR"] == str(tmp_path) and child["ADQUEUE_BROKER_URL"] == ""
    assert "ADQUEUE_TORCH_THREADS" not in child
    monkeypatch.setenv("ADQUEUE_TORCH_THREADS", "3")
    assert Settings.load(data_dir=tmp_path).export_env()["ADQUEUE_TORCH_THREADS"] == "3"


@pytest.mark.parametrize(("env", "value", "message"), [
    ("ADQUEUE_MAX_ATTEMPTS", "zero", "positive integer"),
    ("ADQUEUE_MAX_ATTEMPTS", "0", "positive integer"),
    ("ADQUEUE_RETRY_DELAY", "-1", "positive number"),
    ("ADQUEUE_TORCH_THREADS", "0", "positive integer"),
    ("ADQUEUE_DEVICE", "tpu", "unknown device"),
    ("ADQUEUE_BROKER_URL", "amqp://x", "unsupported broker"),
])
def test_bad_settings_are_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str, value: str, message: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=message):
        Settings.load(data_dir=tmp_path)


def test_gpu_path_settings_parse_export_and_refuse_nonsense(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("AUTOCAST", "CHANNELS_LAST", "PIN_MEMORY", "GPU_DECODE", "DECODE_THREADS"):
        monkeypatch.delenv(f"ADQUEUE_{key}", raising=False)
    default = Settings.load(data_dir=tmp_path)
    assert (default.autocast, default.channels_last, default.pin_memory, default.gpu_decode,
            default.decode_threads) == ("auto", True, True, False, None)
    monkeypatch.setenv("ADQUEUE_AUTOCAST", "BF16")
    monkeypatch.setenv("ADQUEUE_CHANNELS_LAST", "off")
    monkeypatch.setenv("ADQUEUE_GPU_DECODE", "1")
    monkeypatch.setenv("ADQUEUE_DECODE_THREADS", "0")
    settings = Settings.load(data_dir=tmp_path)
    assert (settings.autocast, settings.channels_last, settings.gpu_decode, settings.decode_threads) == ("bf16", False,
                                                                                                        True, 0)
    exported = settings.export_env()
    assert exported["ADQUEUE_CHANNELS_LAST"] == "0" and exported["ADQUEUE_DECODE_THREADS"] == "0"
    for env, value, message in (("ADQUEUE_AUTOCAST", "fp8", "ADQUEUE_AUTOCAST must be one of"),
                                ("ADQUEUE_PIN_MEMORY", "maybe", "ADQUEUE_PIN_MEMORY must be 1 or 0"),
                                ("ADQUEUE_DECODE_THREADS", "-1", "ADQUEUE_DECODE_THREADS must be a whole number")):
        with monkeypatch.context() as scoped:
            scoped.setenv(env, value)
            with pytest.raises(ConfigError, match=message):
                Settings.load(data_dir=tmp_path)


def test_autocast_dtype_follows_the_setting_and_the_device() -> None:
    import torch

    from adqueue.pipeline.device import autocast_dtype

    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("off", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16 and autocast_dtype("fp16", "cpu") == torch.float16
