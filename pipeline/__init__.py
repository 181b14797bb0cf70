"""Glimpse's training pipeline: configuration, Ray Train loop, evaluation, MLflow tracking, Ray Tune."""
