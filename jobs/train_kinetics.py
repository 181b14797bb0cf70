"""Train a video model on Kinetics-style shards with Ray Train, tracked in MLflow.

On a fresh machine (local Ray, synthetic clips built if absent, SQLite MLflow under ./runs):

    python jobs/train_kinetics.py                       # demo preset: a few minutes on a CPU
    python jobs/train_kinetics.py --preset smoke        # under two minutes, end to end

On a cluster (``ray job submit`` sets RAY_ADDRESS; storage must be shared by all nodes):

    ray job submit --working-dir . -- python jobs/train_kinetics.py \
        --preset video_sparseformer_tiny_k400 data.train=s3://bucket/k400/train data.val=s3://bucket/k400/val \
        cluster.storage_path=s3://bucket/runs --register vsf-tiny

Resume an interrupted run by running it again with the same ``--name``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.cli import run_training_job  # noqa: E402
from pipeline.presets import KINETICS_PRESETS  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_training_job(None, __doc__.splitlines()[0], KINETICS_PRESETS, "demo"))
