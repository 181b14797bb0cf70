"""Figures of where token-efficient models look: ATS masks and kept-token histograms, PS-ViT sampling
arrows, SparseFormer RoIs / points / density, per frame for video models; and a run's training curves.

    python jobs/visualize.py --preset smoke        # tiny random models of every family, < 2 min
    python jobs/visualize.py                       # demo: paper-size random models on synthetic digits
    python jobs/visualize.py --model models:/vsf-tiny@candidate clip1.mp4 clip2.mp4 --out figs
    python jobs/visualize.py --model runs/my-run/checkpoint_step00001000 --synthetic 16
    python jobs/visualize.py --model-name sparseformer_tiny --model sf_t.pth photo.jpg
    python jobs/visualize.py --model-name deit_small_ats --model-kwargs img_size=384 --ats-ratio 0.7 cat.png
    python jobs/visualize.py --run-id RUN_ID --log-to-run   # curves + per-class accuracy, logged to the run
    ray job submit --working-dir . -- python jobs/visualize.py --model models:/vsf-tiny/3 \
        --tracking-uri http://mlflow:5000 --out /mnt/shared/figures

Logic in pipeline/visualize/ (figures; this command line: pipeline/visualize/cli.py); inputs are prepared
by datasets/media_inputs.py with the model's pretrained_cfg.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.visualize.cli import run_visualize_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_visualize_job(None, __doc__.splitlines()[0]))
