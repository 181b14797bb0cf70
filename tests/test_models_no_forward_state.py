"""No forward state on modules: a forward leaves every module as it found it; masks travel as arguments.

timm's contract for ATS models with padding (decided in models/ats_vit.py): ``forward_features(x)`` returns
the tokens with padded rows exactly zero, and ``forward_head`` without a ``token_mask`` takes all-zero rows for
padding, so ``forward_head(forward_features(x)) == forward(x)`` on a padded batch, whatever ran before and
under DDP, ``torch.compile`` and FX alike.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn as nn

from models.trace import record
from tests.test_model_contract import NAMES, build, mixed_inputs, sharpen

torch.set_num_threads(1)

AVG_ATS = ["deit_small_ats", "psvit_b_14_ats"]  # the ATS models whose head pools over (padded) tokens


def module_state(model: nn.Module) -> dict[str, tuple]:
    """Per module, its attribute names and the ids of any tensors held outside parameters and buffers."""
    return {name: (tuple(sorted(vars(m))), tuple(id(v) for v in vars(m).values() if isinstance(v, torch.Tensor)))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("name", NAMES)
def test_a_forward_leaves_no_state_on_any_module(name):
    model = sharpen(build(name))
    before = module_state(model)
    for train in (True, False):
        model.train(train)
        with torch.set_grad_enabled(train), record():
            model(mixed_inputs(model, n=2))
    model.train()
    assert module_state(model) == before


def padded_pair(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of the same shape whose samples keep different K' (so their padding differs)."""
    return mixed_inputs(model, seed=1), mixed_inputs(model, seed=7).flip(0)


@pytest.mark.parametrize("name", AVG_ATS)
def test_forward_head_of_forward_features_equals_forward_on_padded_batches(name):
    model = sharpen(build(name, global_pool="avg")).eval()
    x1, x2 = padded_pair(model)
    with torch.no_grad():
        ref1, ref2 = model(x1), model(x2)
        feats1, mask1 = model.forward_features_masked(x1)
        feats2 = model.forward_features(x2)  # the later batch of the same shape ...
        assert mask1 is not None and not mask1.all() and not feats1[~mask1].any()  # padded, rows zero
        torch.testing.assert_close(model.forward_head(feats1), ref1, atol=1e-6, rtol=1e-5)  # ... cannot leak in
        torch.testing.assert_close(model.forward_head(feats2), ref2, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.forward_head(feats1, token_mask=mask1), ref1, atol=1e-6, rtol=1e-5)


def test_torch_compile_gives_the_eager_logits_on_two_batches_of_one_shape():
    import torch._dynamo

    model = sharpen(build("deit_small_ats", global_pool="avg")).eval()
    compiled = torch.compile(model, backend="eager")  # dynamo's graph capture, no compiler needed
    x1, x2 = padded_pair(model)
    with torch.no_grad():
        for x in (x1, x2, x1):
            torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", AVG_ATS)
def test_fx_feature_extraction_with_padding(name):
    from timm.layers._fx import create_feature_extractor

    model = sharpen(build(name, global_pool="avg")).eval()
    extractor = create_feature_extractor(model, ["head"])
    x1, x2 = padded_pair(model)
    with torch.no_grad():
        for x in (x1, x2):
            torch.testing.assert_close(extractor(x)["head"], model(x), atol=1e-6, rtol=1e-5)


def test_ddp_forward_backward_and_trace():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = sharpen(build("timesformer_base_ats"))
        ddp = DistributedDataParallel(model)
        x1, x2 = padded_pair(model)
        with record() as trace:
            out = ddp(x1)
        out.logsumexp(-1).sum().backward()
        assert len(trace.kept_tokens()) == 2 and all(p.grad is not None for p in model.parameters())
        ddp.eval()
        with torch.no_grad():
            for x in (x2, x1):
                torch.testing.assert_close(ddp(x), model(x), atol=0, rtol=0)
    finally:
        dist.destroy_process_group()
