"""The one checkpoint loader (models/checkpoint.py) and every path that uses it: ``load_checkpoint``'s
classifier rule and report, in-memory and file sources, containers, ``weights_only``; the family filters
(keys only, never the classifier); ``models.create_model(checkpoint_path=)``; and ``timm.create_model(...,
checkpoint_path=)``, whose strict ``load_state_dict`` adapts foreign dicts through the builder's hook."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import resample_abs_pos_embed

import models
from models import timesformer, video_sparseformer, xvit
from models.checkpoint import CheckpointMismatchError, LoadReport, load_checkpoint
from tests.model_fixtures import VIDEO_VIT_SMALL, vit_file

torch.set_num_threads(1)

DEIT = dict(img_size=64, embed_dim=64, num_heads=4, depth=4)


def test_a_timm_vit_file_loads_through_timms_factory_into_ats_models(tmp_path):
    vit, path = vit_file(tmp_path, depth=6)  # 64 px ViT-B/16 (reduced), 1000 classes, plain state dict
    ref = vit.state_dict()
    # DeiT-S + ATS at 96 px: the adapter (timm's ViT filter) resizes the 4x4 position grid to 6x6
    deit = timm.create_model("deit_small_ats", **{**DEIT, "img_size": 96, "depth": 6}, checkpoint_path=str(path))
    want = resample_abs_pos_embed(ref["pos_embed"], [6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(deit.pos_embed.detach(), want)
    assert torch.equal(deit.blocks[4].attn.qkv.weight, ref["blocks.4.attn.qkv.weight"])
    # TimeSformer + ATS: ViT -> TimeSformer inflation (temporal attention from the spatial one, temporal_fc 0)
    ts = timm.create_model("timesformer_base_ats", **VIDEO_VIT_SMALL, num_classes=1000, checkpoint_path=str(path))
    assert torch.equal(ts.blocks[3].temporal_attn.qkv.weight, ref["blocks.3.attn.qkv.weight"])
    assert not ts.blocks[3].temporal_fc.weight.any() and torch.equal(ts.head.weight, ref["head.weight"])
    same = models.create_model("timesformer_base_ats", **VIDEO_VIT_SMALL, num_classes=1000, checkpoint_path=str(path))
    x = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ts.eval()(x), same.eval()(x))  # both factories give the same model
    # timm's own path keeps timm's classifier rule: strict (a 400-class model refuses the 1000-class head)
    with pytest.raises(RuntimeError, match="head.weight"):
        timm.create_model("timesformer_base_ats", **VIDEO_VIT_SMALL, checkpoint_path=str(path))


def test_classifier_strict_and_reset(tmp_path):
    _, path = vit_file(tmp_path)
    model = models.create_model("timesformer_base", **{**VIDEO_VIT_SMALL, "depth": 2})  # 400 classes
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight: checkpoint \(1000, 64\) vs model \(400, 64\)"):
        load_checkpoint(model, path)
    head = model.head.weight.detach().clone()
    report = load_checkpoint(model, path, classifier="reset")
    assert report == LoadReport(source=str(path), adapted=True, reset_classifier_keys=("head.bias", "head.weight"))
    assert torch.equal(model.head.weight, head)  # left at its initialisation
    with pytest.raises(ValueError, match="'strict' or 'reset'"):
        load_checkpoint(model, path, classifier="drop")
    # reset concerns the classifier only: a backbone that does not fit is refused, naming the keys
    _, deeper = vit_file(tmp_path, depth=3)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys.*blocks\.2\."):
        load_checkpoint(model, deeper, classifier="reset")


def test_a_model_without_classifier_drops_the_checkpoints(tmp_path):
    _, path = vit_file(tmp_path)
    model = models.create_model("timesformer_base", **{**VIDEO_VIT_SMALL, "depth": 2}, num_classes=0)
    report = load_checkpoint(model, path, classifier="reset")
    assert report.reset_classifier_keys == ("head.bias", "head.weight") and "head.weight" not in model.state_dict()


def test_create_model_checkpoint_path_initialises_with_classifier_reset(tmp_path):
    _, path = vit_file(tmp_path, depth=6)
    model = models.create_model("xvit_8_ats", **VIDEO_VIT_SMALL, checkpoint_path=str(path))
    fresh = models.create_model("xvit_8_ats", **VIDEO_VIT_SMALL)
    assert model.head.weight.shape == (400, 64)  # the ViT's ImageNet head has no X-ViT counterpart
    assert torch.equal(model.blocks[5].attn.qkv.weight, vit_file(tmp_path, depth=6)[0].blocks[5].attn.qkv.weight)
    assert fresh.head.weight.shape == model.head.weight.shape


def test_sources_containers_and_ema(tmp_path):
    model = models.create_model("deit_small_ats", **DEIT).eval()
    sd = model.state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    for source in ({"model": sd}, {f"module.{k}": v for k, v in sd.items()}, {"state_dict": sd, "epoch": 3}):
        target = models.create_model("deit_small_ats", **DEIT)
        assert load_checkpoint(target, source) == LoadReport("<state dict>", adapted=False)
        assert all(torch.equal(target.state_dict()[k], v) for k, v in sd.items())
    torch.save({"state_dict": sd, "state_dict_ema": other}, tmp_path / "both.pth")
    target = models.create_model("deit_small_ats", **DEIT)
    load_checkpoint(target, tmp_path / "both.pth")
    assert torch.equal(target.cls_token, sd["cls_token"])
    load_checkpoint(target, tmp_path / "both.pth", prefer_ema=True)
    assert torch.equal(target.cls_token, other["cls_token"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(target, tmp_path / "nope.pth")


class _Payload:
    """Not a tensor: weights_only=True refuses to rebuild it."""


def test_files_are_read_with_weights_only(tmp_path):
    torch.save({"model": _Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(models.create_model("deit_small_ats", **DEIT), tmp_path / "unsafe.pth")


def test_family_filters_remap_keys_and_leave_the_classifier_to_the_loader(tmp_path):
    vit, _ = vit_file(tmp_path)
    sd = vit.state_dict()  # 1000-class head
    small = {**VIDEO_VIT_SMALL, "depth": 2}
    ts = timesformer.checkpoint_filter_fn(sd, models.create_model("timesformer_base", **small))
    assert torch.equal(ts["head.weight"], sd["head.weight"])  # passed through, mismatch and all
    xv = xvit.checkpoint_filter_fn(sd, models.create_model("xvit_8", **small))
    assert "head.weight" not in xv and "time_embed" in xv  # the ViT's head has no X-ViT counterpart
    image = models.create_model("sparseformer_tiny", img_size=64, num_latent_tokens=4, dims=(32, 64), depths=(2, 1),
                                num_points=4, num_heads=4, num_classes=1000)
    video = models.create_model("video_sparseformer_tiny", img_size=64, num_latent_tokens=4, dims=(32, 64),
                                depths=(2, 1), num_points=4, num_heads=4, num_frames=2, inflation=2)
    inflated = video_sparseformer.checkpoint_filter_fn(image.state_dict(), video)
    assert inflated["head.weight"].shape == (1000, 64) and inflated["latent_rois"].shape == (8, 6)


def test_the_load_hook_leaves_partial_and_fitting_dicts_alone():
    model = models.create_model("timesformer_base", **{**VIDEO_VIT_SMALL, "depth": 2})
    with torch.no_grad():
        model.blocks[0].temporal_fc.weight.fill_(0.5)  # "trained" temporal branch
    head = {"head.weight": torch.ones(400, 64), "head.bias": torch.zeros(400)}
    model.load_state_dict(head, strict=False)  # a partial load: not mistaken for an image ViT to inflate
    assert (model.blocks[0].temporal_fc.weight == 0.5).all() and (model.head.weight == 1).all()
    own = model.state_dict()
    model.load_state_dict(own)  # its own dict: as it is
    assert (model.blocks[0].temporal_fc.weight == 0.5).all()
