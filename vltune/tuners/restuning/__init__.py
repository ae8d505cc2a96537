"""Res-Tuning-Bypass on any torch model, wired by module-name regexes: ``ResTuningConfig`` and ``prepare_model``.

A side network (``BypassChain`` of ``vltune.tuners.res_tuners``) runs on detached probes of a frozen model: the
*root* probe ``r`` (a module's first positional input or its output) and one *stem* probe ``s_i`` per selected module.
Its output is fed to every *target* module: with the default ``identity`` recurrence it is ADDED to the target's
input or output, and the prepared model equals the frozen one exactly at step 0 for every configuration the
recurrence accepts (tuners that are 0 at init; an identity or missing vertical tuner passes the correction on, and in
block 0 starts it at 0 instead of leaking the root); ``ResTuningConfig`` refuses, naming the key, the two that cannot
start there: an identity or missing lateral tuner and the ungated ``res_prompt``. With ``paper`` or ``swift`` the
output REPLACES that value, as ms-swift does (methods.md §14.3). Typical use::

    config = ResTuningConfig(dims=768, root_modules=r"blocks\\.0", stem_modules=r"blocks\\.\\d+",
                             target_modules=r"norm", tuner_cfg="res_adapter")
    tuned = prepare_model(model, config)   # patches ``model`` in place and returns a ResTunedModel around it
    tuned.save_pretrained("out/")          # restuning.safetensors + restuning_config.json
    tuned = ResTunedModel.from_pretrained(fresh_model, "out/")   # or prepare_model(...).load_tuner("out/")

Differences from swift's ``ResTuningConfig`` (methods.md §14.2, §14.6), and why:

* Hooks instead of replacing ``forward``: forward (pre-)hooks on the model's own modules capture the probes and
  patch the targets, so the original model object keeps working and ``remove()`` restores it exactly.
* The chain is a submodule of the model (``model.restuning``): it moves with ``.to()``, is in ``state_dict()``, and
  its parameters are the only trainable ones (``prepare_model`` freezes everything else).
* Patterns are anchored (``re.fullmatch``); a pattern matching nothing, an ambiguous root, containers without a
  ``forward`` and a ``tuner_cfg`` of the wrong length fail at preparation with the candidates named, instead of
  swift's ``IndexError``/``UnboundLocalError``/silent first match.
* The probe state of one forward lives on the ``ResTunedModel`` (no global or thread-local state) and is released as
  soon as every target has used it; a target that runs before the root and every stem were captured fails.
* Res-Prefix and Res-Prompt tuners use block i's frozen attention (the stem's ``attn`` submodule; Res-Prompt also the
  stem's ``norm1``/``ln_1``), which swift never implemented.
* Saving writes only the tuner weights (safetensors) and the config; loading is strict about keys, shapes and config.
* swift's ``res_adapter`` forms are accepted: ``adapter_weight`` None, ``scale``, ``scale_channel``, ``gate``,
  ``scalar_<float>`` (the gate averages over the token axis ``token_dim``, not swift's fixed ``dim=1``, which is the
  batch axis of sequence-first tokens), ``adapter_length`` as an int, a per-block list or an ``(in, hidden, out)``
  tuple (stored as its hidden width). ``scale_kv``/``scale_kv_channel`` (no-ops in swift), ``use_upsample``,
  ``upsample_out_channels`` (4-D feature maps only) and ``use_bypass=False`` (never read by swift) are refused by name.

The package splits by concern: ``config`` (``ResTuningConfig`` and its validation), ``spec`` (parsing of the module
patterns and ``tuner_cfg``, without the model), ``wiring`` (resolving the patterns on a model, building the chain,
reading probes and patching targets) and ``model`` (``ResTunedModel``, its hooks and save/load, ``prepare_model``).
"""

from vltune.tuners.restuning.config import ResTuningConfig
from vltune.tuners.restuning.model import CONFIG_FILE, SUBMODULE_NAME, WEIGHTS_FILE, ResTunedModel, prepare_model

__all__ = ["ResTuningConfig", "ResTunedModel", "prepare_model", "SUBMODULE_NAME", "WEIGHTS_FILE", "CONFIG_FILE"]
