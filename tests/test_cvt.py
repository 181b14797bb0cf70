"""CvT and CvT + ATS (models/cvt.py): geometry, the release's checkpoint layout and forward, paper figures,
ATS invariants (K' <= K, K as a knob, batch independence, keep-all = no ATS), timm plumbing."""

from __future__ import annotations

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import models
from models.ats import ATSBlock, MaskedBlock, set_ats_k, set_ats_mode
from models.checkpoint import load_checkpoint
from models.cvt import ATS_STAGES, ConvAttention, ConvBlock, CvT, apply_ats_to_cvt, checkpoint_filter_fn
from models.flops import average_flops, count_flops, example_input, param_count
from models.trace import record

torch.set_num_threads(1)

PLAIN = ["cvt_13_224", "cvt_13_384", "cvt_21_224", "cvt_21_384"]
ATS = [n + "_ats" for n in PLAIN]
# A reduced CvT: 64 px -> grids 16, 8, 4 (16 stage-3 tokens); stage 3 has 10 blocks, so ATS sits in 1-9.
SMALL = dict(img_size=64, embed_dims=(16, 32, 48), depths=(1, 1, 10), num_heads=(1, 2, 3), num_classes=7)


def small(name: str = "cvt_13_224", seed: int = 0, **kw) -> CvT:
    torch.manual_seed(seed)
    return models.create_model(name, **{**SMALL, **kw}).eval()


def peaky(model: CvT, factor: float = 6.0) -> CvT:
    """Sharpen stage 3's attention (q and k rows of every qkv x factor): random-init scores then vary."""
    with torch.no_grad():
        for blk in model.stages[-1].blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.in_features].mul_(factor)
    return model


def images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    if n > 2:
        x[1] *= 0.1  # different content, so ATS keeps different K' per sample and pads the batch
        x[2, ..., : size // 2] = 0
    return x


def kept(model, x):
    with torch.no_grad(), record() as trace:
        out = model(x)
    return out, trace.kept_tokens()


# ------------------------------------------------------------------------------ the release's layout


def release_shapes(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_classes=1000, in_chans=3,
                   patch_sizes=(7, 3, 3)) -> dict[str, tuple]:
    """Key -> shape of a state dict of the official release (lib/models/cls_cvt.py, written out by hand)."""
    shapes: dict[str, tuple] = {}
    prev = in_chans
    for i, (c, d, p) in enumerate(zip(embed_dims, depths, patch_sizes)):
        s = f"stage{i}."
        shapes.update({s + "patch_embed.proj.weight": (c, prev, p, p), s + "patch_embed.proj.bias": (c,),
                       s + "patch_embed.norm.weight": (c,), s + "patch_embed.norm.bias": (c,)})
        if i == len(embed_dims) - 1:
            shapes[s + "cls_token"] = (1, 1, c)
        for j in range(d):
            b = f"{s}blocks.{j}."
            for n in ("norm1", "norm2"):
                shapes.update({b + n + ".weight": (c,), b + n + ".bias": (c,)})
            for n in "qkv":
                cp = f"{b}attn.conv_proj_{n}."
                shapes.update({cp + "conv.weight": (c, 1, 3, 3), cp + "bn.weight": (c,), cp + "bn.bias": (c,),
                               cp + "bn.running_mean": (c,), cp + "bn.running_var": (c,),
                               cp + "bn.num_batches_tracked": (),
                               f"{b}attn.proj_{n}.weight": (c, c), f"{b}attn.proj_{n}.bias": (c,)})
            shapes.update({b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
                           b + "mlp.fc1.weight": (4 * c, c), b + "mlp.fc1.bias": (4 * c,),
                           b + "mlp.fc2.weight": (c, 4 * c), b + "mlp.fc2.bias": (c,)})
        prev = c
    shapes.update({"norm.weight": (prev,), "norm.bias": (prev,), "head.weight": (num_classes, prev),
                   "head.bias": (num_classes,)})
    return shapes


def release_state_dict(seed: int = 0, **layout) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in release_shapes(**layout).items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var") or k.endswith("norm.weight") or k.endswith("norm1.weight") \
                or k.endswith("norm2.weight") or k.endswith("bn.weight"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            sd[k] = 0.3 * torch.randn(shape, generator=g)
    return sd


def release_forward(sd: dict, x: torch.Tensor, depths, num_heads, strides=(4, 2, 2),
                    paddings=(2, 1, 1)) -> torch.Tensor:
    """The release's forward, from its state dict: scale dim ** -0.5, QuickGELU, class token only in stage 3."""
    def ln(t, key):
        return F.layer_norm(t, t.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps=1e-5)

    for i, d in enumerate(depths):
        s = f"stage{i}."
        x = F.conv2d(x, sd[s + "patch_embed.proj.weight"], sd[s + "patch_embed.proj.bias"], strides[i], paddings[i])
        B, C, H, W = x.shape
        t = ln(x.flatten(2).transpose(1, 2), s + "patch_embed.norm")
        cls = s + "cls_token" in sd
        if cls:
            t = torch.cat([sd[s + "cls_token"].expand(B, -1, -1), t], dim=1)
        for j in range(d):
            b = f"{s}blocks.{j}."
            y = ln(t, b + "norm1")
            prefix, fmap = y[:, : int(cls)], y[:, int(cls):].transpose(1, 2).reshape(B, C, H, W)
            qkv = []
            for n, stride in (("q", 1), ("k", 2), ("v", 2)):
                cp = f"{b}attn.conv_proj_{n}."
                z = F.conv2d(fmap, sd[cp + "conv.weight"], None, stride, 1, groups=C)
                z = F.batch_norm(z, sd[cp + "bn.running_mean"], sd[cp + "bn.running_var"], sd[cp + "bn.weight"],
                                 sd[cp + "bn.bias"], training=False, eps=1e-5)
                z = torch.cat([prefix, z.flatten(2).transpose(1, 2)], dim=1)
                z = F.linear(z, sd[f"{b}attn.proj_{n}.weight"], sd[f"{b}attn.proj_{n}.bias"])
                qkv.append(z)
            nh = num_heads[i]
            q, k, v = (z.reshape(B, z.shape[1], nh, C // nh).transpose(1, 2) for z in qkv)
            a = ((q @ k.transpose(-2, -1)) * C ** -0.5).softmax(-1)  # the release's scale: dim, not head_dim
            o = (a @ v).transpose(1, 2).reshape(B, -1, C)
            t = t + F.linear(o, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
            h = F.linear(ln(t, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])
            t = t + F.linear(h * torch.sigmoid(1.702 * h), sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = t[:, int(cls):].transpose(1, 2).reshape(B, C, H, W)
    return F.linear(ln(t[:, 0], "norm"), sd["head.weight"], sd["head.bias"])


# ----------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", PLAIN + ATS)
def test_registered_variants_have_the_papers_structure(name):
    model = models.create_model(name)
    depths = (1, 2, 10) if "_13_" in name else (1, 4, 16)
    assert [len(s.blocks) for s in model.stages] == list(depths)
    assert [s.patch_embed.proj.out_channels for s in model.stages] == [64, 192, 384]
    assert [s.cls_token is not None for s in model.stages] == [False, False, True]  # class token: stage 3 only
    size = 384 if "384" in name else 224
    assert model.pretrained_cfg["input_size"] == (3, size, size)
    assert model.pretrained_cfg["crop_pct"] == (0.875 if size == 224 else 1.0)
    assert all(isinstance(b, ConvBlock) for s in model.stages[:2] for b in s.blocks)
    kinds = [type(b) for b in model.stages[2].blocks]
    if name in PLAIN:
        assert kinds == [ConvBlock] * depths[2]
    else:  # ATS appendix E.2: linear q/k/v in stage 3, ATS in its blocks 1-9, the rest mask-aware
        assert kinds == [Block] + [ATSBlock] * 9 + [MaskedBlock] * (depths[2] - 10)
        assert not any(isinstance(m, ConvAttention) for m in model.stages[2].modules())
    assert not any("pos_embed" in k for k in model.state_dict())  # CvT has no position embedding
    assert name in models.list_models()


def test_token_grids_and_feature_shapes():
    model = models.create_model("cvt_13_224").eval()
    x = torch.randn(1, 3, 224, 224)
    grids, tokens = [], x
    with torch.no_grad():
        for stage in model.stages[:-1]:
            t, mask, grid = stage(tokens)
            grids.append(grid)
            tokens = t.transpose(1, 2).reshape(1, t.shape[-1], *grid)
        t, mask, grid = model.stages[-1](tokens)
        grids.append(grid)
        feats = model.forward_features(x)
        logits = model(x)
    assert grids == [(56, 56), (28, 28), (14, 14)] and mask is None
    assert t.shape == feats.shape == (1, 1 + 196, 384) and logits.shape == (1, 1000)
    # no position embedding: any input size works (a 96 px image gives a 6 x 6 stage-3 grid)
    small_model = small()
    with torch.no_grad():
        assert small_model.forward_features(torch.randn(2, 3, 96, 96)).shape == (2, 1 + 36, 48)


def test_squeezed_keys_and_values():
    attn = ConvAttention(8, 2, num_prefix_tokens=1).eval()
    x = torch.randn(2, 1 + 49, 8)
    seen = {}
    for n in ("conv_q", "conv_k", "conv_v"):
        getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape))
    assert attn(x, (7, 7)).shape == (2, 50, 8)
    assert seen == {"conv_q": (2, 8, 7, 7), "conv_k": (2, 8, 4, 4), "conv_v": (2, 8, 4, 4)}  # 7x7 -> 4x4 at stride 2


def test_bad_inputs_and_arguments_name_the_value():
    model = small()
    with pytest.raises(ValueError, match=r"\(2, 1, 64, 64\)"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match="one value per stage"):
        CvT(embed_dims=(16, 32), depths=(1, 1, 1))
    with pytest.raises(ValueError, match="ATS needs linear"):
        apply_ats_to_cvt(small())
    with pytest.raises(ValueError, match="global_pool"):
        CvT(global_pool="max")


# -------------------------------------------------------------------------------- release checkpoints


def test_release_layout_loads_and_reproduces_the_release_forward(tmp_path):
    layout = dict(embed_dims=SMALL["embed_dims"], depths=(1, 1, 2), num_classes=7)
    sd = release_state_dict(**layout)
    model = small(depths=(1, 1, 2))
    report = load_checkpoint(model, sd)
    assert report.adapted and report.reset_classifier_keys == ()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), release_forward(sd, x, layout["depths"], SMALL["num_heads"]), atol=1e-4, rtol=1e-4)
    # the same through timm's own loader (the adapter hook installed by the builder)
    path = tmp_path / "cvt_release.pth"
    torch.save(sd, path)
    again = timm.create_model("cvt_13_224", checkpoint_path=str(path), **{**SMALL, "depths": (1, 1, 2)}).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_release_layout_into_ats_drops_stage3_conv_projection_and_keep_all_is_the_linear_model():
    layout = dict(embed_dims=SMALL["embed_dims"], depths=SMALL["depths"], num_classes=7)
    sd = release_state_dict(**layout)
    ats = small("cvt_13_224_ats")
    load_checkpoint(ats, sd)  # strict after the filter: stage 3's conv_proj_* are dropped (E.2), the rest fits
    linear = small("cvt_13_224", linear_projection_stages=(2,))
    load_checkpoint(linear, sd)
    assert ats.state_dict().keys() == linear.state_dict().keys()
    dropped = set(checkpoint_filter_fn(sd, small())) - set(checkpoint_filter_fn(sd, ats))
    assert dropped and all(k.startswith("stages.2.blocks.") and ".attn.conv_" in k for k in dropped)
    x = images(3)
    set_ats_k(ats, keep_all=True)  # the whole ATS path with nothing dropped = the plain linear model
    with torch.no_grad():
        torch.testing.assert_close(ats(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,layout", [("cvt_13_224", dict(depths=(1, 2, 10))),
                                         ("cvt_21_224", dict(depths=(1, 4, 16)))])
def test_parameters_equal_the_release_layout_and_the_paper(name, layout):
    model = models.create_model(name)
    release = sum(torch.Size(s).numel() for k, s in release_shapes(**layout).items()
                  if "running_" not in k and "num_batches" not in k)
    assert param_count(model) == release  # the release's exact count: 19.997M / 31.623M
    assert round(param_count(model) / 1e6) == {"cvt_13_224": 20, "cvt_21_224": 32}[name]  # CvT Table 2: 20M / 32M
    if name == "cvt_13_224":
        assert abs(param_count(model) / 1e6 - 20.0) / 20.0 < 0.01
    assert param_count(models.create_model(name + "_ats")) < param_count(model)  # ATS drops stage-3 convs


# ------------------------------------------------------------------------------------ paper figures

PAPER_GFLOPS = {"cvt_13_224": 4.5, "cvt_21_224": 7.1, "cvt_13_384": 16.3, "cvt_21_384": 24.9}


@pytest.mark.parametrize("name", PLAIN)
def test_gflops_within_3_percent_of_the_paper(name):
    model = models.create_model(name)
    report = count_flops(model, example_input(model))
    assert abs(report.gflops - PAPER_GFLOPS[name]) / PAPER_GFLOPS[name] < 0.03, report.gflops


def test_ats_upper_bound_is_the_linear_model_and_average_is_below_it():
    plain = models.create_model("cvt_13_224")
    linear = models.create_model("cvt_13_224", linear_projection_stages=(2,))
    ats = models.create_model("cvt_13_224_ats")
    x = example_input(ats)
    g_plain, g_linear, g_ats = (count_flops(m, x).gflops for m in (plain, linear, ats))
    assert g_linear > g_plain  # full-length keys in stage 3 cost more than the squeezed ones
    assert g_linear <= g_ats < 1.01 * g_linear  # K' = K = N at the upper bound; ATS's own work is < 1%
    set_ats_k(ats, ratio=0.5)
    g_half = count_flops(ats, x).gflops
    assert g_half < g_ats
    avg = average_flops(peaky(ats.eval()), [images(2, size=224)])
    assert avg <= g_half + 1e-9


# ----------------------------------------------------------------------------------- ATS invariants


def test_ats_keeps_at_most_k_tokens_in_stage3_blocks_1_to_9():
    model = peaky(small("cvt_13_224_ats", ats_k=12))
    x = images(4)
    _, records = kept(model, x)
    assert [r.stage for r in records] == list(ATS_STAGES)
    assert all(r.grid == (4, 4) for r in records)  # positions index stage 3's token grid
    prev = torch.full((4,), 16)
    for r in records:
        counts = r.counts
        assert (counts <= 12).all() and (counts <= prev).all() and (counts >= 1).all()
        prev = counts
    assert len(set(prev.tolist())) > 1  # samples keep different K': the batch is padded


def test_k_is_an_inference_time_knob():
    model = peaky(small("cvt_13_224_ats"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(4)
    _, full = kept(model, x)
    set_ats_k(model, k=4)
    _, few = kept(model, x)
    assert all((r.counts <= 4).all() for r in few)
    assert sum(int(r.counts.sum()) for r in few) < sum(int(r.counts.sum()) for r in full)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_ats_is_batch_independent():
    model = peaky(small("cvt_21_224_ats", depths=(1, 1, 12), ats_ratio=0.7))
    x = images(4)
    with torch.no_grad():
        batched = model(x)
        for i in range(4):
            torch.testing.assert_close(model(x[i:i + 1])[0], batched[i], atol=1e-4, rtol=1e-4)
        feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats), batched, atol=1e-6, rtol=1e-5)


def test_static_mode_gives_the_dynamic_logits_and_runs_on_meta():
    model = peaky(small("cvt_13_224_ats", ats_ratio=0.6))
    x = images(4)
    with torch.no_grad():
        dynamic = model(x)
        set_ats_mode(model, "static")
        torch.testing.assert_close(model(x), dynamic, atol=1e-5, rtol=1e-5)
    with torch.device("meta"):
        meta = models.create_model("cvt_21_224_ats", ats_mode="static")
        assert meta(torch.empty(2, 3, 224, 224)).shape == (2, 1000)
    meta.reset_classifier(3)
    assert meta.head.weight.device.type == "meta"


def test_our_cvt_checkpoint_initialises_cvt_ats():
    plain = small("cvt_13_224", seed=3)
    ats = small("cvt_13_224_ats", seed=4)
    report = load_checkpoint(ats, plain.state_dict())  # ATS appendix E.2: fine-tune from CvT weights
    assert report.adapted
    shared = set(ats.state_dict()) & set(plain.state_dict())
    assert shared == set(ats.state_dict())
    assert all(torch.equal(ats.state_dict()[k], plain.state_dict()[k]) for k in shared)


# ------------------------------------------------------------------------------------------ timm plumbing


def test_no_weight_decay_group_matcher_and_timm_optimizer():
    model = small("cvt_13_224_ats")
    assert model.no_weight_decay() == {"stages.2.cls_token"}
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1.5e-6, weight_decay=0.05, layer_decay=0.9)
    grouped = sum(len(g["params"]) for g in opt.param_groups)
    assert grouped == len(list(model.parameters()))
    model.set_grad_checkpointing(True)
    model.train()
    model(images(2)).sum().backward()  # checkpointed blocks still reach every stage's parameters
    assert all(p.grad is not None for p in model.stages[0].parameters())
