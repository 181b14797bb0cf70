"""Glimpse model zoo: token-efficient vision transformers for images and video.

Every architecture registers its named variants with timm, so both
``models.create_model("sparseformer_tiny")`` and ``timm.create_model("sparseformer_tiny")``
work once this package is imported. Imports torch / timm / fvcore only.
"""

from models.registry import create_model, list_models

# Importing a family module registers its variants with timm (one file per family).
# family modules (each helper adds one line)
from models import baseline  # noqa: E402,F401
from models import psvit  # noqa: E402,F401

__all__ = ["create_model", "list_models"]
