"""VideoSparseFormer: SparseFormer extended to video (Gao et al., ICLR 2024, section 3.2, Tables 5-6).

Paper: ``/work/shared/papers/sparseformer.txt``. Everything of ``models/sparseformer.py`` carries over with
one more axis:

* input ``(B, 3, T, H, W)``; the early convolution runs on every frame, giving a ``C x T x H/4 x W/4`` volume;
* RoIs become tubes ``(x, y, t, w, h, l)`` (t: temporal centre, l: temporal length, normalised to the clip);
* sampling offsets gain a temporal component, sampling is trilinear (the shared ``sample_points``), and the
  RoI adjustment moves and stretches tubes in time as well (SparseFormer eqs. 7-8 on three axes);
* token inflation: ``n_t`` copies of each of the N latent tokens, their tubes tiling the clip in time at
  initialisation (copy k covers ``[k/n_t, (k+1)/n_t]``), so the model carries ``n_t * N`` tokens.

Initialisation from an image SparseFormer (``checkpoint_filter_fn``; Glimpse or release format): token
embeddings and RoIs are replicated over the ``n_t`` segments, and the temporal rows of the offset and RoI
adjustment layers are zero, so every token samples the centre of its own segment and the inflated model
starts as a per-segment image model (with ``n_t = 1`` on a one-frame clip it reproduces the image model).

Decision (the paper is silent): a *freshly* initialised video model spreads each token's P points through
its tube in time, by a Latin square over the 6 x 6 spatial grid (every row and column of the grid visits
all six temporal positions), rather than stacking them on the segment centre. With all temporal offsets
equal, the per-token standardisation of SparseFormer eq. 3 divides by ~0 and the first update would scatter the points
at random; the inflated model accepts that because exact equivalence with the image model matters more.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from models.checkpoint import CheckpointMismatchError
from models.registry import build_video_model, register_glimpse
from models.sparseformer import SparseFormer, SparseSampler, grid_rois
from models.sparseformer import checkpoint_filter_fn as image_checkpoint_filter_fn

__all__ = ["VideoSparseFormer", "tube_rois", "temporal_offsets", "checkpoint_filter_fn"]


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------

def tube_rois(rois: Tensor, inflation: int) -> Tensor:
    """Inflate image RoIs ``(N, 4)`` (x, y, w, h) to tubes ``(n_t * N, 6)`` (x, y, t, w, h, l).

    Token ``k * N + i`` is copy k of image token i: its tube is centred at ``t = (k + 0.5) / n_t`` with length
    ``l = 1 / n_t``, so the n_t copies tile the clip in time.
    """
    if inflation < 1:
        raise ValueError(f"inflation must be >= 1, got {inflation}")
    n = rois.shape[0]
    centres = (torch.arange(inflation, dtype=rois.dtype, device=rois.device) + 0.5) / inflation  # (n_t,)
    t = centres.repeat_interleave(n)[:, None]  # (n_t*N, 1)
    length = torch.full_like(t, 1.0 / inflation)  # (n_t*N, 1)
    spatial = rois.repeat(inflation, 1)  # (n_t*N, 4)
    return torch.cat([spatial[:, :2], t, spatial[:, 2:], length], dim=1)  # (n_t*N, 6)


def temporal_offsets(num_points: int) -> Tensor:
    """``(P,)`` initial temporal offsets in [-0.5, 0.5] for a fresh video model (module doc).

    For a square P = r x r (row-major spatial grid), point (row, col) gets temporal cell ``(row + col) mod r``,
    i.e. a Latin square; otherwise point i gets cell ``i mod r``. Cells are centred: ``(cell + 0.5)/r - 0.5``.
    """
    root = math.isqrt(num_points)
    cells = root if root >= 2 else num_points
    index = torch.arange(num_points)
    cell = (index // root + index % root) % cells if root * root == num_points else index % cells
    return (cell.float() + 0.5) / cells - 0.5


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

class VideoSparseFormer(SparseFormer):
    """SparseFormer on clips ``(B, 3, T, H, W)`` with tubes and token inflation (section 3.2).

    Args (beyond ``SparseFormer``'s):
        num_frames: T the model is built for; inputs must have exactly T frames (no parameter depends on T,
            so build another instance, e.g. ``num_frames=16``, to run other clip lengths with the same weights).
        inflation: n_t copies of every latent token (Table 6).
    """

    num_axes = 3  # (x, y, t)

    def __init__(self, num_classes: int = 400, num_frames: int = 32, inflation: int = 8, **kwargs: Any) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if inflation < 1:
            raise ValueError(f"inflation must be >= 1, got {inflation}")
        # Set before the base constructor: it sizes the token parameters from total_latent_tokens.
        self.num_frames = num_frames
        self.inflation = inflation
        super().__init__(num_classes=num_classes, **kwargs)

    @property
    def total_latent_tokens(self) -> int:
        return self.num_latent_tokens * self.inflation

    def init_weights(self) -> None:
        super().init_weights()
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, SparseSampler):
                    m.offsets.bias[:, 2] = temporal_offsets(m.offsets.num_points)

    def initial_rois(self) -> Tensor:
        """``(n_t * N, 6)`` tubes: the image grid RoIs, n_t copies tiling the clip in time."""
        return tube_rois(grid_rois(self.num_latent_tokens, self.roi_size), self.inflation)

    def check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 5:
            raise ValueError(f"{name} expects clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{name} expects {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[2] != self.num_frames:
            raise ValueError(f"{name} was built for num_frames={self.num_frames}, got {x.shape[2]} frames "
                             f"(shape {tuple(x.shape)})")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is below the minimum {self.min_input_size} px")

    def extract_features(self, x: Tensor) -> Tensor:
        """Early convolution per frame: ``(B, 3, T, H, W) -> (B, C, T, H/4, W/4)``."""
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
        feats = self.stem(frames)  # (B*T, C, H/4, W/4)
        return feats.reshape(b, t, *feats.shape[1:]).transpose(1, 2)  # (B, C, T, H/4, W/4)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint adapter
# ----------------------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: VideoSparseFormer) -> dict[str, Tensor]:
    """Adapt a checkpoint to a ``VideoSparseFormer``: video checkpoints pass through; image SparseFormer
    checkpoints (Glimpse or the authors' release) are inflated (module doc).

    The image model's token count must equal the video model's ``num_latent_tokens`` (per segment). The
    classifier passes through as it is: whether one of another class count (ImageNet-1k -> Kinetics-400)
    is refused or left at the model's initialisation is the loader's rule
    (:func:`models.checkpoint.load_checkpoint`, ``classifier=``).
    """
    sd = image_checkpoint_filter_fn(state_dict, model)
    rois = sd.get("latent_rois")
    if rois is None or rois.dim() != 2:
        raise CheckpointMismatchError("checkpoint has no latent_rois (N, 4|6) tensor: not a SparseFormer checkpoint")
    if rois.shape[1] == 6:
        return sd  # already a video checkpoint
    if rois.shape[1] != 4:
        raise CheckpointMismatchError(f"latent_rois has shape {tuple(rois.shape)}; expected (N, 4) or (N, 6)")
    if rois.shape[0] != model.num_latent_tokens:
        raise CheckpointMismatchError(
            f"image checkpoint has {rois.shape[0]} latent tokens; the video model has num_latent_tokens="
            f"{model.num_latent_tokens} per segment (x inflation {model.inflation})")

    n_t = model.inflation
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "latent_rois":
            value = tube_rois(value, n_t)  # (n_t*N, 6)
        elif key == "latent_embed":
            value = value.repeat(n_t, 1)  # (n_t*N, d_f): copy k of token i at k*N + i
        elif key.endswith("sampler.offsets.proj.weight"):
            p2, d = value.shape  # rows ordered (point, axis)
            pairs = value.reshape(p2 // 2, 2, d)
            value = torch.cat([pairs, pairs.new_zeros(p2 // 2, 1, d)], dim=1).reshape(-1, d)  # (P*3, d) t rows 0
        elif key.endswith("sampler.offsets.bias"):
            value = torch.cat([value, value.new_zeros(value.shape[0], 1)], dim=1)  # (P, 3) temporal column 0
        elif key.endswith("sampler.adjust.proj.weight"):
            zero = value.new_zeros(1, value.shape[1])
            value = torch.cat([value[:2], zero, value[2:], zero], dim=0)  # (6, d): x, y, t, w, h, l
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Configs and variants
# ----------------------------------------------------------------------------------------------------------

def _cfg(**kwargs: Any) -> dict[str, Any]:
    # Video cfgs keep timm's keys (timm turns them into PretrainedCfg, which has no num_frames field);
    # input_size is (C, T, H, W); models.registry adds the data_cfgs below to ``model.pretrained_cfg``.
    return {
        "url": "", "num_classes": 400, "input_size": (3, 32, 224, 224), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv", "classifier": "head", "paper_ids": "arXiv:2304.03768", **kwargs,
    }


default_cfgs = {
    "video_sparseformer_tiny": _cfg(),
    "video_sparseformer_small": _cfg(),
    "video_sparseformer_base": _cfg(),
}

# Data geometry (section 4, Kinetics-400): "32 frames are sampled from the 128 consecutive frames with a
# stride of 4" and "a 12-view testing scheme (three 3 spatial crops and 4 temporal clips)".
data_cfgs = {name: {"sampling_rate": 4, "test_views": (4, 3)} for name in default_cfgs}


def _create_video_sparseformer(variant: str, **kwargs: Any) -> VideoSparseFormer:
    return build_video_model(VideoSparseFormer, **kwargs)


@register_glimpse
def video_sparseformer_tiny(pretrained: bool = False, **kwargs: Any) -> VideoSparseFormer:
    """VideoSparseFormer-T (Table 5): SparseFormer-T on 32 x 224^2 clips, n_t = 8; 31M params, 22 GFLOPs/view."""
    args = {"num_latent_tokens": 49, "dims": (256, 512), "depths": (4, 8), **kwargs}
    return _create_video_sparseformer("video_sparseformer_tiny", **args)


@register_glimpse
def video_sparseformer_small(pretrained: bool = False, **kwargs: Any) -> VideoSparseFormer:
    """VideoSparseFormer-S (Table 5): SparseFormer-S on 32 x 224^2 clips, n_t = 8; 48M params, 38 GFLOPs/view."""
    args = {"num_latent_tokens": 64, "dims": (320, 640), "depths": (4, 8), **kwargs}
    return _create_video_sparseformer("video_sparseformer_small", **args)


@register_glimpse
def video_sparseformer_base(pretrained: bool = False, **kwargs: Any) -> VideoSparseFormer:
    """VideoSparseFormer-B (Table 5): SparseFormer-B on 32 x 224^2 clips, n_t = 8; 81M params, 74 GFLOPs/view."""
    args = {"num_latent_tokens": 81, "dims": (384, 768), "depths": (4, 10), **kwargs}
    return _create_video_sparseformer("video_sparseformer_base", **args)
