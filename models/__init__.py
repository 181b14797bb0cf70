"""Glimpse model zoo: token-efficient vision transformers for images and video.

Every architecture registers its named variants with timm, so both
``models.create_model("sparseformer_tiny")`` and ``timm.create_model("sparseformer_tiny")``
work once this package is imported. Imports torch / timm / fvcore only.
"""

# Importing a family module registers its variants with timm (one file per family).
# family modules (each helper adds one line)
from models import (  # noqa: E402,F401  # noqa: E402,F401
    ats_vit,  # noqa: F401
    baseline,  # noqa: E402,F401
    psvit,  # noqa: E402,F401
    sparseformer,
    timesformer,
    video_sparseformer,
    xvit,
)
from models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
