"""Ray Tune sweeps of ImageNet-style image models (ATS K, fine-tune epochs, lr), tracked in MLflow.

What a sweep runs, tracks and registers: ``pipeline/sweep/cli.py``.

    python jobs/tune_imagenet.py --preset smoke                    # a few minutes on a CPU
    python jobs/tune_imagenet.py --preset demo --max-concurrent 2 --register glimpse-imagenet-sweep
    python jobs/tune_imagenet.py --space my_sweep.yaml --gflops-budget 0.5 --register my-model
    python jobs/tune_imagenet.py --preset ats_k --model models:/my-model@best --select pareto  # no training
    ray job submit --working-dir . -- python jobs/tune_imagenet.py --preset finetune_epochs \
        model.pretrained=/data/deit_small.pth cluster.storage_path=s3://bucket/sweeps \
        tracking.tracking_uri=http://mlflow:5000 --register deit-small-ats
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.presets import IMAGENET_PRESETS  # noqa: E402
from pipeline.sweep.cli import tune_main  # noqa: E402
from pipeline.sweep.presets import IMAGENET_SWEEPS  # noqa: E402

if __name__ == "__main__":
    sys.exit(tune_main(None, __doc__.splitlines()[0], IMAGENET_SWEEPS, IMAGENET_PRESETS, "demo"))
