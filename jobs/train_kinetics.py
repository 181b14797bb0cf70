"""Train a video model on Kinetics-style shards with Ray Train, tracked in MLflow.

Without arguments: the demo preset on a local Ray, with synthetic clips built if absent and SQLite MLflow
under ./runs (a few minutes on a CPU); ``--preset smoke`` is the two-minute check. Running a run again
with the same ``--name`` resumes it. On a cluster, ``ray job submit`` sets RAY_ADDRESS and every node
must reach the storage:

    ray job submit --working-dir . -- python jobs/train_kinetics.py --preset video_sparseformer_tiny_k400 \
        data.train=s3://bucket/k400/train data.val=s3://bucket/k400/val data.decoder=torchcodec \
        cluster.storage_path=s3://bucket/runs eval.views=4x3 --register vsf-tiny
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.cli import run_training_job  # noqa: E402
from pipeline.presets import KINETICS_PRESETS  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_training_job(None, __doc__.splitlines()[0], KINETICS_PRESETS, "demo"))
