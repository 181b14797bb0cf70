"""Ray Tune sweeps of video models on Kinetics-style shards (VideoSparseFormer inflation, ATS K, lr), tracked in MLflow.

Each trial is a full Ray Train run (TorchTrainer, N workers) stopped early by ASHA on val/top1; every
trained model is evaluated at each K of the space (the config fields model.ats_ratio / model.ats_k) and
reports top-1 and measured average GFLOPs. The MLflow parent run gets frontier.csv and frontier.png; the
selection is registered.

Locally (a local Ray, synthetic data built if absent, SQLite MLflow under ./runs):

    python jobs/tune_kinetics.py --preset smoke                    # a few minutes on a CPU
    python jobs/tune_kinetics.py --preset demo --max-concurrent 2 --register glimpse-kinetics-sweep
    python jobs/tune_kinetics.py --space my_sweep.yaml --gflops-budget 0.5 --register my-model
    python jobs/tune_kinetics.py --preset smoke --name my-sweep --resume   # continue an interrupted sweep

Evaluation only (an existing model at every K, no training):

    python jobs/tune_kinetics.py --space k_only.yaml --model models:/my-model@best --select pareto

On a cluster (storage and MLflow must be reachable from every node):

    ray job submit --working-dir . -- python jobs/tune_kinetics.py --preset demo \
        cluster.storage_path=s3://bucket/sweeps tracking.tracking_uri=http://mlflow:5000 --register my-model
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.presets import KINETICS_PRESETS  # noqa: E402
from pipeline.sweep.cli import tune_main  # noqa: E402
from pipeline.sweep.presets import KINETICS_SWEEPS  # noqa: E402

if __name__ == "__main__":
    sys.exit(tune_main(None, __doc__.splitlines()[0], KINETICS_SWEEPS, KINETICS_PRESETS, "demo"))
