"""Tuner components shared by trainers: Skip Tuning's class selection, batching and feature caches (``skip``) and its
plugin over other methods (``skip_plugin``); the Res-Tuning framework (the package ``restuning``: ``config``,
``spec`` parsing, ``wiring`` onto a model, and ``model``, the hook-based model with save/load) and its tuner modules
(``res_tuners``)."""
