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


def autocast_dtype(setting: str, device: Any) -> Any:
    """The torch dtype a backbone's forward pass runs in under the ADQUEUE_AUTOCAST `setting`, or
    None for float32: `auto` is bfloat16 on a CUDA device that has it, float16 on an older one,
    float32 on the CPU (without AMX it is slower there, and it changes the scores)."""
    import torch

    if setting == "off" or (setting == "auto" and torch.device(device).type != "cuda"):
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def accelerate(detector: Any, settings: Any, device: Any) -> None:
    """Set up every frozen backbone of `detector` (on `device`) as the settings say: mixed precision
    (CUDA only, unless asked for) and channels-last on any device (oneDNN's convolutions and pooling
    are faster in it on the CPU too). A detector's own trained parts are left as they are."""
    from adqueue.detectors.components.backbones import FeatureExtractor

    dtype = autocast_dtype(settings.autocast, device)
    for module in detector.modules():
        if isinstance(module, FeatureExtractor):
            module.configure(autocast_dtype=dtype, channels_last=settings.channels_last)
