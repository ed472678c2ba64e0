"""Networks of the L3 locator: the paper's CNN4 and a VGG16-layout backbone.

Belharbi et al. 2017, "Spotting L3 slice in CT scans using deep convolutional network and
transfer learning", section 3.2 and Table 1. Both networks take a batch of MIP windows
``(batch, channels, H, W)`` (rows = z, head up; columns = patient right -> left) and return

* ``offset``: the L3 position inside the window, *normalised*: ``(row - H/2) / a`` where
  ``row`` is the L3 row counted from the window top and ``a`` the half-range of training
  offsets (paper: a = 50 px). -1 = ``a`` rows above the centre, +1 = ``a`` rows below.
* ``presence``: a logit, "L3 lies within ``[-a, +a]`` of the window centre". This second
  head is an l3spot extension (the paper's single regression output cannot say "absent");
  see ``models/locator_cnn4.md``.

Plain torch only (no torchvision).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: CNN4 of Belharbi et al. 2017, Table 1: number of kernels and kernel sizes of the 4 layers.
CNN4_KERNELS = (10, 3, 3, 5)
CNN4_SIZES = (5, 7, 9, 3)

#: VGG16 convolutional layout (Simonyan & Zisserman 2015, configuration "D"); "M" = max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip

ARCHITECTURES = ("cnn4", "vgg16")


class CNN4(nn.Module):
    """The paper's CNN4: 4 conv layers, horizontal-only max-pooling, one FC output.

    Parameters
    ----------
    height, width : window size in pixels (H rows along z, W columns).
    in_channels : 1 for grey MIP windows.
    presence_head : add the l3spot "L3 in window" logit (a second FC output on the same
        features); False gives the paper's network exactly.

    Notes
    -----
    Layers (Belharbi et al. 2017, Table 1): conv 10@5x5, 3@7x7, 3@9x9, 5@3x3, each
    followed by ReLU and a (1 x 2) max-pooling (horizontal only, so the vertical position of
    what the filters see is kept for the regression), then one fully connected output.
    Convolutions are "valid" (no padding), as in Torch7's ``SpatialConvolution``.
    """

    def __init__(
        self, height: int, width: int, in_channels: int = 1, presence_head: bool = True
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, h, w = in_channels, height, width
        for n_k, k in zip(CNN4_KERNELS, CNN4_SIZES, strict=True):
            layers += [nn.Conv2d(c_in, n_k, k), nn.ReLU(inplace=True), nn.MaxPool2d((1, 2))]
            c_in, h, w = n_k, h - k + 1, (w - k + 1) // 2
        if h < 1 or w < 1:
            raise ValueError(f"window {height}x{width} px is too small for CNN4")
        self.features = nn.Sequential(*layers)
        self.n_features = c_in * h * w
        self.regressor = nn.Linear(self.n_features, 1)
        self.presence = nn.Linear(self.n_features, 1) if presence_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(offset, presence_logit)``, each ``(batch,)`` (presence None if absent)."""
        f = torch.flatten(self.features(x), 1)
        offset = self.regressor(f).squeeze(1)
        presence = self.presence(f).squeeze(1) if self.presence is not None else None
        return offset, presence


class VGG16Regressor(nn.Module):
    """VGG16-layout backbone with one FC regression head (and the optional presence head).

    Parameters
    ----------
    in_channels : 3 so that ImageNet-pretrained weights fit; grey windows are replicated to 3
        channels by :func:`prepare_input` (Belharbi et al. 2017, section 3.2).
    presence_head : add the l3spot "L3 in window" logit.
    pooled : (rows, cols) of the adaptive average pooling before the head; rows are kept
        so that the head still sees where along z a feature lies.

    Notes
    -----
    ``features`` is indexed exactly like torchvision's ``vgg16().features`` so that a
    state dict saved from it (keys ``features.<i>.weight``) loads with
    :func:`load_pretrained_backbone`.
    """

    def __init__(
        self, in_channels: int = 3, presence_head: bool = True, pooled: tuple[int, int] = (5, 4)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.n_features = c_in * pooled[0] * pooled[1]
        self.regressor = nn.Linear(self.n_features, 1)
        self.presence = nn.Linear(self.n_features, 1) if presence_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(offset, presence_logit)``, each ``(batch,)`` (presence None if absent)."""
        f = torch.flatten(self.pool(self.features(x)), 1)
        offset = self.regressor(f).squeeze(1)
        presence = self.presence(f).squeeze(1) if self.presence is not None else None
        return offset, presence


def build_model(
    arch: str, height: int, width: int, presence_head: bool = True
) -> CNN4 | VGG16Regressor:
    """Build a locator network.

    Parameters
    ----------
    arch : "cnn4" (1 input channel) or "vgg16" (3 input channels).
    height, width : window size in pixels.
    presence_head : add the "L3 in window" head.

    Raises
    ------
    ValueError
        Unknown architecture or a window too small for it.
    """
    if arch == "cnn4":
        return CNN4(height, width, in_channels=1, presence_head=presence_head)
    if arch == "vgg16":
        if height < 32 or width < 32:
            raise ValueError(f"window {height}x{width} px is too small for VGG16 (min 32)")
        return VGG16Regressor(in_channels=3, presence_head=presence_head)
    raise ValueError(f"unknown locator architecture {arch!r}; choose one of {ARCHITECTURES}")


def input_channels(model: nn.Module) -> int:
    """Number of input channels the first convolution expects."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return int(first.in_channels)


def prepare_input(windows: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Shape grey windows ``(batch, H, W)`` for ``model``: ``(batch, C, H, W)``.

    A 3-channel (pretrained) backbone gets the grey window replicated to 3 channels, as in
    Belharbi et al. 2017, section 3.2.
    """
    x = windows.unsqueeze(1)
    c = input_channels(model)
    return x.expand(-1, c, -1, -1) if c != 1 else x


def load_pretrained_backbone(model: VGG16Regressor, path: Path) -> list[str]:
    """Load user-supplied pretrained convolution weights into ``model.features``.

    Parameters
    ----------
    model : the VGG16-layout network.
    path : a ``torch.save``'d state dict with keys ``features.<i>.weight/bias`` (as saved
        from torchvision's ``vgg16()`` or ``vgg16().state_dict()``); other keys (the
        ImageNet classifier) are ignored. ImageNet weights cannot be downloaded here, so the
        file is the user's.

    Returns
    -------
    list of str
        The ``features`` keys that were loaded.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is not a state dict, holds no ``features.*`` key, or a shape differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a corrupt file
        raise ValueError(f"{path}: not a readable torch state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    own = model.features.state_dict()
    picked = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not picked:
        raise ValueError(f"{path}: no 'features.*' keys (not a VGG16 state dict)")
    for k, v in picked.items():
        if k not in own:
            raise ValueError(f"{path}: unexpected backbone key features.{k}")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{path}: features.{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    model.features.load_state_dict(picked, strict=False)
    return sorted("features." + k for k in picked)
