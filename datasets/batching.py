"""Batches built inside a loader: buffers in shared memory in DataLoader workers, and the normalising stack.

A ``batch_size=None`` DataLoader does not collate, so :class:`datasets.loader.ShardDataset` stacks its
samples itself with :func:`collate_items`; video clips go through :class:`NormalizedStack`
(``VideoSpec.output="float"``), which converts, normalises and lays out a batch in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["NormalizedStack", "batch_buffer", "collate_items"]


def batch_buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch; inside a DataLoader worker it lives in shared memory.

    The worker then hands the batch to the main process without another copy. This is what
    PyTorch's ``default_collate`` does (with the same storage call); a ``batch_size=None`` loader
    does not collate, so the dataset does it here.
    """
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(tuple(shape))


class NormalizedStack:
    """Stack ``uint8 (C, T, H, W)`` clips into a normalised ``float32 (B, C, T, H, W)`` batch in one pass.

    Each clip is converted, normalised and made contiguous by a single ``addcmul`` written straight
    into its slot of the (shared-memory) batch: no intermediate uint8 batch, no second float pass.
    Equal to ``normalize(torch.stack(clips), mean, std)``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, clips: Sequence[torch.Tensor]) -> torch.Tensor:
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1, 1)
        scale, shift = 1.0 / (255.0 * std), -mean / std  # (C, 1, 1, 1): x * scale + shift
        out = batch_buffer((len(clips), *clips[0].shape), torch.float32)  # (B, C, T, H, W)
        for i, clip in enumerate(clips):
            torch.addcmul(shift, clip, scale, out=out[i])  # uint8 (any strides) -> normalised float32
        return out


def collate_items(
    items: Sequence[dict[str, Any]], stackers: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] | None = None
) -> dict[str, Any]:
    """Stack per-sample dicts into a batch: tensors stacked (or by ``stackers[key]``), ints -> long
    tensor, strings -> lists."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if stackers and key in stackers:
            batch[key] = stackers[key](values)
        elif isinstance(values[0], torch.Tensor):
            out = batch_buffer((len(values), *values[0].shape), values[0].dtype)
            batch[key] = torch.stack(values, out=out)
        elif isinstance(values[0], (int, np.integer)):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = list(values)
    return batch
