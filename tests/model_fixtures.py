"""Small models and inputs shared by the model tests (reduced sizes: the same structure, seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn

import models
from models.checkpoint import load_checkpoint
from models.trace import record

# ------------------------------------------------------------------------------------- video transformers

# 64 px frames -> 4 x 4 = 16 positions, 3 frames, 64 channels, 6 blocks (ATS variants: blocks 3-5).
VIDEO_VIT_SMALL = {"img_size": 64, "num_frames": 3, "embed_dim": 64, "num_heads": 4, "depth": 6}
T, S, D = 3, 16, 64


def small_video_vit(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A reduced TimeSformer / XViT variant (seeded)."""
    torch.manual_seed(seed)
    return models.create_model(name, **{**VIDEO_VIT_SMALL, **kwargs})


def peaky(model: nn.Module, factor: float = 8.0) -> nn.Module:
    """Sharpen every block's attention (qkv weights x ``factor``): random-init scores then vary, so K' < K
    and varies per clip."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(factor)
    return model


def clips(n: int = 4, seed: int = 1) -> torch.Tensor:
    """Clips of different content (so ATS keeps different K' per clip)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, T, 64, 64, generator=g)
    x[1] *= 0.1
    x[2, :, :, :32] = 0
    x[3] = x[3].mean(dim=(2, 3), keepdim=True)
    return x[:n]


def vit_file(tmp_path: Path, depth: int = 2, embed_dim: int = 64, img_size: int = 64, seed: int = 0,
             **kwargs) -> tuple[nn.Module, Path]:
    """A timm ViT-B/16 (reduced) with non-trivial weights, saved as a plain state-dict file."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", depth=depth, embed_dim=embed_dim, num_heads=4,
                            img_size=img_size, **kwargs).eval()
    with torch.no_grad():
        vit.pos_embed.normal_(std=0.5)
        vit.cls_token.normal_(std=0.5)
    path = tmp_path / f"vit_d{depth}_e{embed_dim}_i{img_size}.pth"
    torch.save(vit.state_dict(), path)
    return vit, path


def loaded(model: nn.Module, path: Path, classifier: str = "reset") -> nn.Module:
    """``model`` after ``load_checkpoint``; ``reset`` by default: an ImageNet ViT's 1000-class head fits neither
    a 400-class TimeSformer nor X-ViT (whose head has no ViT counterpart at all)."""
    load_checkpoint(model, path, classifier=classifier)
    return model


def kept_tokens(model: nn.Module, x: torch.Tensor, method: str = "forward"):
    """``model.<method>(x)`` and the :class:`models.trace.KeptTokens` records of that forward."""
    with record() as trace:
        out = getattr(model, method)(x)
    return out, trace.kept_tokens()


# ------------------------------------------------------------------------------------------- SparseFormer

# A reduced SparseFormer: same structure, small widths.
SPARSEFORMER_SMALL = dict(img_size=64, num_latent_tokens=9, dims=(32, 64), depths=(3, 2), num_points=9, num_heads=4,
                          num_classes=7)


def perturb_zero_inits(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Give every zero-initialised weight matrix a small random value (so every path carries gradient)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, std)
    return model
