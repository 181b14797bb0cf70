"""What TimeSformer and XViT share through models/video_vit_common.py, tested once for both: ATS across time
(batch independence with positions shared by the clip, gradients through the kept rows) and the ViT
checkpoints that do not fit either model."""

from __future__ import annotations

import pytest
import torch

from models.ats import set_ats_k
from models.checkpoint import CheckpointMismatchError, load_checkpoint
from tests.model_fixtures import clips, kept_tokens, peaky, small_video_vit, vit_file

torch.set_num_threads(1)

# name, a block after the first ATS stage (its qkv must get a gradient), what a narrower ViT's mismatch names
FAMILIES = [("timesformer_base_ats", 3, "patch_embed.proj.weight"), ("xvit_8_ats", 4, "pos_embed|patch_embed")]


@pytest.mark.parametrize("name", [f[0] for f in FAMILIES])
def test_batch_independence(name):
    m = peaky(small_video_vit(name)).eval()
    set_ats_k(m, 6)
    x = clips()
    with torch.no_grad():
        batched, traces = kept_tokens(m, x)
        counts = torch.stack([tr.counts for tr in traces], 1)  # (B, stages)
        positions = [tr.kept_positions for tr in traces]
        assert len({tuple(c) for c in counts.tolist()}) > 1, "clips should keep different K' (padding exercised)"
        for i in range(x.shape[0]):
            alone, traces = kept_tokens(m, x[i:i + 1])
            assert torch.allclose(alone, batched[i:i + 1], atol=1e-4)
            assert [tr.kept_positions[0].tolist() for tr in traces] == [p[i].tolist() for p in positions]


@pytest.mark.parametrize("name, block, _", FAMILIES)
def test_gradients_flow_through_kept_rows(name, block, _):
    m = peaky(small_video_vit(name)).train()
    set_ats_k(m, 5)
    m(clips(2)).logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert m.blocks[block].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, _, narrower", FAMILIES)
def test_checkpoints_that_do_not_fit_are_refused(name, _, narrower, tmp_path):
    plain = name.removesuffix("_ats")
    _, deeper = vit_file(tmp_path, depth=3)
    with pytest.raises(CheckpointMismatchError, match="blocks.2"):
        load_checkpoint(small_video_vit(plain, depth=2), deeper, classifier="reset")
    _, wider = vit_file(tmp_path, embed_dim=32)
    with pytest.raises(CheckpointMismatchError, match=narrower):
        load_checkpoint(small_video_vit(plain, depth=2), wider, classifier="reset")
