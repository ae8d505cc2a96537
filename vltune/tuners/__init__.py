"""Tuner components shared by trainers: Skip Tuning's class selection, batching and feature caches (``skip``) and its
plugin over other methods (``skip_plugin``); the Res-Tuning framework (``restuning``: config, spec parsing, the
hook-based model, save/load) and its tuner modules (``res_tuners``)."""
