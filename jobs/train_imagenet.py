"""Train an image model on ImageNet-style shards with Ray Train, tracked in MLflow.

On a fresh machine (local Ray, synthetic images built if absent, SQLite MLflow under ./runs):

    python jobs/train_imagenet.py                       # demo preset: a few minutes on a CPU
    python jobs/train_imagenet.py --preset smoke        # under two minutes, end to end

On a cluster (``ray job submit`` sets RAY_ADDRESS; storage must be shared by all nodes):

    ray job submit --working-dir . -- python jobs/train_imagenet.py \
        --preset deit_small_ats_in1k data.train=s3://bucket/in1k/train data.val=s3://bucket/in1k/val \
        cluster.storage_path=s3://bucket/runs --register deit-s-ats

Resume an interrupted run by running it again with the same ``--name``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.cli import run_training_job  # noqa: E402
from pipeline.presets import IMAGENET_PRESETS  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_training_job(None, __doc__.splitlines()[0], IMAGENET_PRESETS, "demo"))
