"""The runner's experiment file: shared settings (``base``), tasks, and the pipeline that orders them.

The default suite is MiniBench: every method family of the project on every protocol, in miniature, offline, on a
CPU. Its datasets (digits, shapes, textures, coloured objects, and a broad union with four domain-shifted variants)
and a mini CLIP pretrained on the union's train split are generated on first use (``prepare="minibench"``).

What it shows, family against family, on the same data and mini CLIP: zero-shot CLIP; prompt learners (CoOp, KgCoOp,
MaPLe); a feature adapter (CLIP-Adapter); full fine-tuning (FinetuneCLIP); Skip Tuning; and the Res-Tuning tuners
(ResAdapter, and ResTuningBypass, which keeps the backbone out of the backward pass). The report's comparison
tables put them side by side per protocol, with their measured cost (training time, peak memory per meter).

The papers' benchmarks are ready-made: ``scripts/<benchmark>.sh`` runs the experiment files in ``presets/``. For an
experiment of your own: set ``data.root`` to your CoOp data folder, ``model`` to a real CLIP
(``backbone="ViT-B/16", weights="~/.cache/clip/ViT-B-16.pt"``), drop ``prepare``, and use the real dataset names
(``oxford_pets``, ``imagenet``, …; one yaml each under configs/datasets/) with the ``vit_b16*`` trainer configs.
"""

base = dict(
    data=dict(root="data"),  # parent folder of the dataset folders (CoOp layout); relative paths: to this file
    model=dict(backbone="vltune-tiny", weights="weights/minibench-clip.pt"),
    output=dict(root="output/minibench"),
    prepare="minibench",  # generate the MiniBench datasets and mini CLIP when missing
    slots_per_gpu=2,  # jobs at once per GPU (here: on the CPU, each with half the cores)
    # Summary mail after each task and at the end. The password never goes here: it is read from the environment
    # variable named by password_env, or from password_file (a file outside the repository).
    mail=dict(enabled=False, host="smtp.example.org", port=465, security="ssl", user="me@example.org",
              to=["me@example.org"], password_env="VLTUNE_SMTP_PASSWORD"),
)

MINI = ["digits", "mini_shapes", "mini_textures", "mini_objects"]  # base-to-new and few-shot datasets
SOURCE = "mini_union"  # plays ImageNet: the source of cross-dataset transfer
VARIANTS = ["mini_union_v2", "mini_union_sketch", "mini_union_noise", "mini_union_inverted"]  # play ImageNet-V2/S/A/R
SEEDS = [1]
# Few-shot: CoOp and Skip Tuning draw the full curve over three draws of the shots (seeds), as the papers do; the
# other learners three points of it with one seed, which keeps the suite within 10 minutes on 2 cores.
CURVE = dict(seeds=[1, 2, 3], shots=[1, 2, 4, 8, 16])
POINTS = dict(seeds=SEEDS, shots=[1, 4, 16])

# Zero-shot CLIP, the reference every method must beat: nothing trains.
zs_b2n = dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=MINI, seeds=SEEDS, eval_only=True)
zs_fewshot = dict(trainer="ZeroshotCLIP", config="tiny", protocol="fewshot", datasets=MINI, seeds=SEEDS,
                  eval_only=True)
zs_xd = dict(trainer="ZeroshotCLIP", config="tiny", protocol="xd", source=SOURCE, datasets=MINI, variants=VARIANTS,
             seeds=SEEDS, eval_only=True)

# One family per trainer, each with its MiniBench config (configs/trainers/<trainer>/mini.yaml).
LEARNERS = {
    "CoOp": CURVE,  # prompt learner: a learned text context shared by the classes
    "KgCoOp": POINTS,  # prompt learner kept close to the hand-written prompt's text features
    "MaPLe": POINTS,  # multi-modal prompt learner: coupled text and image prompts in every block
    "CLIPAdapter": POINTS,  # a residual MLP adapter on the frozen image features
    "FinetuneCLIP": POINTS,  # full fine-tuning of both encoders: the accuracy and cost Skip Tuning is measured against
    "SkipTuning": CURVE,  # fine-tuning that skips the early layers and most classes' text: less time, memory
    "ResAdapter": POINTS,  # Res-Tuning: adapters beside the frozen blocks, trained through the backbone
    "ResTuningBypass": POINTS,  # Res-Tuning bypass: the tuner runs beside a frozen, gradient-free backbone
}
for _trainer, _fewshot in LEARNERS.items():
    _name = _trainer.lower()
    # base-to-new: train on the base half of the classes (16 shots), test on base and on the unseen new half.
    globals()[f"{_name}_b2n"] = dict(trainer=_trainer, config="mini", protocol="b2n", datasets=MINI, seeds=SEEDS,
                                     shots=16)
    # few-shot: all classes, 1 to 16 shots per class; accuracy grows with the shots as with real CLIP.
    globals()[f"{_name}_fewshot"] = dict(trainer=_trainer, config="mini", protocol="fewshot", datasets=MINI,
                                         **_fewshot)
    # cross-dataset and domain generalisation: train on the source, test on the other datasets and the variants. The
    # source trains on 8 shots of its 42 classes (the papers: 16 shots of ImageNet's 1000), to fit the 10 minutes.
    globals()[f"{_name}_xd"] = dict(trainer=_trainer, config="mini", protocol="xd", source=SOURCE, datasets=MINI,
                                    variants=VARIANTS, seeds=SEEDS, shots=8)

# Stages run side by side, each on its own GPUs (gpu_ids=[]: the CPU); the tasks of a stage run in order.
pipeline = [dict(gpu_ids=[], tasks=["zs_b2n", "zs_fewshot", "zs_xd",
                                    *(f"{t.lower()}_{p}" for t in LEARNERS for p in ("b2n", "fewshot", "xd"))])]
