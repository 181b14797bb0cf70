"""Weight initialisation shared by the transformers here (timm's ViT scheme)."""

from __future__ import annotations

import torch.nn as nn
from timm.layers import trunc_normal_


def init_linear_and_norm_(module: nn.Module, std: float = 0.02) -> None:
    """Every ``nn.Linear`` in ``module``: weight trunc-normal(``std``), bias zero; every ``nn.LayerNorm``:
    weight one, bias zero. Modules are visited in ``module.modules()`` order, so a seed gives the same
    weights wherever this is called."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
