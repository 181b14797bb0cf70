"""Frame-level video baseline: a small 2D CNN per frame, then a space-time convolution over the
per-frame feature maps.

Not from a paper: the reference point the token-efficient models are compared with, and the model
the pipeline trains before the video transformers are picked. The temporal convolution runs on
feature *maps*, not pooled vectors, so displacement between frames is visible to it: it can tell a
clip from its time reversal, which a frame average cannot (Glimpse's synthetic motion data is built
so that order matters).
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


def _cfg(**kwargs) -> dict:
    # Video models keep timm's cfg keys; input_size is (C, T, H, W) (timm has no num_frames key).
    return {"num_classes": 400, "input_size": (3, 8, 112, 112), "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "stem.0.0", "classifier": "head", **kwargs}


default_cfgs = {"frame_tcn_tiny": _cfg(), "frame_tcn_small": _cfg(input_size=(3, 16, 112, 112))}


def _create(variant: str, **kwargs) -> FrameTCN:
    return build_video_model(FrameTCN, variant, default_cfgs[variant], **kwargs)


@register_glimpse
def frame_tcn_tiny(pretrained: bool = False, **kwargs) -> FrameTCN:
    """Tiny frame-level baseline: 3 conv stages (32/64/128), temporal kernel 3."""
    return _create("frame_tcn_tiny", **{"widths": (32, 64, 128), **kwargs})


@register_glimpse
def frame_tcn_small(pretrained: bool = False, **kwargs) -> FrameTCN:
    """Small frame-level baseline: 4 conv stages (32/64/128/256)."""
    return _create("frame_tcn_small", **{"widths": (32, 64, 128, 256), **kwargs})
