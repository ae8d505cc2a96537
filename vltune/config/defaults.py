"""Dassl's default config keys that CLIP trainers use, plus vltune's additions.

Existing Dassl/CoOp yaml files and ``KEY VALUE`` opts must merge unchanged, so every key those files set exists here
with Dassl's default. Method hyper-parameters are not here: each trainer defines its own ``TRAINER.<NODE>`` in its
file (``add_config``). vltune additions are marked [vltune].
"""

from __future__ import annotations

from yacs.config import CfgNode as CN


def get_cfg_default() -> CN:
    """A fresh copy of the defaults (callers may mutate it)."""
    _C = CN()
    _C.VERSION = 1
    _C.OUTPUT_DIR = "./output"  # run folder: log.txt, config.yaml, checkpoints, result.json
    _C.RESUME = ""  # checkpoint folder to resume from; empty resumes from OUTPUT_DIR when it holds checkpoints
    _C.SEED = -1  # >= 0 fixes python/numpy/torch seeds (0 included, unlike upstream); -1 leaves them random
    _C.USE_CUDA = True  # use CUDA when available
    _C.VERBOSE = True  # print build messages ("Loading trainer: X")

    _C.INPUT = CN()
    _C.INPUT.SIZE = (224, 224)  # (H, W) fed to the image encoder; must match the backbone resolution
    _C.INPUT.INTERPOLATION = "bilinear"  # resize mode: bilinear | bicubic | nearest (CLIP configs use bicubic)
    _C.INPUT.TRANSFORMS = ()  # training augmentations, by Dassl name (random_resized_crop, random_flip, normalize, …)
    _C.INPUT.NO_TRANSFORM = False  # skip every transform (Dassl key; unused by CLIP trainers)
    _C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]  # normalisation mean (CLIP configs set the CLIP values)
    _C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]  # normalisation std
    _C.INPUT.CROP_PADDING = 4  # random_crop padding in px
    _C.INPUT.RRCROP_SCALE = (0.08, 1.0)  # random_resized_crop area range
    _C.INPUT.CUTOUT_N = 1  # cutout holes
    _C.INPUT.CUTOUT_LEN = 16  # cutout hole size in px
    _C.INPUT.GN_MEAN = 0.0  # gaussian_noise mean
    _C.INPUT.GN_STD = 0.15  # gaussian_noise std
    _C.INPUT.RANDAUGMENT_N = 2  # randaugment: ops per image
    _C.INPUT.RANDAUGMENT_M = 10  # randaugment: magnitude (0-30)
    _C.INPUT.COLORJITTER_B = 0.4  # colorjitter brightness
    _C.INPUT.COLORJITTER_C = 0.4  # colorjitter contrast
    _C.INPUT.COLORJITTER_S = 0.4  # colorjitter saturation
    _C.INPUT.COLORJITTER_H = 0.1  # colorjitter hue
    _C.INPUT.RGS_P = 0.2  # randomgrayscale probability
    _C.INPUT.GB_P = 0.5  # gaussian_blur probability
    _C.INPUT.GB_K = 21  # gaussian_blur kernel size

    _C.DATASET = CN()
    _C.DATASET.ROOT = ""  # folder holding the dataset folders (oxford_pets/, eurosat/, …)
    _C.DATASET.NAME = ""  # registry name: OxfordPets, EuroSAT, ImageNet, …
    _C.DATASET.SOURCE_DOMAINS = ()  # DA/DG leftover, accepted and ignored
    _C.DATASET.TARGET_DOMAINS = ()  # DA/DG leftover, accepted and ignored
    _C.DATASET.NUM_LABELED = -1  # SSL leftover, accepted and ignored
    _C.DATASET.NUM_SHOTS = -1  # K images per class for training (val gets min(K, 4)); <= 0 uses the full split
    _C.DATASET.VAL_PERCENT = 0.1  # Dassl leftover, accepted and ignored
    _C.DATASET.STL10_FOLD = -1  # Dassl leftover, accepted and ignored
    _C.DATASET.CIFAR_C_TYPE = ""  # Dassl leftover, accepted and ignored
    _C.DATASET.CIFAR_C_LEVEL = 1  # Dassl leftover, accepted and ignored
    _C.DATASET.ALL_AS_UNLABELED = False  # Dassl leftover, accepted and ignored
    _C.DATASET.SUBSAMPLE_CLASSES = "all"  # all | base (first ceil(C/2) labels) | new (the rest); relabelled from 0
    # [vltune] True accepts a class with no train image as Dassl does (it silently drops the class and shifts the
    # base/new cut); False (default) stops before training, naming the class and the split file
    _C.DATASET.ALLOW_MISSING_CLASSES = False

    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = 4  # loader worker processes (0 loads in the main process)
    _C.DATALOADER.K_TRANSFORMS = 1  # augmented views per training image (CoPrompt uses 2)
    _C.DATALOADER.RETURN_IMG0 = False  # also return the un-augmented image as img0
    _C.DATALOADER.TRAIN_X = CN()
    _C.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"  # RandomSampler | SequentialSampler
    _C.DATALOADER.TRAIN_X.BATCH_SIZE = 32  # training batch size
    _C.DATALOADER.TRAIN_X.N_DOMAIN = 0  # Dassl leftover
    _C.DATALOADER.TRAIN_X.N_INS = 16  # Dassl leftover
    _C.DATALOADER.TRAIN_U = CN()
    _C.DATALOADER.TRAIN_U.SAME_AS_X = True  # Dassl leftover
    _C.DATALOADER.TRAIN_U.SAMPLER = "RandomSampler"  # Dassl leftover
    _C.DATALOADER.TRAIN_U.BATCH_SIZE = 32  # Dassl leftover
    _C.DATALOADER.TRAIN_U.N_DOMAIN = 0  # Dassl leftover
    _C.DATALOADER.TRAIN_U.N_INS = 16  # Dassl leftover
    _C.DATALOADER.TEST = CN()
    _C.DATALOADER.TEST.SAMPLER = "SequentialSampler"  # evaluation sampler
    _C.DATALOADER.TEST.BATCH_SIZE = 32  # evaluation batch size

    _C.MODEL = CN()
    _C.MODEL.INIT_WEIGHTS = ""  # optional trainable-state checkpoint loaded after build_model
    _C.MODEL.BACKBONE = CN()
    _C.MODEL.BACKBONE.NAME = ""  # CLIP architecture: Dassl names (ViT-B/16, RN50, …) or open_clip names
    # [vltune] an open_clip pretrained tag of the architecture (laion2b_s34b_b88k), fetched through open_clip's
    # cache; "" loads WEIGHTS or OpenAI's file (Dassl's bool here meant "load ImageNet weights")
    _C.MODEL.BACKBONE.PRETRAINED = ""
    _C.MODEL.BACKBONE.WEIGHTS = ""  # [vltune] local weights file (OpenAI JIT, state dict, open_clip checkpoint)
    # [vltune] cut text to its last EOT token (same features, ~3x cheaper prompts); False runs all 77 positions
    # as the public reference code does (benchmarks/efficiency.py's upstream-style rows)
    _C.MODEL.BACKBONE.TRUNCATE_TEXT = True
    _C.MODEL.HEAD = CN()
    _C.MODEL.HEAD.NAME = ""  # Dassl leftover, unused by CLIP trainers
    _C.MODEL.HEAD.HIDDEN_LAYERS = ()  # Dassl leftover
    _C.MODEL.HEAD.ACTIVATION = "relu"  # Dassl leftover
    _C.MODEL.HEAD.BN = True  # Dassl leftover
    _C.MODEL.HEAD.DROPOUT = 0.0  # Dassl leftover

    _C.OPTIM = CN()
    _C.OPTIM.NAME = "adam"  # sgd | adam | adamw | amsgrad | rmsprop | radam
    _C.OPTIM.LR = 0.0003  # base learning rate
    _C.OPTIM.WEIGHT_DECAY = 5e-4  # L2 weight decay (decoupled for adamw)
    _C.OPTIM.MOMENTUM = 0.9  # sgd/rmsprop momentum
    _C.OPTIM.SGD_DAMPNING = 0  # sgd dampening
    _C.OPTIM.SGD_NESTEROV = False  # sgd nesterov
    _C.OPTIM.RMSPROP_ALPHA = 0.99  # rmsprop smoothing
    _C.OPTIM.ADAM_BETA1 = 0.9  # adam beta1
    _C.OPTIM.ADAM_BETA2 = 0.999  # adam beta2
    _C.OPTIM.ADAM_EPS = 1e-8  # [vltune] adam epsilon (TCP needs 1e-3 under fp16)
    _C.OPTIM.STAGED_LR = False  # Dassl staged LR: NEW_LAYERS get LR, the rest LR * BASE_LR_MULT
    _C.OPTIM.NEW_LAYERS = ()  # module names that count as new layers for STAGED_LR
    _C.OPTIM.BASE_LR_MULT = 0.1  # LR multiplier of the non-new layers
    _C.OPTIM.LR_SCHEDULER = "single_step"  # single_step | multi_step | cosine | linear | constant
    _C.OPTIM.STEPSIZE = (-1,)  # step epochs for single_step / multi_step
    _C.OPTIM.GAMMA = 0.1  # decay factor of single_step / multi_step
    _C.OPTIM.MAX_EPOCH = 10  # training epochs
    _C.OPTIM.WARMUP_EPOCH = -1  # warmup epochs (<= 0: none)
    _C.OPTIM.WARMUP_TYPE = "linear"  # constant (hold WARMUP_CONS_LR) | linear (ramp from WARMUP_MIN_LR)
    _C.OPTIM.WARMUP_CONS_LR = 1e-5  # LR during constant warmup
    _C.OPTIM.WARMUP_MIN_LR = 1e-5  # start LR of linear warmup
    _C.OPTIM.WARMUP_RECOUNT = True  # the main schedule starts counting after warmup
    _C.OPTIM.MAX_GRAD_NORM = 0.0  # [vltune] clip the gradient norm of the trainable set (<= 0: off)

    _C.TRAIN = CN()
    _C.TRAIN.CHECKPOINT_FREQ = 0  # also save every N epochs (0: only the last epoch)
    _C.TRAIN.RESUME_CHECKPOINT = True  # [vltune] also save after every epoch so a killed run resumes (newest kept)
    _C.TRAIN.PRINT_FREQ = 10  # log a training line (and a metrics.jsonl step line) every N batches
    _C.TRAIN.TENSORBOARD = True  # [vltune] also write the curves as TensorBoard events in OUTPUT_DIR/tensorboard
    _C.TRAIN.COUNT_ITER = "train_x"  # Dassl leftover

    _C.TEST = CN()
    _C.TEST.EVALUATOR = "Classification"  # evaluator registry name
    _C.TEST.PER_CLASS_RESULT = False  # print per-class accuracy lines
    _C.TEST.COMPUTE_CMAT = False  # save the confusion matrix to cmat.pt
    _C.TEST.NO_TEST = False  # skip the final test
    _C.TEST.SPLIT = "test"  # test | val
    _C.TEST.FINAL_MODEL = "last_step"  # last_step | best_val

    _C.TRAINER = CN()
    _C.TRAINER.NAME = ""  # trainer registry name (CoOp, ZeroshotCLIP, …)
    _C.TRAINER.PREC = "fp16"  # precision of every trainer whose own node leaves PREC empty: fp16 (CUDA) | amp | fp32
    return _C
