"""One contract over every registered Glimpse model (``models.list_models()``), at reduced size.

Each family is shrunk by the kwargs in ``FAMILIES`` (the same structure: blocks, sampling stages, ATS stages
where the reduced depth has them; widths, depths, tokens, points and frames cut down). The names covered are
asserted to be exactly ``models.list_models()``: a new variant without a row here fails the first test,
nothing is skipped silently. Per name:

* forward on a batch of mixed inputs: the right shape, no NaN; ``forward_head(forward_features(x))`` equals
  ``forward(x)`` (timm contract) and ``pre_logits`` gives ``num_features``;
* backward: every trainable parameter gets a finite, non-zero gradient (a non-differentiable selection
  path would leave some at None or zero; see ``NO_GRADIENT`` for the documented exceptions);
* ``reset_classifier``: another class count changes the output width, 0 gives the pooled features;
* ``pretrained_cfg``: the data geometry the model was built for, the classifier and first conv it names;
* batch independence: a sample's logits alone equal its logits in a batch of mixed inputs (ATS pads);
* state-dict round trip through :func:`models.checkpoint.load_checkpoint`: identical logits.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import models
from models.checkpoint import load_checkpoint
from models.flops import model_input_shape
from models.trace import record
from tests.model_fixtures import perturb_zero_inits

torch.set_num_threads(1)

# name prefix -> reduced kwargs (every registered name matches exactly one prefix).
FAMILIES: dict[str, dict] = {
    "deit_": dict(img_size=64, embed_dim=32, num_heads=2, depth=5),  # 16 patches; ATS blocks 3-4 / block 3
    "psvit_": dict(img_size=32, embed_dim=32, depth=3, num_heads=2, num_points=4, num_iters=2,
                   stem_widths=(32, 32)),  # 4 x 4 points; ATS layers 1-2
    "sparseformer_": dict(img_size=32, num_latent_tokens=4, dims=(32, 64), depths=(2, 2), num_points=4,
                          num_heads=4, stem_dim=16),
    "video_sparseformer_": dict(img_size=32, num_latent_tokens=4, dims=(32, 64), depths=(2, 2), num_points=4,
                                num_heads=4, stem_dim=16, num_frames=2, inflation=2),
    "timesformer_": dict(img_size=48, num_frames=2, embed_dim=32, num_heads=2, depth=5),  # 9 positions; ATS 3-4
    "xvit_": dict(img_size=48, num_frames=2, embed_dim=32, num_heads=2, depth=5),  # ATS blocks 3-4
    "frame_tcn_": dict(num_frames=4, img_size=32),
    "conv3d_": dict(num_frames=4, img_size=32),
    "cvt_": dict(img_size=64, embed_dims=(16, 32, 32), depths=(1, 1, 3), num_heads=(1, 2, 2)),  # 4x4 grid; ATS 1-2
}
CLASSES = 5
# Evaluation views per family (the papers' K clips x S crops; images and the baselines: one view).
TEST_VIEWS = {"video_sparseformer_": (4, 3), "timesformer_": (1, 3), "xvit_": (1, 3), "frame_tcn_": (1, 1),
              "conv3d_": (1, 1), "deit_": (1, 1), "psvit_": (1, 1), "sparseformer_": (1, 1), "cvt_": (1, 1)}
# Parameters that legitimately get no gradient: none. ATS's selection is discrete (its scores run under
# no_grad), but every parameter still reaches the loss through the kept rows (ATS eq. 6) and the dropped
# tokens' keys and values.
NO_GRADIENT: dict[str, set[str]] = {  # CvT: the class token skips the conv projection (CvT section 3.2),
    # so the last block's query conv only shapes patch tokens that the class-token head never reads (as in the release)
    f"cvt_{d}_{s}": {f"stages.2.blocks.2.attn.conv_q.{p}" for p in ("conv.weight", "bn.weight", "bn.bias")}
    for d in (13, 21) for s in (224, 384)}
ATOL = 1e-4  # float32; a batch of 1 and of 4 run different kernels (and ATS pads the shorter samples)

NAMES = models.list_models()


def family(name: str) -> str:
    (prefix,) = [p for p in FAMILIES if name.startswith(p)]
    return prefix


def build(name: str, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return models.create_model(name, num_classes=CLASSES, **{**FAMILIES[family(name)], **extra})


def mixed_inputs(model: nn.Module, n: int = 4, seed: int = 1) -> torch.Tensor:
    """Inputs of different content (so ATS keeps different K' per sample and pads the batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((4, *model_input_shape(model)), generator=g)
    x[1] *= 0.1
    x[2, ..., : x.shape[-1] // 2] = 0
    x[3] = x[3].mean(dim=(-2, -1), keepdim=True)
    return x[:n]


def sharpen(model: nn.Module, factor: float = 6.0) -> nn.Module:
    """Random values in zero-initialised weights and peaky attention (q, k rows of every qkv x factor)."""
    perturb_zero_inits(model, std=0.2)
    with torch.no_grad():
        for m in model.modules():
            qkv = getattr(m, "qkv", None)
            if isinstance(qkv, nn.Linear):
                qkv.weight[: 2 * qkv.in_features].mul_(factor)
    return model


def test_every_registered_name_is_covered_once():
    assert NAMES, "no model registered"
    assert {n: len([p for p in FAMILIES if n.startswith(p)]) for n in NAMES} == {n: 1 for n in NAMES}
    assert set(TEST_VIEWS) == set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_forward_features_head_and_pre_logits(name):
    model = sharpen(build(name)).eval()
    x = mixed_inputs(model)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        head = model.forward_head(feats)
        pre = model.forward_head(feats, pre_logits=True)
    assert logits.shape == (4, CLASSES) and torch.isfinite(logits).all()
    assert torch.isfinite(feats).all() and feats.shape[0] == 4
    torch.testing.assert_close(head, logits, atol=1e-6, rtol=1e-5)  # timm: forward = head(features)
    assert pre.shape == (4, model.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_trainable_parameter(name):
    # Zero-initialised layers (TimeSformer's temporal_fc, SparseFormer's offsets / RoI deltas / mixing
    # generator, PS-ViT's offset heads) pass no gradient to what lies before them until training moves them:
    # give them values first (the family tests check the gradients at initialisation separately).
    model = sharpen(build(name)).train()
    logits = model(mixed_inputs(model))
    (logits.logsumexp(dim=-1).sum() + logits.square().mean()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    without = {n for n, p in model.named_parameters() if p.requires_grad
               and (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0)}
    assert trainable and without == NO_GRADIENT.get(name, set())


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier(name):
    model = build(name).eval()
    x = mixed_inputs(model, n=2)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (2, 3) and model.num_classes == 3
    assert model.get_classifier().out_features == 3
    model.reset_classifier(0)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x), pre_logits=True))
    assert out.shape == (2, model.num_features) and isinstance(model.get_classifier(), nn.Identity)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_is_the_geometry_built(name):
    kw = FAMILIES[family(name)]
    model = build(name)
    cfg = model.pretrained_cfg
    video = "num_frames" in kw
    size = kw["img_size"]
    assert cfg["input_size"] == ((3, kw["num_frames"], size, size) if video else (3, size, size))
    assert cfg["input_size"] == model_input_shape(model)
    assert cfg["architecture"] == name and cfg["test_views"] == TEST_VIEWS[family(name)]
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert isinstance(model.get_submodule(cfg["first_conv"]), (nn.Conv2d, nn.Conv3d))
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    if video:
        assert cfg["num_frames"] == kw["num_frames"]
        assert isinstance(cfg["sampling_rate"], int) and cfg["sampling_rate"] >= 1
    else:
        assert "num_frames" not in cfg and "sampling_rate" not in cfg


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence(name):
    model = sharpen(build(name)).eval()
    x = mixed_inputs(model)
    with torch.no_grad(), record() as trace:
        batched = model(x)
    counts = trace.kept_counts()  # (B, stages) K' of an ATS model
    if counts is not None:  # the samples keep different K': the batch really is padded
        assert (counts.amax(dim=0) > counts.amin(dim=0)).any(), counts
    with torch.no_grad():
        for i in range(x.shape[0]):
            torch.testing.assert_close(model(x[i:i + 1])[0], batched[i], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_refused_naming_the_shape(name):
    """A wrong channel count or a missing batch dimension: a ValueError that names the input's shape (not a
    convolution's RuntimeError from deep inside)."""
    model = build(name).eval()
    good = mixed_inputs(model, n=1)[:1]  # (1, C, ...)
    for bad in (good[:, :1], good[0]):  # one channel; no batch dimension
        with torch.no_grad(), pytest.raises(ValueError) as info:
            model(bad)
        assert str(tuple(bad.shape)) in str(info.value), info.value


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    model = sharpen(build(name)).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(name, seed=1).eval()
    report = load_checkpoint(fresh, torch.load(buffer, weights_only=True))
    assert not report.adapted and report.reset_classifier_keys == ()
    x = mixed_inputs(model, n=2)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
