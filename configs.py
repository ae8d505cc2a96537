"""The runner's experiment file: shared settings (``base``), tasks, and the pipeline that orders them.

The default suite runs offline on a CPU: scikit-learn's digits in CoOp layout and a tiny CLIP pretrained on the
digits train split (both generated on first use). To run real benchmarks, point ``base`` at your CoOp data root and
CLIP weights (e.g. ``backbone="ViT-B/16", weights="~/.cache/clip/ViT-B-16.pt"``) and use the ``vit_b16*`` configs.
"""

base = dict(
    data=dict(root="data"),  # parent folder of the dataset folders (CoOp layout)
    model=dict(backbone="vltune-tiny", weights="weights/vltune-tiny-digits.pt"),
    output=dict(root="output"),
)

# One task = one trainer × config × protocol over datasets (configs/datasets/<name>.yaml) and seeds.
zeroshot_digits = dict(trainer="ZeroshotCLIP", config="tiny", datasets=["digits"], seeds=[1], eval_only=True)
coop_digits = dict(trainer="CoOp", config="tiny_ep10", datasets=["digits"], seeds=[1], shots=4)

pipeline = [dict(gpu_ids=[], tasks=["zeroshot_digits", "coop_digits"])]
