"""Named presets per job: one level of overrides on the ExperimentConfig defaults.

``smoke`` checks the whole path in under two minutes on a laptop CPU, ``demo`` trains something
that learns in a few minutes, the rest are the papers' settings for GPU clusters (give
``data.train=`` / ``data.val=`` shard sources and ``cluster.storage_path=`` a shared path).
"""

from __future__ import annotations

from typing import Any

# Synthetic motion classes come in mirror pairs (left/right, clockwise/counter-clockwise): no flips.
_SYNTH_VIDEO = {"kind": "video", "num_frames": 8, "stride": 2, "crop_size": 56, "train_short_side_min": 56,
                "train_short_side_max": 72, "eval_short_side": 56, "loader_workers": 1, "hflip": 0.0}

# VideoSparseFormer-T shrunk for CPU demos (suggested by its implementation: ~1.3M parameters).
_SMALL_VSF = {"img_size": 32, "num_frames": 8, "inflation": 4, "num_latent_tokens": 16, "dims": [64, 128],
              "depths": [4, 2], "num_heads": 8, "num_points": 16, "stem_dim": 32}

# The 32x32 synthetic clips of the smoke and demo runs, and their training / evaluation settings,
# shared by the VideoSparseFormer presets and the baselines beside them.
_SMOKE_RUN = {
    "data": {**_SYNTH_VIDEO, "synthetic": "smoke", "crop_size": 32, "train_short_side_min": 32,
             "train_short_side_max": 40, "eval_short_side": 32, "loader_workers": 0},
    "train": {"epochs": 2, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 0.5, "log_every": 2, "val_every": 0},
    "eval": {"views": "2x1", "batch_size": 8},
    "cluster": {"num_workers": 1},
}
_DEMO_RUN = {
    "data": {**_SYNTH_VIDEO, "synthetic": "demo", "crop_size": 32, "train_short_side_min": 32,
             "train_short_side_max": 36, "eval_short_side": 32},
    "eval": {"views": "2x3", "batch_size": 32},
    "cluster": {"num_workers": 2},
}

KINETICS_PRESETS: dict[str, dict[str, Any]] = {
    # A small VideoSparseFormer (latent tokens sampling the clip through RoI tubes): the whole path
    # (data, Ray Train, checkpoints, evaluation, registry) in about a minute.
    "smoke": {
        **_SMOKE_RUN,
        "model": {"name": "video_sparseformer_tiny", "kwargs": _SMALL_VSF},
        "tracking": {"register": "glimpse-kinetics-smoke"},
    },
    # The same small VideoSparseFormer learns the synthetic motion classes (chance 1/8) in a few
    # minutes on 2 CPU cores: top-1 0.94 over 2x3 views after 8 epochs (README).
    "demo": {
        **_DEMO_RUN,
        "model": {"name": "video_sparseformer_tiny", "kwargs": _SMALL_VSF},
        "train": {"epochs": 8, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 1, "log_every": 10, "val_every": 4,
                  "label_smoothing": 0.0},
        "tracking": {"register": "glimpse-kinetics-demo"},
    },
    # Baselines on the same data: a frame-level model (smoke) and an early-fusion 3D CNN (demo).
    "baseline_smoke": {
        **_SMOKE_RUN,
        "model": {"name": "frame_tcn_tiny", "kwargs": {"widths": [8, 16]}},
    },
    "conv3d_demo": {
        **_DEMO_RUN,
        "model": {"name": "conv3d_tiny"},
        "train": {"epochs": 6, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 1, "log_every": 10, "val_every": 3,
                  "label_smoothing": 0.0},
    },
    # TimeSformer + ATS at toy size, beside the paper preset below.
    "timesformer_ats_demo": {
        "model": {"name": "timesformer_base_ats", "kwargs": {"img_size": 64, "num_frames": 8, "depth": 4,
                                                             "embed_dim": 96, "num_heads": 3, "ats_stages": [1, 2]}},
        "data": {**_SYNTH_VIDEO, "synthetic": "demo", "crop_size": 64, "train_short_side_min": 64,
                 "train_short_side_max": 72, "eval_short_side": 64},
        "train": {"epochs": 8, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 1, "log_every": 10, "val_every": 4},
        "eval": {"views": "1x3", "batch_size": 16},
        "cluster": {"num_workers": 2},
    },
    # SparseFormer paper, Kinetics-400: 32 frames at stride 4, 4x3 views at test; 8 GPU workers.
    "video_sparseformer_tiny_k400": {
        "model": {"name": "video_sparseformer_tiny", "kwargs": {"inflation": 8}},
        "data": {"kind": "video", "synthetic": "", "num_frames": 32, "stride": 4, "crop_size": 224,
                 "train_short_side_min": 256, "train_short_side_max": 320, "eval_short_side": 224,
                 "loader_workers": 8, "shuffle_buffer": 1000},
        "train": {"epochs": 50, "batch_size": 8, "lr": 2e-4, "weight_decay": 0.05, "warmup_epochs": 5,
                  "label_smoothing": 0.1, "clip_grad": 1.0, "checkpoint_every": 1000, "log_every": 50},
        "eval": {"views": "4x3", "batch_size": 8},
        "cluster": {"num_workers": 8, "use_gpu": "true", "cpus_per_worker": 8, "max_failures": 3},
    },
    # TimeSformer + ATS (ATS paper, Table 6): 8 frames at stride 32, 1x3 views, SGD as in TimeSformer.
    "timesformer_ats_k400": {
        "model": {"name": "timesformer_base_ats"},
        "data": {"kind": "video", "synthetic": "", "num_frames": 8, "stride": 32, "crop_size": 224,
                 "train_short_side_min": 256, "train_short_side_max": 320, "eval_short_side": 224,
                 "loader_workers": 8, "shuffle_buffer": 1000},
        "train": {"epochs": 15, "batch_size": 8, "optimizer": "sgd", "lr": 5e-3, "weight_decay": 1e-4,
                  "warmup_epochs": 0, "label_smoothing": 0.0, "checkpoint_every": 1000, "log_every": 50},
        "eval": {"views": "1x3", "batch_size": 8, "aggregate": "logit"},
        "cluster": {"num_workers": 8, "use_gpu": "true", "cpus_per_worker": 8, "max_failures": 3},
    },
    "xvit_ats_k400": {
        "model": {"name": "xvit_16_ats"},
        "data": {"kind": "video", "synthetic": "", "num_frames": 16, "stride": 4, "crop_size": 224,
                 "train_short_side_min": 256, "train_short_side_max": 320, "eval_short_side": 224,
                 "loader_workers": 8, "shuffle_buffer": 1000},
        "train": {"epochs": 18, "batch_size": 8, "optimizer": "sgd", "lr": 5e-2, "weight_decay": 1e-4,
                  "warmup_epochs": 1, "label_smoothing": 0.0, "checkpoint_every": 1000, "log_every": 50},
        "eval": {"views": "1x3", "batch_size": 8, "aggregate": "logit"},
        "cluster": {"num_workers": 8, "use_gpu": "true", "cpus_per_worker": 8, "max_failures": 3},
    },
}

_SYNTH_IMAGE = {"kind": "image", "image_size": 32, "crop_pct": 1.0, "auto_augment": "", "loader_workers": 1}
_TINY_VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4, "depth": 4}}

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
    # DeiT-S + ATS fine-tuning (ATS paper: from a DeiT-S checkpoint, multi-stage 3-11).
    "deit_small_ats_in1k": {
        "model": {"name": "deit_small_ats"},
        "data": {"kind": "image", "synthetic": "", "image_size": 224, "loader_workers": 8, "shuffle_buffer": 5000},
        "train": {"epochs": 30, "batch_size": 128, "lr": 5e-5, "weight_decay": 0.05, "warmup_epochs": 0,
                  "mixup": 0.8, "cutmix": 1.0, "checkpoint_every": 2000, "log_every": 100},
        "cluster": {"num_workers": 8, "use_gpu": "true", "cpus_per_worker": 8, "max_failures": 3},
    },
    # PS-ViT-B/14 (PS-ViT paper: 300 epochs, AdamW, DeiT recipe).
    "psvit_b_14_in1k": {
        "model": {"name": "psvit_b_14", "drop_path_rate": 0.1},
        "data": {"kind": "image", "synthetic": "", "image_size": 224, "loader_workers": 8, "shuffle_buffer": 5000},
        "train": {"epochs": 300, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 5,
                  "mixup": 0.8, "cutmix": 1.0, "checkpoint_every": 2000, "log_every": 100},
        "cluster": {"num_workers": 8, "use_gpu": "true", "cpus_per_worker": 8, "max_failures": 3},
    },
    # SparseFormer-T (SparseFormer paper: 300 epochs, AdamW, DeiT-style augmentation).
    "sparseformer_tiny_in1k": {
        "model": {"name": "sparseformer_tiny", "drop_path_rate": 0.2},
        "data": {"kind": "image", "synthetic": "", "image_size": 224, "loader_workers": 8, "shuffle_buffer": 5000},
        "train": {"epochs": 300, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 20,
                  "mixup": 0.8, "cutmix": 1.0, "checkpoint_every": 2000, "log_every": 100},
        "cluster": {"num_workers": 8, "use_gpu": "true", "cpus_per_worker": 8, "max_failures": 3},
    },
}
