"""Metrics, evaluation of fitted models on test sets, and hyperparameter tuning."""
