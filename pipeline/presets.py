"""Named presets per job: one level of overrides on the ExperimentConfig defaults.

``smoke`` checks the whole path in about a minute on a laptop CPU, ``demo`` trains something that
learns in a few minutes, the rest are the papers' settings for GPU clusters (give ``data.train=`` /
``data.val=`` shard sources and ``cluster.storage_path=`` a shared path).

Clip length, crop size, mean/std and test views are the model's (its ``pretrained_cfg``, filled in by
:func:`pipeline.context.finalize`): a preset sizes the model, and the data follows. A preset sets a data
value only where it departs from the model's (e.g. a stride for short synthetic clips).
"""

from __future__ import annotations

from typing import Any

# ----------------------------------------------------------------------------------------- video

# Glimpse's synthetic clips: 32x32 px, short; motion classes come in mirror pairs (left/right,
# clockwise/counter-clockwise), so no flips.
_SYNTH_GEOMETRY = {"img_size": 32, "num_frames": 8}
_SYNTH_VIDEO = {"kind": "video", "stride": 2, "train_short_side_min": 32, "train_short_side_max": 40,
                "eval_short_side": 32, "loader_workers": 1, "hflip": 0.0}

# VideoSparseFormer-T shrunk for CPU demos (suggested by its implementation: ~1.3M parameters).
_SMALL_VSF = {**_SYNTH_GEOMETRY, "inflation": 4, "num_latent_tokens": 16, "dims": [64, 128], "depths": [4, 2],
              "num_heads": 8, "num_points": 16, "stem_dim": 32}

# The smoke and demo runs' data, training and evaluation, shared by VideoSparseFormer and its baselines.
_SMOKE_RUN = {
    "data": {**_SYNTH_VIDEO, "synthetic": "smoke", "loader_workers": 0},
    "train": {"epochs": 2, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 0.5, "log_every": 2, "val_every": 0},
    "eval": {"views": "2x1", "batch_size": 8},
    "cluster": {"num_workers": 1},
}
_DEMO_RUN = {
    "data": {**_SYNTH_VIDEO, "synthetic": "demo", "train_short_side_max": 36},
    "eval": {"views": "2x3", "batch_size": 32},
    "cluster": {"num_workers": 2},
}
_DEMO_TRAIN = {"batch_size": 8, "warmup_epochs": 1, "log_every": 10, "label_smoothing": 0.0}

# The papers' Kinetics-400 runs: decoded at 256-320 px, 8 GPU workers with 8 loader processes each.
_K400_DATA = {"kind": "video", "synthetic": "", "train_short_side_min": 256, "train_short_side_max": 320,
              "eval_short_side": 224, "loader_workers": 8, "shuffle_buffer": 1000}
_GPU_CLUSTER = {"num_workers": 8, "use_gpu": "true", "cpus_per_worker": 8, "max_failures": 3}


def _k400_sgd(model: str, epochs: int, lr: float, warmup: float, **data: Any) -> dict[str, Any]:
    """ATS on TimeSformer / XViT (ATS paper, Table 6): SGD as the backbones' papers, logits averaged over
    the model's 1x3 test views as the official TimeSformer and XViT test code does."""
    return {"model": {"name": model}, "data": {**_K400_DATA, **data},
            "train": {"epochs": epochs, "batch_size": 8, "optimizer": "sgd", "lr": lr, "weight_decay": 1e-4,
                      "warmup_epochs": warmup, "label_smoothing": 0.0, "checkpoint_every": 1000, "log_every": 50},
            "eval": {"batch_size": 8, "aggregate": "logit"}, "cluster": _GPU_CLUSTER}


KINETICS_PRESETS: dict[str, dict[str, Any]] = {
    # A small VideoSparseFormer (latent tokens sampling the clip through RoI tubes): the whole path
    # (data, Ray Train, checkpoints, evaluation, registry) in about a minute.
    "smoke": {**_SMOKE_RUN, "model": {"name": "video_sparseformer_tiny", "kwargs": _SMALL_VSF},
              "tracking": {"register": "glimpse-kinetics-smoke"}},
    # The same small VideoSparseFormer learns the synthetic motion classes (chance 1/8) in a few
    # minutes on 2 CPU cores (README).
    # lr 1e-3: top-1 0.91-0.96 across seeds in a plain loop, where 2e-3 gave 0.78-0.93.
    "demo": {**_DEMO_RUN, "model": {"name": "video_sparseformer_tiny", "kwargs": _SMALL_VSF},
             "train": {**_DEMO_TRAIN, "epochs": 8, "lr": 1e-3, "val_every": 4},
             "tracking": {"register": "glimpse-kinetics-demo"}},
    # Baselines on the same data: a frame-level model (smoke) and an early-fusion 3D CNN (demo).
    "baseline_smoke": {**_SMOKE_RUN, "model": {"name": "frame_tcn_tiny",
                                               "kwargs": {**_SYNTH_GEOMETRY, "widths": [8, 16]}}},
    "conv3d_demo": {**_DEMO_RUN, "model": {"name": "conv3d_tiny", "kwargs": _SYNTH_GEOMETRY},
                    "train": {**_DEMO_TRAIN, "epochs": 6, "lr": 3e-3, "val_every": 3}},
    # TimeSformer + ATS at toy size, beside the paper preset below.
    "timesformer_ats_demo": {
        "model": {"name": "timesformer_base_ats", "kwargs": {"img_size": 64, "num_frames": 8, "depth": 4,
                                                             "embed_dim": 96, "num_heads": 3, "ats_stages": [1, 2]}},
        "data": {**_SYNTH_VIDEO, "synthetic": "demo", "train_short_side_min": 64, "train_short_side_max": 72,
                 "eval_short_side": 64},
        "train": {"epochs": 8, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 1, "log_every": 10, "val_every": 4},
        "eval": {"views": "1x3", "batch_size": 16},
        "cluster": {"num_workers": 2},
    },
    # SparseFormer paper, Kinetics-400: 32 frames at stride 4, 4x3 views at test (the model's cfg).
    "video_sparseformer_tiny_k400": {
        "model": {"name": "video_sparseformer_tiny", "kwargs": {"inflation": 8}},
        "data": _K400_DATA,
        "train": {"epochs": 50, "batch_size": 8, "lr": 2e-4, "weight_decay": 0.05, "warmup_epochs": 5,
                  "label_smoothing": 0.1, "clip_grad": 1.0, "checkpoint_every": 1000, "log_every": 50},
        "eval": {"batch_size": 8},
        "cluster": _GPU_CLUSTER,
    },
    # 8 frames at stride 32 (the model's cfg).
    "timesformer_ats_k400": _k400_sgd("timesformer_base_ats", epochs=15, lr=5e-3, warmup=0),
    # 16 frames at stride 4 (the ATS paper's XViT setting, denser than the model cfg's 16).
    "xvit_ats_k400": _k400_sgd("xvit_16_ats", epochs=18, lr=5e-2, warmup=1, stride=4),
}

# ----------------------------------------------------------------------------------------- images

_SYNTH_IMAGE = {"kind": "image", "crop_pct": 1.0, "auto_augment": "", "loader_workers": 1}
_TINY_VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4, "depth": 4}}
# CvT-13 + ATS shrunk for CPU: 32 px at strides 2 -> grids 16, 8, 4 (16 stage-3 tokens), ATS in blocks 1-2.
_TINY_CVT_ATS = {"name": "cvt_13_224_ats", "ats_ratio": 0.5,
                 "kwargs": {"img_size": 32, "embed_dims": [16, 32, 48], "depths": [1, 1, 3], "num_heads": [1, 2, 3],
                            "patch_strides": [2, 2, 2]}}


def _in1k(model: dict[str, Any], epochs: int, lr: float, warmup: float, mixup: float = 0.8) -> dict[str, Any]:
    """ImageNet-1k with the DeiT recipe (AdamW, mixup 0.8 / cutmix 1.0), 224 px as the model's cfg."""
    return {"model": model, "data": {"kind": "image", "synthetic": "", "loader_workers": 8, "shuffle_buffer": 5000},
            "train": {"epochs": epochs, "batch_size": 128, "lr": lr, "weight_decay": 0.05, "warmup_epochs": warmup,
                      "mixup": mixup, "cutmix": 1.0, "checkpoint_every": 2000, "log_every": 100},
            "cluster": _GPU_CLUSTER}


# ATS appendix E.2: AdamW, lr 1.5e-6, batch 128, 30 epochs, cosine (train's only schedule); the rest as CvT's
# recipe (stochastic depth 0.1 in stage 3). The checkpoint (the official CvT release's or ours) is given with
# model.pretrained=FILE. min_lr under lr: at the default 1e-5 the cosine would rise from 1.5e-6.
_CVT_13_ATS = _in1k({"name": "cvt_13_224_ats", "drop_path_rate": 0.1}, epochs=30, lr=1.5e-6, warmup=0)

IMAGENET_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": {**_TINY_VIT, "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64,
                                          "num_heads": 2}},
        "data": {**_SYNTH_IMAGE, "synthetic": "smoke", "loader_workers": 0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "warmup_epochs": 0.5, "log_every": 2, "val_every": 0},
        "eval": {"batch_size": 32},
        "cluster": {"num_workers": 1},
        "tracking": {"register": "glimpse-imagenet-smoke"},
    },
    "demo": {
        "model": _TINY_VIT,
        "data": {**_SYNTH_IMAGE, "synthetic": "demo"},
        "train": {"epochs": 10, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 1, "log_every": 5, "val_every": 5,
                  "mixup": 0.2, "cutmix": 0.0},
        "eval": {"batch_size": 64},
        "cluster": {"num_workers": 2},
        "tracking": {"register": "glimpse-imagenet-demo"},
    },
    # The smoke run with a tiny CvT + ATS (ATS appendix E.2's layout: linear q/k/v and ATS in stage 3).
    "cvt_ats_smoke": {
        "model": _TINY_CVT_ATS,
        "data": {**_SYNTH_IMAGE, "synthetic": "smoke", "loader_workers": 0},
        "train": {"epochs": 3, "batch_size": 16, "lr": 2e-3, "warmup_epochs": 0.5, "log_every": 2, "val_every": 0},
        "eval": {"batch_size": 32},
        "cluster": {"num_workers": 1},
    },
    # DeiT-S + ATS fine-tuning (ATS paper: from a DeiT-S checkpoint, multi-stage 3-11).
    "deit_small_ats_in1k": _in1k({"name": "deit_small_ats"}, epochs=30, lr=5e-5, warmup=0),
    # PS-ViT-B/14 (PS-ViT paper: 300 epochs, AdamW, DeiT recipe).
    "psvit_b_14_in1k": _in1k({"name": "psvit_b_14", "drop_path_rate": 0.1}, epochs=300, lr=1e-3, warmup=5),
    # SparseFormer-T (SparseFormer paper: 300 epochs, AdamW, DeiT-style augmentation).
    "sparseformer_tiny_in1k": _in1k({"name": "sparseformer_tiny", "drop_path_rate": 0.2}, epochs=300, lr=1e-3,
                                    warmup=20),
    # CvT-13 + ATS fine-tuning from a CvT-13 checkpoint (ATS appendix E.2), model.pretrained=FILE.
    "cvt_13_ats_in1k": {**_CVT_13_ATS, "train": {**_CVT_13_ATS["train"], "min_lr": 1.5e-8}},
}

# ----------------------------------------------------------------------------------------- evaluation

# The model each training preset registers, with the views its data allows ("" = the model's config).
EVAL_PRESETS: dict[str, dict[str, dict[str, str]]] = {
    "kinetics": {"smoke": {"model": "models:/glimpse-kinetics-smoke@candidate", "views": "2x1"},
                 "demo": {"model": "models:/glimpse-kinetics-demo@candidate", "views": "2x3"},
                 "k400": {"model": "", "views": ""}},
    "imagenet": {"smoke": {"model": "models:/glimpse-imagenet-smoke@candidate", "views": "1x1"},
                 "demo": {"model": "models:/glimpse-imagenet-demo@candidate", "views": "1x1"},
                 "in1k": {"model": "", "views": "1x1"}},
}
