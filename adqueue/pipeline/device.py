"""Which device a process computes on, and how many CPU threads torch may use there."""

from __future__ import annotations

from typing import Any

from adqueue.core.errors import AdqueueError


def resolve_device(setting: str) -> Any:
    """`auto` picks CUDA when this process sees a GPU. Only called after any fork (see workers)."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdqueueError(f"device {setting} requested but CUDA is not available on this host")
    return device


def apply_torch_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads for this process (None leaves torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
