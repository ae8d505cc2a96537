"""Tuner components shared by trainers: Skip Tuning's class selection, batching and feature caches (``skip``)."""
