"""MLflow for Glimpse: the buffered rank-0 :class:`Tracker` (``tracker``) and the model store: log,
register, load (``model_store``)."""

from pipeline.tracking.tracker import RUN_NAME_TAG, Tracker, default_tracking_uri, environment_info

__all__ = ["RUN_NAME_TAG", "Tracker", "default_tracking_uri", "environment_info"]
