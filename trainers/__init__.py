"""Every method, registered by its Dassl name on import. Add a method with one import line below."""

# ruff: noqa: F401

import trainers.clip_adapter
import trainers.cocoop
import trainers.coop
import trainers.coprompt
import trainers.dept
import trainers.ftclip
import trainers.kgcoop
import trainers.maple
import trainers.prograd
import trainers.promptsrc
import trainers.restuning
import trainers.skip_tuning
import trainers.tcp
import trainers.zsclip
from vltune.registry import TRAINERS, mirror_into_dassl

mirror_into_dassl(TRAINERS, "dassl.engine", "TRAINER_REGISTRY")
