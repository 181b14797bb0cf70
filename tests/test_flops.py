"""GFLOPs counter (models/flops.py) and the ``flops`` job: hand-derived counts, SDPA = explicit
matmuls, paper exclusions, per-sample averages, and the paper's DeiT-S / DeiT-S + ATS table."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest
import torch
import torch.nn as nn
from timm.layers.attention import Attention

import models
from models.ats import set_ats_k
from models.flops import average_flops, count_flops, example_input, model_input_shape

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _block(t: int, c: int) -> int:
    """fvcore count of a plain pre-norm ViT block on t tokens of width c (MLP ratio 4):
    two LayerNorms (5 per element), qkv 3c^2, attention 2 t^2 c (QK^T and AV), proj c^2, MLP 8c^2."""
    return 12 * t * c * c + 2 * t * t * c + 10 * t * c


def _ats_block(t: int, k: int, c: int) -> int:
    """An ATS block keeping k of the t-1 non-class tokens: norm1 and qkv on all t tokens, the class
    row (c t), ||V_j|| ((t-1) c), CDF (t-1), searchsorted (k log2 (t-1)), attention for the 1+k kept
    rows against all t keys, then proj, norm2 and MLP on the 1+k kept tokens."""
    kept = k + 1
    sampler = c * t + (t - 1) * c + (t - 1) + k * math.ceil(math.log2(t - 1))
    return 5 * t * c + 3 * t * c * c + sampler + 2 * kept * t * c + kept * c * c + 5 * kept * c + 8 * kept * c * c


def _small_deit_flops(c: int, depth: int, n_patches: int, patch: int, classes: int, stage: int | None, k: int) -> int:
    t = n_patches + 1
    total = n_patches * c * 3 * patch * patch  # patch embedding conv
    for i in range(depth):
        if stage is not None and i == stage:
            total += _ats_block(t, k, c)
            t = k + 1
        else:
            total += _block(t, c)
    return total + 5 * t * c + c * classes  # final norm on the remaining tokens, head on the class token


SMALL = dict(img_size=64, embed_dim=64, num_heads=4, depth=6, num_classes=10)


def test_plain_and_ats_counts_equal_the_hand_derived_formula():
    plain = models.create_model("deit_small_patch16_224", **SMALL)
    assert count_flops(plain, example_input(plain)).gflops * 1e9 == pytest.approx(
        _small_deit_flops(64, 6, 16, 16, 10, None, 0), abs=0.5)
    for k in (15, 9, 3):
        m = models.create_model("deit_small_ats", **SMALL, ats_stages=(2,), ats_k=k)
        report = count_flops(m, example_input(m))  # upper bound: K' = K
        assert report.gflops * 1e9 == pytest.approx(_small_deit_flops(64, 6, 16, 16, 10, 2, k), abs=0.5), k
        assert report.input_shape == (1, 3, 64, 64)


def test_fused_sdpa_counts_the_same_as_explicit_matmuls():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=4).eval()
    x = torch.randn(2, 20, 48)
    attn.fused_attn = True
    fused = count_flops(attn, x)
    attn.fused_attn = False
    manual = count_flops(attn, x)
    assert fused.gflops == manual.gflops
    # qkv + proj + QK^T + AV
    assert fused.gflops * 1e9 == 2 * 20 * (3 * 48 * 48 + 48 * 48) + 2 * (2 * 20 * 20 * 48)
    assert "aten::scaled_dot_product_attention" not in fused.unsupported_ops


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.kept = nn.Linear(8, 8)
        self.mixing = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8))
        self.mixing.exclude_from_paper_flops = True
        self.mixing[0].exclude_from_paper_flops = True  # nested flag: must not be subtracted twice

    def forward(self, x):
        return self.mixing(self.kept(x))


def test_paper_gflops_leaves_out_flagged_submodules_once():
    report = count_flops(_Toy(), torch.randn(3, 8))
    assert report.gflops * 1e9 == 3 * (64 + 32 + 32)
    assert report.paper_gflops * 1e9 == 3 * 64
    assert report.by_module["mixing"] * 1e9 == 3 * 64
    assert report.params_m * 1e6 == sum(p.numel() for p in _Toy().parameters())


def test_average_flops_counts_each_samples_own_kept_tokens():
    torch.manual_seed(0)
    m = models.create_model("deit_small_ats", **SMALL, ats_stages=(1, 3), ats_ratio=0.9).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight[:128].mul_(6)  # peaky attention: K' < K and varying
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    alone = [count_flops(m, x[i:i + 1], ats_upper_bound=False).gflops for i in range(4)]
    assert len(set(alone)) > 1  # the samples really differ
    assert average_flops(m, [x[:2], (x[2:], torch.zeros(2))]) == pytest.approx(sum(alone) / 4, rel=1e-9)
    assert max(alone) < count_flops(m, x[:1]).gflops  # below the upper bound K' = K


def test_model_input_shape_follows_cfg_and_overrides():
    assert model_input_shape(models.create_model("deit_small_ats_k48")) == (3, 224, 224)
    assert model_input_shape(models.create_model("deit_small_ats", **SMALL)) == (3, 64, 64)
    with pytest.raises(ValueError, match="input_size"):
        model_input_shape(nn.Linear(2, 2))


def test_paper_table_deit_small_and_single_stage_ats():
    # ATS paper Table 1 / appendix E.1 (fvcore convention): DeiT-S 22.05M, 4.6 GFLOPs; single stage 3,
    # K = 108 / 78 / 48 -> 3.0 / 2.5 / 2.0 GFLOPs at the upper bound K' = K (3% / 5% tolerance)
    base = count_flops(models.create_model("deit_small_patch16_224"), torch.randn(1, 3, 224, 224))
    assert base.params_m == pytest.approx(22.05, rel=0.03) and base.gflops == pytest.approx(4.6, rel=0.03)
    for name, target in (("deit_small_ats_k108", 3.0), ("deit_small_ats_k78", 2.5), ("deit_small_ats_k48", 2.0)):
        m = models.create_model(name)
        r = count_flops(m, example_input(m))
        assert r.params_m == pytest.approx(base.params_m, abs=1e-9), name  # ATS adds no parameters
        assert r.gflops == pytest.approx(target, rel=0.05), (name, r.gflops)
    # K is an inference-time knob: the cost follows it
    m = models.create_model("deit_small_ats", single_stage=True)
    costs = []
    for k in (196, 108, 48):
        set_ats_k(m, k=k)
        costs.append(count_flops(m, example_input(m)).gflops)
    assert costs[0] > costs[1] > costs[2]


def _job():
    spec = importlib.util.spec_from_file_location("benchmark_models", ROOT / "jobs" / "benchmark_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flops_job_prints_json_rows(capsys):
    job = _job()
    job.main(["flops", "--json", "--model-kwargs", "img_size=64", "depth=6", "num_classes=10", "--",
              "deit_small_patch16_224", "deit_small_ats_k48"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["deit_small_patch16_224", "deit_small_ats_k48"]
    assert all(r["input"] == "3x64x64" for r in rows)
    assert rows[0]["params_m"] == rows[1]["params_m"] > 0
    # K = 48 > the 16 patches: nothing to drop at this size, only the sampler's own work is added
    assert rows[1]["gflops"] > rows[0]["gflops"] and set(rows[0]) >= {"model", "input", "params_m", "gflops",
                                                                       "paper_gflops"}
    with pytest.raises(SystemExit, match="unknown model 'nope'.*deit_small_ats"):
        job.main(["flops", "nope"])

