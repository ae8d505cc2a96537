"""The runner's experiment file: shared settings (``base``), tasks, and the pipeline that orders them.

The default suite is MiniBench: every protocol in miniature, offline, on a CPU. Its datasets (digits, shapes,
textures, coloured objects, and a broad union with four domain-shifted variants) and a mini CLIP pretrained on their
train splits are generated on first use (``prepare="minibench"``).

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

# One task = one trainer × config × protocol over datasets, seeds, shots (and an optional grid search:
# grid=dict(mode="product" | "zip", params={"CONFIG.KEY": [values, ...]})). eval_only: zero-shot, nothing trains.
zs_b2n = dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=MINI, seeds=SEEDS, eval_only=True)
coop_b2n = dict(trainer="CoOp", config="mini", protocol="b2n", datasets=MINI, seeds=SEEDS, shots=16)
zs_fewshot = dict(trainer="ZeroshotCLIP", config="tiny", protocol="fewshot", datasets=MINI, seeds=SEEDS,
                  eval_only=True)
coop_fewshot = dict(trainer="CoOp", config="mini", protocol="fewshot", datasets=MINI, seeds=SEEDS,
                    shots=[1, 2, 4, 8, 16])
zs_xd = dict(trainer="ZeroshotCLIP", config="tiny", protocol="xd", source=SOURCE, datasets=MINI, variants=VARIANTS,
             seeds=SEEDS, eval_only=True)
coop_xd = dict(trainer="CoOp", config="mini", protocol="xd", source=SOURCE, datasets=MINI, variants=VARIANTS,
               seeds=SEEDS, shots=16)

# Stages run side by side, each on its own GPUs (gpu_ids=[]: the CPU); the tasks of a stage run in order.
pipeline = [dict(gpu_ids=[], tasks=["zs_b2n", "coop_b2n", "zs_fewshot", "coop_fewshot", "zs_xd", "coop_xd"])]
