"""Convolutional video baselines: the reference points the token-efficient models are compared with.

* ``FrameTCN`` (late fusion): a 2D CNN per frame, then a space-time convolution over the per-frame
  feature maps.
* ``Conv3DNet`` (early fusion, C3D-style): 3D convolutions from the pixels on, so motion of a few
  pixels between frames is seen at full resolution. This is the one that learns Glimpse's synthetic
  motion classes in minutes on a CPU (measured: see the README).

Not from the papers. Both see frame order, so both can tell a clip from its time reversal, which a
frame average cannot (the synthetic motion data is built so that order matters).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.registry import build_video_model, register_glimpse


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FrameTCN(nn.Module):
    """Per-frame CNN maps (B*T, C, h, w) -> (k x 3 x 3) space-time conv -> mean over space and time -> classifier.

    Input (B, 3, T, H, W). ``forward_features`` returns (B, T, C) tokens (one per frame), so the
    timm contract (features, head, classifier reset) holds as for the transformers.
    """

    def __init__(self, num_classes: int = 400, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128),
                 temporal_kernel: int = 3, num_frames: int = 8, img_size: int = 112, drop_rate: float = 0.0,
                 **kwargs) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_frames = num_frames
        self.img_size = img_size
        layers, cin = [], in_chans
        for i, w in enumerate(widths):
            layers += [_conv_bn(cin, w, 2), _conv_bn(w, w, 1)] if i else [_conv_bn(cin, w, 2)]
            cin = w
        self.stem = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = cin
        # Space-time conv over neighbouring frames' maps: where things moved becomes a feature.
        self.temporal = nn.Sequential(
            nn.Conv3d(cin, cin, (temporal_kernel, 3, 3), padding=(temporal_kernel // 2, 1, 1), bias=False),
            nn.BatchNorm3d(cin), nn.ReLU(inplace=True))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"FrameTCN expects (B, C, T, H, W) video, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"FrameTCN expects {self.in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        maps = self.stem(frames)  # (B*T, F, h, w)
        maps = maps.view(b, t, *maps.shape[1:]).transpose(1, 2)  # (B, F, T, h, w)
        return self.temporal(maps).mean(dim=(3, 4)).transpose(1, 2)  # (B, T, F)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=1))  # (B, F)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()


def _conv3d_bn(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, tuple(k // 2 for k in kernel), bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class Conv3DNet(nn.Module):
    """Early-fusion 3D CNN: stem (3x5x5, spatial stride 2) then 3x3x3 stages, mean over space-time.

    Input (B, 3, T, H, W); ``forward_features`` returns (B, T', C) tokens (space pooled), so the timm
    contract holds. The third stage halves time: T' = ceil(T / 2).
    """

    def __init__(self, num_classes: int = 400, in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128),
                 num_frames: int = 8, img_size: int = 112, drop_rate: float = 0.0, **kwargs) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"Conv3DNet needs at least 2 widths, got {widths}")
        self.num_classes, self.in_chans, self.num_frames, self.img_size = num_classes, in_chans, num_frames, img_size
        layers = [_conv3d_bn(in_chans, widths[0], (3, 5, 5), (1, 2, 2))]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(_conv3d_bn(cin, cout, (3, 3, 3), (2, 2, 2) if i == 1 else (1, 2, 2)))
        self.features = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = widths[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"Conv3DNet expects (B, {self.in_chans}, T, H, W) video, got shape {tuple(x.shape)}")
        return self.features(x).mean(dim=(3, 4)).transpose(1, 2)  # (B, T', C)

    forward_head = FrameTCN.forward_head
    forward = FrameTCN.forward
    get_classifier = FrameTCN.get_classifier
    reset_classifier = FrameTCN.reset_classifier
    no_weight_decay = FrameTCN.no_weight_decay


def _cfg(**kwargs) -> dict:
    # Video models keep timm's cfg keys; input_size is (C, T, H, W) (timm has no num_frames key).
    return {"num_classes": 400, "input_size": (3, 8, 112, 112), "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "stem.0.0", "classifier": "head", **kwargs}


default_cfgs = {"frame_tcn_tiny": _cfg(), "frame_tcn_small": _cfg(input_size=(3, 16, 112, 112)),
                "conv3d_tiny": _cfg(first_conv="features.0.0")}

# Data geometry added to pretrained_cfg (models.registry): not from a paper; the stride of Glimpse's data
# config default (pipeline DataConfig.stride) and a single test view.
data_cfgs = {name: {"sampling_rate": 2, "test_views": (1, 1)} for name in default_cfgs}


def _create(variant: str, **kwargs) -> nn.Module:
    cls = Conv3DNet if variant.startswith("conv3d") else FrameTCN
    kwargs.setdefault("num_frames", default_cfgs[variant]["input_size"][1])  # the cfg's T is the model's
    return build_video_model(cls, **kwargs)


@register_glimpse
def frame_tcn_tiny(pretrained: bool = False, **kwargs) -> FrameTCN:
    """Tiny frame-level baseline: 3 conv stages (32/64/128), temporal kernel 3."""
    return _create("frame_tcn_tiny", **{"widths": (32, 64, 128), **kwargs})


@register_glimpse
def frame_tcn_small(pretrained: bool = False, **kwargs) -> FrameTCN:
    """Small frame-level baseline: 4 conv stages (32/64/128/256)."""
    return _create("frame_tcn_small", **{"widths": (32, 64, 128, 256), **kwargs})


@register_glimpse
def conv3d_tiny(pretrained: bool = False, **kwargs) -> Conv3DNet:
    """Tiny early-fusion 3D CNN (16/32/64/128 channels, about 0.9M parameters)."""
    return _create("conv3d_tiny", **kwargs)
