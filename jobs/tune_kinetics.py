"""Ray Tune sweeps of video models on Kinetics-style shards (VideoSparseFormer inflation, ATS K, lr), tracked in MLflow.

What a sweep runs, tracks and registers: ``pipeline/sweep/cli.py``.

    python jobs/tune_kinetics.py --preset smoke --name my-sweep    # under two minutes on a CPU
    python jobs/tune_kinetics.py --preset smoke --name my-sweep --resume   # after Ctrl-C
    python jobs/tune_kinetics.py --preset timesformer_ats_k --model models:/timesformer-ats@best
    ray job submit --working-dir . -- python jobs/tune_kinetics.py --preset inflation \
        data.train=s3://bucket/k400/train data.val=s3://bucket/k400/val \
        cluster.storage_path=s3://bucket/sweeps tracking.tracking_uri=http://mlflow:5000
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.presets import KINETICS_PRESETS  # noqa: E402
from pipeline.sweep.cli import tune_main  # noqa: E402
from pipeline.sweep.presets import KINETICS_SWEEPS  # noqa: E402

if __name__ == "__main__":
    sys.exit(tune_main(None, __doc__.splitlines()[0], KINETICS_SWEEPS, KINETICS_PRESETS, "demo"))
