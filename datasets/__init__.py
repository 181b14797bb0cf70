"""Glimpse's data package: WebDataset shards of images and videos, decoding, clip sampling,
transforms and synthetic data.

Not to be confused with Hugging Face's ``datasets`` library, which has the same import name:
Glimpse puts its repository root first on ``sys.path`` in every job, and ``GLIMPSE_DATASETS``
below lets code (and a test) check that this is the package that was imported.
"""

GLIMPSE_DATASETS = True
