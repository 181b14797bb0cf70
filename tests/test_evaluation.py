"""Multi-view aggregation: view bookkeeping, prob vs logit averaging, per-class accuracy, merging."""

import pytest
import torch

from pipeline.config import ExperimentConfig
from pipeline.context import finalize
from pipeline.evaluation import IncompleteViewsError, ViewAggregator, summarize


def _add_views(agg, vid, label, logits_per_view):
    for i, logits in enumerate(logits_per_view):
        agg.add(torch.tensor([logits]), torch.tensor([label]), [vid], torch.tensor([i // 3]), torch.tensor([i % 3]))


def test_prob_and_logit_averaging_differ_as_computed_by_hand():
    # One view is very confident in class 0, two views mildly prefer class 1.
    views = [[10.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    prob, logit = ViewAggregator(num_views=3, aggregate="prob"), ViewAggregator(num_views=3, aggregate="logit")
    _add_views(prob, "v", 1, views)
    _add_views(logit, "v", 1, views)
    # logits mean: [3.33, 0.67] -> class 0; probs mean: p0 = (0.99995 + 2*0.2689)/3 = 0.512 -> class 0 as well
    p = torch.tensor(views).softmax(-1).mean(0)
    assert torch.allclose(prob.scores["v"] / 3, p)
    assert torch.allclose(logit.scores["v"] / 3, torch.tensor(views).mean(0))
    # A case where they disagree: probabilities saturate, logits do not.
    views = [[20.0, 0.0], [0.0, 3.0], [0.0, 3.0]]
    prob, logit = ViewAggregator(num_views=3, aggregate="prob"), ViewAggregator(num_views=3, aggregate="logit")
    _add_views(prob, "v", 1, views)
    _add_views(logit, "v", 1, views)
    assert summarize(prob)["top1"] == 1.0  # mean prob of class 1 = (0 + 0.95 + 0.95)/3 = 0.63
    assert summarize(logit)["top1"] == 0.0  # mean logits [6.67, 2.0] -> class 0


def test_incomplete_and_duplicate_views_are_errors():
    agg = ViewAggregator(num_views=3)
    _add_views(agg, "a", 0, [[1.0, 0.0]] * 3)
    _add_views(agg, "b", 0, [[1.0, 0.0]] * 2)
    assert agg.check_complete() == ["b"]
    with pytest.raises(IncompleteViewsError, match="lack views"):
        summarize(agg)
    with pytest.raises(IncompleteViewsError, match="seen twice"):
        agg.add(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), ["a"], torch.tensor([0]), torch.tensor([0]))


def test_top1_top5_per_class_and_merge():
    a, b = ViewAggregator(num_views=1), ViewAggregator(num_views=1)
    logits = torch.eye(6) * 5  # video i predicts class i
    a.add(logits[:3], torch.tensor([0, 1, 0]), ["v0", "v1", "v2"])  # v2 wrong (predicts 2, label 0)
    b.add(logits[3:], torch.tensor([3, 4, 5]), ["v3", "v4", "v5"])
    a.merge(ViewAggregator.from_state(b.to_state()))
    s = summarize(a, class_names=[f"c{i}" for i in range(6)])
    assert s["num_videos"] == 6 and s["top1"] == pytest.approx(5 / 6) and s["top5"] == 1.0
    assert s["per_class"]["c0"] == 0.5 and s["per_class"]["c1"] == 1.0
    with pytest.raises(IncompleteViewsError, match="two ranks"):
        a.merge(b)


@pytest.mark.parametrize("kind, model, views", [
    ("video", "video_sparseformer_tiny", "4x3"),
    ("video", "timesformer_base_ats", "1x3"),
    ("video", "xvit_16", "1x3"),
    ("image", "deit_small_ats", "1x1"),
])
def test_default_views_follow_the_papers(kind, model, views):
    """Views left empty are the model's pretrained_cfg test views, written into the config that is logged."""
    cfg = ExperimentConfig.from_dict({"model": {"name": model}, "data": {"kind": kind},
                                      "cluster": {"name": "views"}})
    assert cfg.eval.views == ""
    assert finalize(cfg).eval.views == views
    assert finalize(cfg).flat()["eval.views"] == views
