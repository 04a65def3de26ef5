"""Evaluation: metrics, task scoring and the evaluation runner."""
