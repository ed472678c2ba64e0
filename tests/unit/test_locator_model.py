"""Tests of the locator networks (worker/model.py): shapes, heads, pretrained backbone path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.locator.model import (
    CNN4,
    CNN4_KERNELS,
    CNN4_SIZES,
    VGG16Regressor,
    build_model,
    load_pretrained_backbone,
    prepare_input,
)


def test_cnn4_has_the_papers_four_conv_layers_and_horizontal_pooling_only() -> None:
    m = CNN4(160, 192)
    convs = [x for x in m.features if isinstance(x, torch.nn.Conv2d)]
    pools = [x for x in m.features if isinstance(x, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == list(CNN4_KERNELS) == [10, 3, 3, 5]
    assert [c.kernel_size[0] for c in convs] == list(CNN4_SIZES) == [5, 7, 9, 3]
    assert all(p.kernel_size == (1, 2) for p in pools) and len(pools) == 4
    assert m.regressor.out_features == 1


def test_cnn4_output_shapes_with_and_without_presence_head() -> None:
    x = torch.rand(3, 1, 160, 192)
    off, pres = CNN4(160, 192)(x)
    assert off.shape == (3,) and pres is not None and pres.shape == (3,)
    off, pres = CNN4(160, 192, presence_head=False)(x)
    assert off.shape == (3,) and pres is None


def test_cnn4_rejects_a_window_too_small() -> None:
    with pytest.raises(ValueError):
        CNN4(16, 16)


def test_vgg16_layout_and_shapes_on_grey_windows_replicated_to_three_channels() -> None:
    m = build_model("vgg16", 64, 64)
    convs = [x for x in m.features if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 13 and convs[0].in_channels == 3 and convs[-1].out_channels == 512
    grey = torch.rand(2, 64, 64)
    x = prepare_input(grey, m)
    assert x.shape == (2, 3, 64, 64)
    assert torch.equal(x[:, 0], x[:, 2])
    off, pres = m(x)
    assert off.shape == (2,) and pres is not None and pres.shape == (2,)


def test_pretrained_backbone_loads_a_saved_state_dict(tmp_path: Path) -> None:
    donor = VGG16Regressor()
    with torch.no_grad():
        for p in donor.features.parameters():
            p.fill_(0.125)
    state = {f"features.{k}": v for k, v in donor.features.state_dict().items()}
    state["classifier.6.weight"] = torch.zeros(1000, 4096)  # ImageNet head: ignored
    path = tmp_path / "vgg16_features.pt"
    torch.save(state, path)
    target = VGG16Regressor()
    loaded = load_pretrained_backbone(target, path)
    assert "features.0.weight" in loaded and "features.28.bias" in loaded and len(loaded) == 26
    assert torch.all(target.features[0].weight == 0.125)
    # the regression head stays as initialised (not part of the backbone file)
    assert not torch.all(target.regressor.weight == 0.125)


def test_pretrained_backbone_errors_are_clear(tmp_path: Path) -> None:
    m = VGG16Regressor()
    with pytest.raises(FileNotFoundError):
        load_pretrained_backbone(m, tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"features.0.weight": torch.zeros(64, 1, 3, 3)}, bad)
    with pytest.raises(ValueError, match="shape"):
        load_pretrained_backbone(m, bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError):
        load_pretrained_backbone(m, junk)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        build_model("resnet", 64, 64)
