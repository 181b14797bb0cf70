"""Multi-view evaluation of a video model (K temporal clips x S spatial crops), distributed on Ray.

    python jobs/evaluate_kinetics.py --preset smoke                  # the model train_kinetics --preset smoke registered
    python jobs/evaluate_kinetics.py --model models:/vsf-tiny@candidate --data /shards/k400/val --views 4x3
    ray job submit --working-dir . -- python jobs/evaluate_kinetics.py --model models:/vsf-tiny/3 \
        --data s3://bucket/k400/val --num-workers 8 --tracking-uri http://mlflow:5000

Softmax scores are averaged per video (``--aggregate logit`` averages logits, as the official
TimeSformer and XViT code does); top-1, top-5 and per-class accuracy go to JSON and MLflow.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.cli import run_eval_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_eval_job(None, __doc__.splitlines()[0], "kinetics"))
