"""Ray Tune sweeps over Glimpse experiments, tracked in MLflow, with the accuracy-versus-GFLOPs frontier.

The papers' central results are trade-off curves: accuracy against GFLOPs as ATS's K varies (ATS Figs.
3-5), accuracy against token inflation (SparseFormer Table 6), the gain from fine-tuning epochs (ATS
Fig. 5b). A sweep produces those points and picks one:

    spec = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke")
    result = run_sweep(spec, select="best", register="glimpse-ats", aliases=("best",))

The parts (Ray 2.60, Train V2):

* ``space``: the search space over dotted ``ExperimentConfig`` keys (grid / choice / uniform /
  log-uniform), checked by building the config with every candidate value; the inference-time knobs
  (``model.ats_ratio``, ``model.ats_k``: :data:`pipeline.knobs.KNOBS`) as a grid of settings; the spec.
* ``trial``: each Tune trial fits the training ``TorchTrainer`` with a sweep child's ``RunContext``
  (``TuneReportCallback``: ASHA stops on ``val/top1``), then ``knob_eval`` evaluates the final checkpoint
  at every knob setting on the same number of Ray Train workers, and the trial reports accuracy and
  measured average GFLOPs (kept tokens per sample).
* Evaluation only: given ``--model`` (a registered model, a run's model or a checkpoint folder) and only
  the knob axis, one trial per setting evaluates it; no training step is taken.
* MLflow: one parent run per sweep and exactly one nested child per trial (the training loop's own run,
  tagged ``mlflow.parentRunId``; Ray's ``MLflowLoggerCallback`` + ``setup_mlflow`` would make two). The
  parent gets ``frontier.csv`` and ``frontier.png`` (``report``: ATS Fig. 4 style) and the selected model
  (``select``, ``register``), registered with its aliases.
* ``driver``: ``resume=True`` restores the interrupted experiment (``Tuner.restore``): finished trials are
  kept, unfinished ones continue from their last training checkpoint under the same MLflow child run.
* ``cli``: ``jobs/tune_imagenet.py`` and ``jobs/tune_kinetics.py``; ``presets``: the named sweeps.
"""

from pipeline.sweep.driver import SweepInterrupted, SweepResult, run_sweep
from pipeline.sweep.register import child_runs
from pipeline.sweep.select import Selection, pareto_front, select_rows
from pipeline.sweep.space import Dimension, SweepSpec, load_sweep, parse_space

__all__ = ["Dimension", "Selection", "SweepInterrupted", "SweepResult", "SweepSpec", "child_runs", "load_sweep",
           "pareto_front", "parse_space", "run_sweep", "select_rows"]
