"""Static-shape ATS (``ats_mode="static"``, models/ats.py): exactly 1 + K slots per stage with repeats and
padding masked, the same logits as dynamic mode for every ATS family, no host sync (a dispatch-level count,
``torch.compile(fullgraph=True)``, ``torch.export`` with a dynamic batch, meta tensors), no token copies when
nothing is dropped, a CUDA check (``gpu``) and timm's own model tests (``slow``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import warnings

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models import ats, video_vit_common
from models.ats import MaskedBlock, ats_stages, inverse_transform_sample, set_ats_k, set_ats_mode
from tests.model_fixtures import clips, kept_tokens, peaky, small_video_vit

torch.set_num_threads(1)

# A small DeiT: 64 px, patch 8 -> 64 patches, 6 blocks. ``stages`` / K settings per case below.
DEIT = dict(img_size=64, patch_size=8, embed_dim=64, num_heads=4, depth=6)
TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=3)  # 16 patches: compile / export
PSVIT = dict(img_size=64, num_points=6, depth=4, embed_dim=64, num_heads=4, stem_widths=(32, 64), stem_mid_chs=16)
VIDEO = ("timesformer_base_ats", "xvit_8_ats")
TOL = dict(atol=1e-5, rtol=1e-5)


def sharpen(model, factor: float = 8.0):
    """Peaky attention on every block (random weights score tokens nearly uniformly: K' ~ K otherwise)."""
    with torch.no_grad():
        for blk in model.blocks:
            dim = blk.attn.qkv.weight.shape[1]
            blk.attn.qkv.weight[: 2 * dim].mul_(factor)  # q and k rows
    return model


def deit(name="deit_small_ats", seed=0, size=DEIT, **kw):
    torch.manual_seed(seed)
    return sharpen(models.create_model(name, **size, **kw)).eval()


def images(n=6, size=64, seed=0):
    """Images of different content, so that samples keep different K' (dynamic mode pads)."""
    x = torch.randn(max(n, 4), 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[1] *= 0.05
    x[2, :, : size // 2] = 0
    x[3] = x[3].mean(dim=(1, 2), keepdim=True)
    return x[:n]


def both_modes(model, x):
    """Logits and KeptTokens of a dynamic and a static forward of the same model (mode switched back)."""
    with torch.no_grad():
        set_ats_mode(model, "dynamic")
        dyn = kept_tokens(model, x)
        set_ats_mode(model, "static")
        sta = kept_tokens(model, x)
        set_ats_mode(model, "dynamic")
    return dyn, sta


def assert_same_picks(dyn_kept, sta_kept, static_slots):
    """Both modes keep the same tokens per sample and stage; static mode has exactly its K slots."""
    assert len(dyn_kept) == len(sta_kept) == len(static_slots)
    for d, s, k in zip(dyn_kept, sta_kept, static_slots):
        assert s.positions.shape[1] == k
        assert [p.tolist() for p in d.kept_positions] == [p.tolist() for p in s.kept_positions]


class SyncCounter(TorchDispatchMode):
    """Counts the ops that read a device value on the host (``.item()``, ``bool(t)``, ``nonzero``)."""

    SYNCS = ("_local_scalar_dense", "nonzero", "item")

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------------
# Sampling layout (ATS eqs. 4-5)
# --------------------------------------------------------------------------------------------------

def test_static_slots_hold_the_fixed_points_picks_with_repeats_masked():
    # uniform scores over M = 6: CDF k/6; K = 2 -> y = 1/4, 3/4 -> tokens 1, 4; K = 4 -> 1/8, 3/8, 5/8, 7/8 -> 0, 2, 3, 5
    scores = torch.ones(2, 6)
    kept, valid = inverse_transform_sample(scores, torch.tensor([2, 4]), slots=4)
    assert kept.tolist() == [[1, 4, 4, 4], [0, 2, 3, 5]]  # points past a sample's own K repeat its last one
    assert valid.tolist() == [[True, True, False, False], [True] * 4]
    # one dominant token: every fixed point lands in it, one valid slot
    peak = torch.tensor([[0.01, 0.9, 0.01, 0.08, 0.0, 0.0]])
    kept, valid = inverse_transform_sample(peak, 4, slots=4)
    assert kept.tolist() == [[1, 1, 1, 1]] and valid.tolist() == [[True, False, False, False]]
    dyn_kept, dyn_valid = inverse_transform_sample(peak, 4)
    assert dyn_kept.shape == (1, 1) and dyn_kept.tolist() == [[1]]  # dynamic trims to K'max = 1


def test_slots_covering_every_candidate_keep_them_in_place_in_both_modes():
    # K = M = 6; the peaky row picks tokens 1 and 2 (fixed points (2i-1)/12 against CDF .01 .91 .92 1 1 1)
    scores = torch.tensor([[0.01, 0.9, 0.01, 0.08, 0.0, 0.0], [1.0] * 6])
    for slots in (6, None):
        kept, valid = inverse_transform_sample(scores, 6, slots=slots)
        assert kept.tolist() == [list(range(6))] * 2  # in place: nothing to gather
        assert valid.tolist() == [[False, True, True, False, False, False], [True] * 6]


def test_static_and_dynamic_pick_the_same_tokens_on_random_padded_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        scores = torch.rand(5, 40, generator=g) ** 6
        mask = torch.rand(5, 40, generator=g) > 0.3
        mask[:, 0] = True
        k = torch.randint(1, 30, (5,), generator=g)
        d_kept, d_valid = inverse_transform_sample(scores, k, mask)
        s_kept, s_valid = inverse_transform_sample(scores, k, mask, slots=30)
        assert s_kept.shape == (5, 30)
        for b in range(5):
            assert d_kept[b][d_valid[b]].tolist() == s_kept[b][s_valid[b]].tolist()


# --------------------------------------------------------------------------------------------------
# Same logits in both modes, every ATS family
# --------------------------------------------------------------------------------------------------

IMAGE_CASES = {
    "multi_stage_rho1": dict(ats_stages=(1, 2, 3, 4, 5)),  # K = N - 1: in-place slots, repeats masked
    "k10_three_stages": dict(ats_stages=(1, 2, 4), ats_k=10),
    "ratio_avg_pool": dict(ats_stages=(1, 3), ats_ratio=0.5, global_pool="avg"),
}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_ats_static_logits_equal_dynamic(case, fused):
    m = deit(**IMAGE_CASES[case])
    for s in ats_stages(m):
        s.fused_attn = fused
    x = images()
    (dyn, dyn_kept), (sta, sta_kept) = both_modes(m, x)
    torch.testing.assert_close(sta, dyn, **TOL)
    slots, n = [], 1 + 64
    for s in ats_stages(m):
        slots.append(s.static_slots(n))
        n = 1 + slots[-1]
    assert_same_picks(dyn_kept, sta_kept, slots)
    assert any(len(set(k.counts.tolist())) > 1 for k in dyn_kept), "samples should keep different K' (padding)"
    assert any((k.counts < k.positions.shape[1]).any() for k in sta_kept), "static mode should mask repeats"


def test_registered_single_stage_variant_static_equals_dynamic():
    m = deit("deit_small_ats_k48")  # K = 48 of 64 patches at this size
    (dyn, dyn_kept), (sta, sta_kept) = both_modes(m, images())
    torch.testing.assert_close(sta, dyn, **TOL)
    assert_same_picks(dyn_kept, sta_kept, [48])


@pytest.mark.parametrize("name", VIDEO)
@pytest.mark.parametrize("k", [None, 6, 4])
def test_video_ats_static_logits_equal_dynamic(name, k):
    m = peaky(small_video_vit(name)).eval()
    if k is not None:
        set_ats_k(m, k)
    (dyn, dyn_kept), (sta, sta_kept) = both_modes(m, clips())
    torch.testing.assert_close(sta, dyn, **TOL)
    assert_same_picks(dyn_kept, sta_kept, [16 if k is None else k] * len(dyn_kept))
    assert any(len(set(t.counts.tolist())) > 1 for t in dyn_kept), "clips should keep different K'"


@pytest.mark.parametrize("k", [None, 12])
def test_psvit_ats_static_logits_equal_dynamic(k):
    torch.manual_seed(0)
    m = sharpen(models.create_model("psvit_b_14_ats", **PSVIT, ats_k=k)).eval()
    (dyn, dyn_kept), (sta, sta_kept) = both_modes(m, images(4))
    torch.testing.assert_close(sta, dyn, **TOL)
    assert_same_picks(dyn_kept, sta_kept, [36 if k is None else 12] * 3)  # 36 sampled tokens, layers 1-3


# --------------------------------------------------------------------------------------------------
# The knob: a constructor keyword on every family, an inference-time setter
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw", [("deit_small_ats", DEIT), ("psvit_b_14_ats", PSVIT),
                                      ("timesformer_base_ats", {}), ("xvit_8_ats", {})])
def test_ats_mode_is_a_constructor_keyword_and_an_inference_time_knob(name, kw):
    build = (lambda **a: small_video_vit(name, **a)) if not kw else (lambda **a: models.create_model(name, **kw, **a))
    m = build(ats_mode="static")
    samplers = ats_stages(m)
    assert samplers and all(s.ats_mode == "static" for s in samplers)
    assert "mode=static" in repr(m)
    assert set_ats_mode(m, "dynamic") is m and all(s.ats_mode == "dynamic" for s in samplers)
    assert build().state_dict().keys() == m.state_dict().keys()  # same weights
    with pytest.raises(ValueError, match="'fixed'"):
        set_ats_mode(m, "fixed")
    with pytest.raises(ValueError, match="'fixed'"):
        build(ats_mode="fixed")


def test_set_ats_mode_refuses_a_model_without_ats():
    with pytest.raises(ValueError, match="no ATS stage"):
        set_ats_mode(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1), "static")


# --------------------------------------------------------------------------------------------------
# No host sync: dispatch-level count, torch.compile(fullgraph=True), torch.export, meta tensors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deit_small_ats", "psvit_b_14_ats", *VIDEO])
def test_static_forward_reads_nothing_back_to_the_host(name):
    if name in VIDEO:
        m, x = peaky(small_video_vit(name, ats_k=6)).eval(), clips()
    elif name == "deit_small_ats":
        m, x = deit(ats_stages=(1, 2, 4), ats_k=10), images()
    else:
        torch.manual_seed(0)
        m, x = sharpen(models.create_model(name, **PSVIT, ats_k=12)).eval(), images(4)
    with torch.no_grad():
        with SyncCounter() as dynamic:
            m(x)
        set_ats_mode(m, "static")
        with SyncCounter() as static:
            m(x)
    assert dynamic.calls, "the counter should see dynamic mode's syncs"
    assert static.calls == []


def test_compile_fullgraph_captures_static_mode_only():
    m = deit(size=TINY, ats_stages=(1, 2), ats_k=6, ats_mode="static")
    x = images(3, size=32)
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, fullgraph=True, backend="eager")(x)  # dynamo capture: any graph break raises
        torch.testing.assert_close(out, ref, **TOL)
        set_ats_mode(m, "dynamic")
        torch._dynamo.reset()
        with pytest.raises(Exception, match="(?i)data.dependent|item|graph break|unsupported"):
            torch.compile(m, fullgraph=True, backend="eager")(x)


@pytest.mark.parametrize("name", VIDEO)
def test_compile_fullgraph_captures_static_video_ats(name):
    m = peaky(small_video_vit(name, ats_k=5, ats_mode="static", depth=4)).eval()
    x = clips(2)
    with torch.no_grad():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(m, fullgraph=True, backend="eager")(x), m(x), **TOL)


@pytest.mark.slow
def test_inductor_compiled_static_ats_matches_eager():
    m = deit(size=TINY, ats_stages=(1, 2), ats_k=6, ats_mode="static")
    x = images(3, size=32)
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True)
        torch.testing.assert_close(compiled(x), m(x), atol=1e-4, rtol=1e-4)


def test_export_with_a_dynamic_batch_runs_any_batch():
    m = deit(size=TINY, ats_stages=(1, 2), ats_k=6, ats_mode="static")
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(m, (images(4, size=32),), dynamic_shapes={"x": {0: batch}})
    for n in (1, 3, 9):
        x = images(n, size=32, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), m(x), **TOL)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("name, kw", [("deit_small_ats", {}), ("deit_small_ats_k48", {}), ("psvit_b_14_ats", {}),
                                      ("timesformer_base_ats", dict(depth=6)), ("xvit_8_ats", dict(depth=5))])
def test_models_build_and_run_on_the_meta_device(name, kw, mode):
    # a meta forward runs static shapes in either mode: there are no values to trim by
    with torch.device("meta"):
        m = models.create_model(name, ats_mode=mode, **kw).eval()
        assert all(p.is_meta for p in m.parameters())
        x = torch.randn(2, *m.pretrained_cfg["input_size"])
        out = m(x)
    assert out.is_meta and out.shape == (2, m.num_classes)
    feats = m.forward_features(x)
    assert feats.is_meta and m.forward_head(feats).shape == (2, m.num_classes)


# --------------------------------------------------------------------------------------------------
# Nothing dropped: no token copies, no mask
# --------------------------------------------------------------------------------------------------

def _no_gather(*args, **kwargs):
    raise AssertionError("tokens were gathered although every slot is kept")


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_keep_all_copies_no_tokens_and_later_blocks_see_no_mask(mode, monkeypatch):
    m = deit(ats_stages=(1, 2, 4), ats_mode=mode)
    x = images(3)
    with torch.no_grad():
        expected = m(x)
        set_ats_k(m, keep_all=True)
        reference = m(x)  # keep_all is the plain network
        masks = []
        for blk in m.blocks:
            if isinstance(blk, MaskedBlock):
                blk.register_forward_pre_hook(lambda mod, args: masks.append(args[1]))
        monkeypatch.setattr(ats, "select_tokens", _no_gather)
        torch.testing.assert_close(m(x), reference)
    assert masks and all(mk is None for mk in masks)
    assert not torch.equal(expected, reference)  # (sampling with K = N does drop tokens: a real difference)


def test_static_stage_with_k_n_minus_1_keeps_tokens_in_place(monkeypatch):
    m = deit(ats_stages=(1, 2, 3, 4, 5), ats_mode="static")  # rho = 1: K = N - 1 at every stage
    x = images(3)
    monkeypatch.setattr(ats, "select_tokens", _no_gather)
    with torch.no_grad():
        _, kept = kept_tokens(m, x)
    assert all(k.positions.shape == (3, 64) and (k.counts < 64).any() for k in kept)


@pytest.mark.parametrize("name", VIDEO)
def test_video_keep_all_gathers_nothing(name, monkeypatch):
    m = peaky(small_video_vit(name)).eval()
    x = clips(2)
    set_ats_k(m, keep_all=True)
    with torch.no_grad():
        reference = m(x)
        monkeypatch.setattr(video_vit_common, "gather_positions", _no_gather)
        for mode in ("dynamic", "static"):
            set_ats_mode(m, mode)
            torch.testing.assert_close(m(x), reference, **TOL)


# --------------------------------------------------------------------------------------------------
# CUDA: compiled bf16 static ATS without a single sync
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_static_ats_bf16_runs_without_sync(compiled):
    m = deit(ats_stages=(1, 2, 4), ats_k=10, ats_mode="static").cuda().to(torch.bfloat16)
    v = peaky(small_video_vit("timesformer_base_ats", ats_k=6, ats_mode="static")).eval().cuda().to(torch.bfloat16)
    runs = [(m, images().cuda().to(torch.bfloat16)), (v, clips().cuda().to(torch.bfloat16))]
    with torch.no_grad():
        for model, x in runs:
            fn = torch.compile(model, fullgraph=True) if compiled else model
            fn(x)  # warm-up: compilation and autotuning may sync
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = fn(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --------------------------------------------------------------------------------------------------
# timm's own model tests (the installed timm's sdist), run over Glimpse's registered image models
# --------------------------------------------------------------------------------------------------

def _image_models() -> list[str]:
    names = []
    for name in models.list_models():
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and len(cfg.input_size) == 3:
            names.append(name)
    return names


@pytest.fixture(scope="session")
def timm_test_models(tmp_path_factory):
    """timm's ``tests/test_models.py`` from the sdist of the installed timm (fetched from the package index)."""
    root = tmp_path_factory.mktemp("timm_sdist")
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={timm.__version__}", "--no-deps", "--no-binary",
           ":all:", "-d", str(root)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"timm {timm.__version__} sdist not downloadable: {e}")
    sdist = next(root.glob("timm-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/tests/test_models.py"))
        tar.extract(member, root, filter="data")
    spec = importlib.util.spec_from_file_location("timm_sdist_test_models", root / member.name)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)  # timm's CI markers
        spec.loader.exec_module(module)
    return module


# timm routes token-output (ViT-like) models to its non-standard cfg test ('deit*' is in its NON_STD_FILTERS;
# Glimpse's other names are not in timm's lists, so they are routed the same way here). TorchScript is not
# run: Glimpse's models are not scriptable (PEP 604 annotations, data-dependent ATS shapes).
TIMM_TESTS = {"test_model_default_cfgs_non_std": (1, "meta"), "test_model_forward": (1,), "test_model_backward": (2,)}
# Families that do not build on the meta device yet, with timm's factory keywords device= / dtype=
# (strict: an XPASS says the entry can go).
NOT_ON_META = {"sparseformer_": "SparseFormer's constructor takes no device="}


def _timm_cases() -> list:
    cases = []
    for name in _image_models():
        for test in TIMM_TESTS:
            marks = ()
            reason = next((r for prefix, r in NOT_ON_META.items() if name.startswith(prefix)), None)
            if test == "test_model_default_cfgs_non_std" and reason:
                marks = pytest.mark.xfail(strict=True, reason=reason)
            cases.append(pytest.param(name, test, marks=marks, id=f"{name}-{test}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("name, test", _timm_cases())
def test_timm_model_tests_pass(timm_test_models, name, test):
    getattr(timm_test_models, test)(name, *TIMM_TESTS[test])

