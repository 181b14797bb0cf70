"""Named sweeps for ``jobs/tune_*.py``: a training preset, fixed overrides, and a search space.

A sweep preset is a plain mapping with the keys a sweep YAML file takes (see ``pipeline.sweep.space``):

* ``base``: the training preset the trials start from (``pipeline.presets``);
* ``overrides``: dotted ``key=value`` settings applied to every trial;
* ``space``: dotted config key -> ``{grid|choice: [...]}`` or ``{uniform|loguniform: [lo, hi]}``; the
  inference-time knobs ``model.ats_ratio`` / ``model.ats_k`` (ATS's K), ``model.tome_r`` and
  ``model.evit_keep_rate`` (``pipeline.knobs``; a grid) are evaluated on every trained model without retraining;
* ``num_samples``, ``max_concurrent``, ``asha`` (``grace_period``, ``reduction_factor``);
* ``needs_model``: a K-only sweep over an existing model (``--model URI``): evaluation only.

The three axes the papers vary have presets: ATS's K by per-stage ratio rho or explicit K lists (ATS
Figs. 3-5), VideoSparseFormer's token inflation n_t (SparseFormer Table 6), and fine-tuning epochs from
a checkpoint (ATS Fig. 5b).
"""

from __future__ import annotations

from typing import Any

# The tiny ATS ViT used on CPU: 64 patches of 4x4 px, 4 blocks (ATS stage at block 3).
_TINY_ATS = ["model.name=deit_tiny_ats", "model.kwargs={img_size: 32, patch_size: 4, depth: 4, embed_dim: 64, "
             "num_heads: 2}"]

_RATIOS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # rho per stage (ATS Fig. 3/4)
_DEIT_S_K = [48, 78, 108, 197]  # single-stage DeiT-S K (ATS appendix E.1); 197 = every token


def _evaluation_only(base: str, knob: str, grid: list[Any]) -> dict[str, Any]:
    """A sweep of one inference-time knob over an existing model (``--model`` required): no training."""
    return {"base": base, "needs_model": True, "space": {knob: {"grid": grid}}}


IMAGENET_SWEEPS: dict[str, dict[str, Any]] = {
    # Two learning rates x two K ratios on the tiny ATS ViT: 2 trainings, 4 evaluated points.
    "smoke": {
        "base": "smoke",
        "overrides": [*_TINY_ATS, "train.epochs=2", "train.val_every=1"],
        "space": {"train.lr": {"grid": [1e-3, 3e-3]}, "model.ats_ratio": {"grid": [0.5, 1.0]}},
        "num_samples": 1, "asha": {"grace_period": 1, "reduction_factor": 2},
    },
    # Eight log-uniform learning rates with ASHA, each model evaluated at four K ratios.
    "demo": {
        "base": "demo",
        "overrides": [*_TINY_ATS, "train.epochs=8", "train.val_every=1", "train.mixup=0.0"],
        "space": {"train.lr": {"loguniform": [3e-4, 1e-2]}, "train.weight_decay": {"choice": [0.0, 0.05]},
                  "model.ats_ratio": {"grid": [0.25, 0.5, 0.75, 1.0]}},
        "num_samples": 8, "asha": {"grace_period": 2, "reduction_factor": 2},
    },
    # Evaluation only: per-stage ratio rho swept over an existing model (ATS Fig. 3/4); --model required.
    "ats_ratio": _evaluation_only("deit_small_ats_in1k", "model.ats_ratio", _RATIOS),
    # Evaluation only: explicit K per stage (single-stage DeiT-S K = 48 / 78 / 108, ATS appendix E.1); --model required.
    "ats_k": _evaluation_only("deit_small_ats_in1k", "model.ats_k", _DEIT_S_K),
    # ATS Fig. 5b: fine-tuning epochs from a DeiT-S checkpoint (model.pretrained=FILE), each evaluated at every K.
    "finetune_epochs": {
        "base": "deit_small_ats_in1k",
        "space": {"train.epochs": {"grid": [1, 5, 10, 30]}, "model.ats_ratio": {"grid": [0.4, 0.6, 0.8, 1.0]}},
    },
    # CvT-13 + ATS (ATS Table 1, appendix E.2), evaluation only: rho / K in stage 3's ATS blocks; --model required.
    "cvt_ats_ratio": _evaluation_only("cvt_13_ats_in1k", "model.ats_ratio", _RATIOS),
    # Stage 3 has 1 + 196 tokens at 224 px, as DeiT-S: the same K counts apply.
    "cvt_ats_k": _evaluation_only("cvt_13_ats_in1k", "model.ats_k", _DEIT_S_K),
    # The rivals at matched cost (issue 13), evaluation only over a trained *_tome / *_evit model (--model):
    # ToMe's r per block (ToMe Fig. 4: r = 0 .. 16 on DeiT-S) and EViT's keep rate (EViT Table 1: 0.5 .. 1.0).
    "tome_r": _evaluation_only("deit_small_ats_in1k", "model.tome_r", [0, 4, 8, 13, 16]),
    "evit_keep_rate": _evaluation_only("deit_small_ats_in1k", "model.evit_keep_rate", [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]),
    "lr": {
        "base": "deit_small_ats_in1k",
        "space": {"train.lr": {"loguniform": [1e-5, 3e-4]}, "train.weight_decay": {"uniform": [0.0, 0.1]}},
        "num_samples": 16, "asha": {"grace_period": 3, "reduction_factor": 3},
    },
}

KINETICS_SWEEPS: dict[str, dict[str, Any]] = {
    # Two learning rates on the smoke video task; ASHA after one epoch of two (a check: < 2 min).
    "smoke": {
        "base": "smoke",
        "overrides": ["train.epochs=2", "train.val_every=1"],
        "space": {"train.lr": {"grid": [1e-3, 1e-2]}},
        "num_samples": 1, "asha": {"grace_period": 1, "reduction_factor": 2},
    },
    "demo": {
        "base": "demo",
        "overrides": ["train.val_every=2", "cluster.num_workers=1"],
        "space": {"train.lr": {"loguniform": [1e-3, 1e-2]}, "model.kwargs.inflation": {"choice": [1, 2, 4]}},
        "num_samples": 6, "asha": {"grace_period": 4, "reduction_factor": 2},
    },
    # SparseFormer Table 6: token inflation n_t of VideoSparseFormer-T on Kinetics-400.
    "inflation": {
        "base": "video_sparseformer_tiny_k400",
        "space": {"model.kwargs.inflation": {"grid": [1, 2, 4, 8]}},
    },
    # ATS on TimeSformer (ATS Table 6 / Fig. A.1): K per clip swept over an existing model; --model required.
    "timesformer_ats_k": {
        "base": "timesformer_ats_k400", "needs_model": True,
        "space": {"model.ats_ratio": {"grid": [0.3, 0.5, 0.7, 1.0]}},
    },
    "timesformer_finetune_epochs": {
        "base": "timesformer_ats_k400",
        "space": {"train.epochs": {"grid": [1, 3, 5]}, "model.ats_ratio": {"grid": [0.3, 0.5, 0.7, 1.0]}},
    },
}
