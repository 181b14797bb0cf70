"""What a run resolves on the driver, once, before anything starts: the finalised config and the RunContext.

    cfg = finalize(resolve_config(KINETICS_PRESETS, "demo", overrides))   # name, storage, model geometry
    run = build_run_context(cfg)                                          # sources, classes, tracking

:func:`finalize` fills the config fields left to the run and to the model: the run's name and absolute
storage path; the clip length, stride, crop or image size, mean/std and test views that the model's
``pretrained_cfg`` gives (STYLE.md #3). The result is what the job prints, MLflow logs (``cfg.flat()``)
and every checkpoint stores: what ran.

:class:`RunContext` holds the facts that are not settings (absolute shard sources, the class list, the
tracking URI, the run folder, a sweep's parent run); it is frozen and goes to every worker as a plain
dict. It is logged too, as the run's ``context.*`` parameters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, DataConfig, EvalConfig, ExperimentConfig


def is_local(path: str) -> bool:
    return "://" not in path


@dataclass(frozen=True)
class RunContext:
    run_name: str
    run_dir: str
    train_source: str
    val_source: str
    classes: tuple[str, ...]
    train_samples: int
    tracking_uri: str
    artifact_root: str = ""  # the MLflow experiment's artifact location for a local SQLite store
    threads_per_worker: int = 1
    # Inside a sweep (pipeline.sweep): the parent MLflow run, tags of the trial's run, GFLOPs measured at
    # every validation, and no final model logged (the sweep logs the point it selects).
    parent_run_id: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    gflops_samples: int = 0
    log_final_model: bool = True
    progress: bool = True  # rank 0's per-epoch progress bar

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunContext:
        d = dict(data)
        d["classes"] = tuple(d["classes"])
        d["tags"] = tuple((str(k), str(v)) for k, v in d.get("tags", ()))
        return cls(**d)

    def params(self) -> dict[str, Any]:
        """``context.*`` MLflow parameters (the class list as its count and names)."""
        d = self.to_dict()
        d["classes"] = ",".join(self.classes)
        d.pop("tags")
        return {f"context.{k}": v for k, v in d.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- finalize


def _model_geometry(cfg: ExperimentConfig) -> dict[str, Any]:
    """The data keys of the model's ``pretrained_cfg`` (``models.registry``), its built input size included."""
    from pipeline.modeling import model_data_cfg

    try:
        return model_data_cfg(cfg.model)
    except (ValueError, TypeError) as exc:  # an unknown name, a wrong constructor argument
        raise ConfigError(f"model {cfg.model.name!r} with model.kwargs={cfg.model.kwargs}: {exc}") from None


def _need(geometry: Mapping[str, Any], key: str, field: str) -> Any:
    if geometry.get(key) is None:
        raise ConfigError(f"{field}: the model's pretrained_cfg has no {key!r}; set {field} explicitly")
    return geometry[key]


def resolve_geometry(cfg: ExperimentConfig) -> tuple[DataConfig, EvalConfig]:
    """``cfg.data`` and ``cfg.eval`` with every field left to the model filled from its pretrained_cfg."""
    data, ev = cfg.data, cfg.eval
    video = data.kind == "video"
    todo = (not data.mean or not data.std or not ev.views
            or (video and not (data.num_frames and data.stride and data.crop_size))
            or (not video and not data.image_size))
    if not todo:
        return data, ev
    g = _model_geometry(cfg)
    fill: dict[str, Any] = {"mean": data.mean or tuple(float(v) for v in _need(g, "mean", "data.mean")),
                            "std": data.std or tuple(float(v) for v in _need(g, "std", "data.std"))}
    size = int(_need(g, "input_size", "data.crop_size" if video else "data.image_size")[-1])
    if video:
        fill.update(num_frames=data.num_frames or int(_need(g, "num_frames", "data.num_frames")),
                    stride=data.stride or int(_need(g, "sampling_rate", "data.stride")),
                    crop_size=data.crop_size or size)
        k, s = g.get("test_views") or (1, 1)
    else:
        fill.update(image_size=data.image_size or size)
        k, s = 1, 1
    return dataclasses.replace(data, **fill), dataclasses.replace(ev, views=ev.views or f"{k}x{s}")


def finalize(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fill what the run and the model decide (module docstring); once, on the driver. Idempotent."""
    cluster = cfg.cluster
    name = cluster.name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = str(Path(cluster.storage_path).expanduser().resolve()) if is_local(cluster.storage_path) \
        else cluster.storage_path
    data, ev = resolve_geometry(cfg)
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cluster, name=name, storage_path=storage),
                               data=data, eval=ev)


# --------------------------------------------------------------------------- the run context


def tracking_location(cfg: ExperimentConfig) -> tuple[str, str]:
    """(tracking URI, artifact root): ``tracking.tracking_uri``, else MLFLOW_TRACKING_URI, else SQLite
    under the storage path with artifacts beside it."""
    from pipeline.tracking import default_tracking_uri

    storage = cfg.cluster.storage_path
    uri = cfg.tracking.tracking_uri or default_tracking_uri(storage)
    root = (Path(storage) / "mlartifacts").as_uri() if uri.startswith("sqlite:") and is_local(storage) else ""
    return uri, root


def build_run_context(cfg: ExperimentConfig) -> RunContext:
    """The context of a finalised config: sources resolved (synthetic data built if absent), tracking."""
    from pipeline.data import resolve_sources

    if not cfg.cluster.name:
        raise ValueError("build_run_context needs a finalised config (pipeline.context.finalize)")
    sources = resolve_sources(cfg.data)
    uri, root = tracking_location(cfg)
    storage = cfg.cluster.storage_path
    return RunContext(run_name=cfg.cluster.name, run_dir=f"{storage.rstrip('/')}/{cfg.cluster.name}",
                      train_source=sources.train, val_source=sources.val, classes=sources.classes,
                      train_samples=sources.train_samples, tracking_uri=uri, artifact_root=root,
                      threads_per_worker=max(1, int(cfg.cluster.cpus_per_worker)))
