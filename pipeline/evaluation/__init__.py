"""Evaluation: multi-view aggregation (``aggregation``), the views loop (``views``), evaluation inside a
Ray Train worker group (``distributed``) and the stand-alone evaluation job (``standalone``)."""

from pipeline.evaluation.aggregation import (
    IncompleteViewsError,
    ViewAggregator,
    gather_aggregators,
    summarize,
)

__all__ = ["IncompleteViewsError", "ViewAggregator", "gather_aggregators", "summarize"]
