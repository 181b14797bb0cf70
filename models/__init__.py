"""Glimpse model zoo: token-efficient vision transformers for images and video.

Every architecture registers its named variants with timm, so both
``models.create_model("sparseformer_tiny")`` and ``timm.create_model("sparseformer_tiny")``
work once this package is imported. Imports torch / timm / fvcore only.

What a forward kept and where it sampled is read through :mod:`models.trace`
(``with models.trace.record() as trace: model(x)``); checkpoints load through
:func:`models.checkpoint.load_checkpoint`.
"""

# Importing a family module registers its variants with timm (one file per family).
from models import (  # noqa: F401
    ats_vit,
    baseline,
    cvt,
    evit,
    psvit,
    sparseformer,
    timesformer,
    tome,
    trace,
    video_sparseformer,
    xvit,
)
from models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
