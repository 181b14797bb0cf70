"""Single centre-crop evaluation of an image model on ImageNet-style shards, distributed on Ray.

    python jobs/evaluate_imagenet.py --preset smoke                  # the model train_imagenet --preset smoke registered
    python jobs/evaluate_imagenet.py --model models:/deit-s-ats@candidate --data /shards/in1k/val
    ray job submit --working-dir . -- python jobs/evaluate_imagenet.py --model models:/deit-s-ats/1 \
        --data s3://bucket/in1k/val --num-workers 8 --tracking-uri http://mlflow:5000
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.cli import run_eval_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_eval_job(None, __doc__.splitlines()[0], "imagenet"))
