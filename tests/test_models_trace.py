"""The trace protocol (models/trace.py): recording, nesting, threads, frozen detached records, what every
family emits (one record per stage and forward, in the documented coordinates), and no graph break under
torch.compile while nothing is recorded."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import models
from models import trace as tr
from models.ats import ATSSamplingMixin
from models.trace import KeptTokens, SampledPoints, record, recording
from tests.test_model_contract import FAMILIES, NAMES, build, family, mixed_inputs, sharpen

torch.set_num_threads(1)


def _kept(b: int = 2, k: int = 3, **kw) -> KeptTokens:
    return KeptTokens(0, torch.zeros(b, k, dtype=torch.long), torch.ones(b, k, dtype=torch.bool), **kw)


# ----------------------------------------------------------------------------------------------- protocol


def test_recording_flag_nesting_and_nothing_outside():
    assert not recording()
    tr.emit(_kept(grid=(1, 3)))  # outside any recorder: dropped, no error
    with record() as outer:
        assert recording()
        tr.emit(_kept(grid=(1, 3)))
        with record() as inner:
            tr.emit(_kept(grid=(1, 3)))
        assert len(inner) == 1 and recording()
        tr.emit(_kept(grid=(1, 3)))
    assert not recording()
    assert len(outer) == 3  # nested recorders all collect: the outer one saw the inner block's record too
    with record() as empty_a, record() as empty_b:  # equal (empty) traces are still told apart on exit
        pass
    assert empty_a == empty_b == [] and not recording()


def test_records_of_another_thread_do_not_land_here():
    started, done = threading.Event(), threading.Event()
    other: list = []

    def worker() -> None:
        with record() as mine:
            started.set()
            done.wait(5)
            tr.emit(_kept(grid=(1, 3)))
        other.append(len(mine))

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait(5)
    with record() as here:
        tr.emit(_kept(b=1, grid=(1, 3)))
        done.set()
        thread.join(5)
    assert other == [1] and len(here) == 1 and here[0].batch_size == 1


def test_records_are_frozen_detached_and_checked():
    pos = torch.zeros(2, 3, dtype=torch.float32, requires_grad=True)
    rec = KeptTokens(1, pos, torch.tensor([[True, True, False], [True, False, False]]), grid=(2, 2))
    assert not rec.positions.requires_grad and rec.counts.tolist() == [2, 1] and rec.num_candidates == 4
    assert [p.tolist() for p in rec.kept_positions] == [[0.0, 0.0], [0.0]]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.stage = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="exactly one of grid"):
        _kept()
    with pytest.raises(ValueError, match="exactly one of grid"):
        _kept(grid=(1, 3), candidates_xy=torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="same"):
        KeptTokens(0, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), grid=(1, 4))
    pts = SampledPoints(1, "focusing 1", torch.rand(2, 4, 9, 2, requires_grad=True), torch.rand(2, 4, 4))
    assert not pts.points.requires_grad and pts.num_axes == 2 and pts.batch_size == 2
    with pytest.raises(ValueError, match=r"\(B, N, P, 2\|3\)"):
        SampledPoints(1, "bad", torch.rand(2, 4, 2))


# ------------------------------------------------------------------------------------------ every family


def expected(name: str, model) -> dict:
    """What one forward of the reduced ``name`` must emit (counts and kinds of records)."""
    kw = FAMILIES[family(name)]
    # ATS blocks (image) or samplers (video); CvT's are the blocks of its last stage (stage 3)
    blocks = model.stages[-1].blocks if family(name) == "cvt_" else getattr(model, "blocks", [])
    ats = [i for i, b in enumerate(blocks)
           if isinstance(b, ATSSamplingMixin) or isinstance(getattr(b, "attn", None), ATSSamplingMixin)]
    if family(name) == "psvit_":
        return {"points": kw["num_iters"], "kept": ats, "axes": 2, "rois": False}
    if family(name) in ("sparseformer_", "video_sparseformer_"):
        return {"points": kw["depths"][0] + 1, "kept": [], "axes": 3 if "num_frames" in kw else 2, "rois": True}
    return {"points": 0, "kept": ats}


@pytest.mark.parametrize("name", NAMES)
def test_every_family_emits_its_records(name):
    model = build(name).eval()
    x = mixed_inputs(model, n=2)
    with torch.no_grad(), record() as trace:
        model(x)
    want = expected(name, model)
    points, kept = trace.sampled_points(), trace.kept_tokens()
    assert len(points) == want["points"] and [k.stage for k in kept] == want["kept"]
    assert all(r.batch_size == 2 for r in trace)
    for i, p in enumerate(points, start=1):  # fresh models sample inside the input: [0, 1] coordinates
        assert p.stage == i and p.num_axes == want["axes"] and (p.rois is not None) == want["rois"]
        assert ((p.points >= 0) & (p.points <= 1)).all()
        if p.rois is None:
            assert p.points.shape[2] == 1 and p.name == f"iteration {i}"  # PS-ViT: one point per token
    video = "num_frames" in FAMILIES[family(name)]
    for k in kept:
        assert (k.num_frames == FAMILIES[family(name)]["num_frames"]) if video else k.num_frames is None
        if family(name) == "psvit_":  # candidates: the n*n tokens sampled at the last iteration's points
            assert k.grid is None and torch.equal(k.candidates_xy, points[-1].points[:, :, 0])
        else:
            size = FAMILIES[family(name)]["img_size"] // 16
            assert k.grid == (size, size) and k.candidates_xy is None
        assert (k.positions[k.valid] < k.num_candidates).all()
    if not want["points"] and not want["kept"]:
        assert trace == []  # plain TimeSformer / XViT and the conv baselines emit nothing


def test_recomputed_blocks_add_no_records():
    """Activation checkpointing recomputes blocks in the backward pass; records come from the block loop, once."""
    for name in ("deit_small_ats", "timesformer_base_ats", "psvit_b_14_ats"):
        model = sharpen(build(name)).train()
        model.set_grad_checkpointing(True)
        with record() as trace:
            model(mixed_inputs(model, n=2)).sum().backward()
        assert len(trace.kept_tokens()) == len(expected(name, model)["kept"]), name


def test_no_graph_break_from_the_trace_when_off():
    import torch._dynamo

    def step(x: torch.Tensor) -> torch.Tensor:
        if recording():
            tr.emit(_kept(b=1, grid=(1, 3)))
        return x * 2

    assert torch.compile(step, backend="eager", fullgraph=True)(torch.ones(2)).tolist() == [2.0, 2.0]
    torch._dynamo.reset()
    model = build("sparseformer_tiny").eval()  # no data-dependent control flow: one graph when not recording
    explanation = torch._dynamo.explain(model)(mixed_inputs(model, n=1))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()


def test_models_package_exposes_the_protocol():
    assert models.trace is tr and set(tr.__all__) >= {"record", "recording", "KeptTokens", "SampledPoints"}
