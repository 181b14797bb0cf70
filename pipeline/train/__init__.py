"""Training: the state of a run (``state``), one training step and epoch (``step``), a worker's start
(``setup``), the Ray Train worker loop (``loop``) with its checkpoint/report, logging and validation
points (``hooks``), the end of a run (``finish``), weights-only checkpoints (``checkpointing``), the
driver (``launch``: ``init_ray``, ``build_trainer``, ``run_training``) and the Ray-overhead benchmark
(``benchmark``), which runs the same step without Ray."""
