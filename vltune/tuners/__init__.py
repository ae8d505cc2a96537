"""Components shared by the methods in ``trainers/``: the CLIP methods' base (``prompting``: ``PromptTrainer``,
``PromptModel``, CoOp's ``PromptLearner``, ``Adapter``, ``knowledge_loss``), deep prompts for either tower
(``deep_prompts``: ``DeepPrompts`` hooks and MaPLe's ``CoupledPrompts``), Skip Tuning's class selection, batching and
feature caches (``skip``) and its plugin over other methods (``skip_plugin``); the Res-Tuning framework (the package
``restuning``: ``config``, ``spec`` parsing, ``wiring`` onto a model, and ``model``, the hook-based model with
save/load) and its tuner modules (``res_tuners``)."""
