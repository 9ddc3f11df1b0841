"""The configuration tree.

Every key of reid-strong-baseline's `config/defaults.py` is here with the same name and
default, so a yml written for it loads unchanged. Our extensions sit beside them under
names of their own and are marked "extension" below.
"""

from __future__ import annotations

from yacs.config import CfgNode as CN

_C = CN()

# ---------------------------------------------------------------------------------------------
# MODEL
# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
# 'cuda', 'cpu' or 'auto' (auto: cuda when present). A missing GPU falls back to CPU with a warning.
_C.MODEL.DEVICE = "cuda"
# Kept for old configs. We never set CUDA_VISIBLE_DEVICES ourselves: 'cuda' with DEVICE_ID 'k'
# means cuda:k in a single-process run; torchrun ranks use LOCAL_RANK.
_C.MODEL.DEVICE_ID = "0"
_C.MODEL.NAME = "resnet50"
_C.MODEL.LAST_STRIDE = 1
_C.MODEL.PRETRAIN_PATH = ""
# 'imagenet' | 'self' | 'none' (extension: 'none' is random initialisation)
_C.MODEL.PRETRAIN_CHOICE = "imagenet"
# 'bnneck' | 'no'
_C.MODEL.NECK = "bnneck"
# 'yes' | 'no' (YAML booleans accepted)
_C.MODEL.IF_WITH_CENTER = "no"
# 'triplet' | 'center' | 'triplet_center'
_C.MODEL.METRIC_LOSS_TYPE = "triplet"
# 'on' | 'off' (YAML booleans accepted)
_C.MODEL.IF_LABELSMOOTH = "on"
# extension: label-smoothing epsilon (the original hard-codes 0.1, with the eps/C convention)
_C.MODEL.LABEL_SMOOTH_EPSILON = 0.1
# extension: 'avg' (global average pooling, the paper) | 'gem' (generalised mean)
_C.MODEL.POOLING = "avg"
_C.MODEL.GEM_P = 3.0
# extension: convert BatchNorm to SyncBatchNorm under torchrun
_C.MODEL.SYNC_BN = False
# extension: mixed precision. 'auto' = bf16 on a CPU with native bf16 (AMX/AVX512-BF16) and
# fp16 with GradScaler on CUDA; 'off' | 'bf16' | 'fp16'
_C.MODEL.AMP = "auto"
# extension: 'auto' (on where it is measured to help: CUDA and CPU) | 'on' | 'off'
_C.MODEL.CHANNELS_LAST = "auto"
# extension: wrap the model in torch.compile
_C.MODEL.COMPILE = False

# ---------------------------------------------------------------------------------------------
# INPUT
# ---------------------------------------------------------------------------------------------
_C.INPUT = CN()
_C.INPUT.SIZE_TRAIN = [384, 128]
_C.INPUT.SIZE_TEST = [384, 128]
_C.INPUT.PROB = 0.5
_C.INPUT.RE_PROB = 0.5
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
_C.INPUT.PADDING = 10
# extension: random-erasing area range, minimum aspect ratio and fill.
# RE_FILL 'original' writes PIXEL_MEAN into the normalised tensor as reid-strong-baseline does
# (spec §6); 'zero' fills 0 after normalisation (the mean pixel); 'random' fills N(0, 1).
_C.INPUT.RE_SL = 0.02
_C.INPUT.RE_SH = 0.4
_C.INPUT.RE_R1 = 0.3
_C.INPUT.RE_FILL = "original"

# ---------------------------------------------------------------------------------------------
# DATASETS
# ---------------------------------------------------------------------------------------------
_C.DATASETS = CN()
# One name, or several (a list, or a comma-separated string) for combined training.
_C.DATASETS.NAMES = "market1501"
_C.DATASETS.ROOT_DIR = "./data"
# extension: the dataset to evaluate on; '' = the first of NAMES
_C.DATASETS.TEST_NAME = ""
# extension: MSMT17 adds list_val to the training split
_C.DATASETS.MSMT17_MERGE_VAL = False
# extension: CUHK03-NP images: 'labeled' | 'detected'
_C.DATASETS.CUHK03_KIND = "labeled"
# extension: generic loaders ('folder', 'list'): a folder relative to ROOT_DIR, or list files
_C.DATASETS.LIST_TRAIN = ""
_C.DATASETS.LIST_QUERY = ""
_C.DATASETS.LIST_GALLERY = ""

# ---------------------------------------------------------------------------------------------
# DATALOADER
# ---------------------------------------------------------------------------------------------
_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 8
# 'softmax' (shuffled) | 'triplet' | 'softmax_triplet' (P x K identity sampler)
_C.DATALOADER.SAMPLER = "softmax"
_C.DATALOADER.NUM_INSTANCE = 16
# extension: skip images that cannot be decoded (counted and reported) instead of failing
_C.DATALOADER.SKIP_CORRUPT = False

# ---------------------------------------------------------------------------------------------
# SOLVER
# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER_NAME = "Adam"
_C.SOLVER.MAX_EPOCHS = 50
_C.SOLVER.BASE_LR = 3e-4
_C.SOLVER.BIAS_LR_FACTOR = 2
_C.SOLVER.MOMENTUM = 0.9
# None (YAML null or 'None' on the command line) selects the soft-margin triplet loss
_C.SOLVER.MARGIN = 0.3
_C.SOLVER.CLUSTER_MARGIN = 0.3  # unused by reid-strong-baseline too; kept so old ymls load
_C.SOLVER.CENTER_LR = 0.5
_C.SOLVER.CENTER_LOSS_WEIGHT = 0.0005
_C.SOLVER.RANGE_K = 2  # unused (dead in the original)
_C.SOLVER.RANGE_MARGIN = 0.3  # unused
_C.SOLVER.RANGE_ALPHA = 0  # unused
_C.SOLVER.RANGE_BETA = 1  # unused
_C.SOLVER.RANGE_LOSS_WEIGHT = 1  # unused
_C.SOLVER.WEIGHT_DECAY = 0.0005
_C.SOLVER.WEIGHT_DECAY_BIAS = 0.0
_C.SOLVER.GAMMA = 0.1
# Milestones in epochs.
_C.SOLVER.STEPS = (30, 55)
_C.SOLVER.WARMUP_FACTOR = 1.0 / 3
# Warm-up length in EPOCHS despite the name (the original steps its scheduler once per epoch).
_C.SOLVER.WARMUP_ITERS = 500
_C.SOLVER.WARMUP_METHOD = "linear"
_C.SOLVER.CHECKPOINT_PERIOD = 50
_C.SOLVER.LOG_PERIOD = 100
_C.SOLVER.EVAL_PERIOD = 50
_C.SOLVER.IMS_PER_BATCH = 64
# extension: 'multistep' (WarmupMultiStepLR, the original) | 'cosine' (warm-up then cosine)
_C.SOLVER.SCHED = "multistep"
_C.SOLVER.COSINE_MIN_LR_FACTOR = 0.01
# extension: seed for Python, NumPy, torch and the loader workers
_C.SOLVER.SEED = 0
# extension: torch deterministic algorithms (slower)
_C.SOLVER.DETERMINISTIC = False
# extension: weights of the ID and triplet terms (the original fixes both at 1)
_C.SOLVER.ID_LOSS_WEIGHT = 1.0
_C.SOLVER.TRIPLET_LOSS_WEIGHT = 1.0
# extension: clip the global gradient norm (0 = off)
_C.SOLVER.GRAD_CLIP = 0.0
# extension: multiply BASE_LR by (global batch / SOLVER.LR_REFERENCE_BATCH) (off by default)
_C.SOLVER.SCALE_LR = False
_C.SOLVER.LR_REFERENCE_BATCH = 64
# extension: triplet loss mines over the batches of all ranks (all_gather with gradient)
_C.SOLVER.TRIPLET_GATHER = False

# ---------------------------------------------------------------------------------------------
# TEST
# ---------------------------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.IMS_PER_BATCH = 128
# 'yes' | 'no'
_C.TEST.RE_RANKING = "no"
_C.TEST.WEIGHT = ""
# 'after' | 'before'
_C.TEST.NECK_FEAT = "after"
# 'yes' | 'no'
_C.TEST.FEAT_NORM = "yes"
# extension: k-reciprocal re-ranking parameters
_C.TEST.RE_RANKING_K1 = 20
_C.TEST.RE_RANKING_K2 = 6
_C.TEST.RE_RANKING_LAMBDA = 0.3
# extension: average the features of the image and its horizontal flip
_C.TEST.FLIP_AUG = False
# extension: average query expansion (alpha-QE)
_C.TEST.QUERY_EXPANSION = False
_C.TEST.QE_K = 5
_C.TEST.QE_ALPHA = 3.0
# extension: 'euclidean' (squared, as the original) | 'cosine'
_C.TEST.METRIC = "euclidean"
# extension: AP convention 'plain' (non-interpolated) | 'trapezoid' (official Market script)
_C.TEST.AP = "plain"
# extension: queries without a valid match: 'skip' (common convention) | 'fail' (count as miss)
_C.TEST.UNMATCHED = "skip"
_C.TEST.MAX_RANK = 50
# extension: CUHK03 single-gallery-shot CMC (one random gallery image per identity, 10 seeded
# repeats; AP stays on the full list). For the classic CUHK03 protocol; CUHK03-NP uses Market's.
_C.TEST.CUHK03_METRIC = False
# extension: evaluate during training with re-ranking as well
_C.TEST.EVAL_RE_RANKING = False

# ---------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------
# '' means runs/default
_C.OUTPUT_DIR = ""

# ---------------------------------------------------------------------------------------------
# extension: fast-reid's BoT differences (issue 14, docs/ablation.md). The defaults are the
# original's behaviour; configs/demo.yml turns on what the ablation measured to help.
# ---------------------------------------------------------------------------------------------
# When the LR schedule moves: 'epoch' (once per epoch, the original), 'iter' (the same warm-up
# and decay evaluated at the fractional epoch before every iteration), 'warmup' (warm-up per
# iteration, decay per epoch: fast-reid's WarmupLR + per-epoch lr_sched).
_C.SOLVER.LR_STEP_UNIT = "epoch"
# std of the BNNeck classifier's N(0, std^2) weights: 0.001 the original, 0.01 fast-reid
_C.MODEL.CLASSIFIER_INIT_STD = 0.001
# zero the scale of the last BN in every residual block (Goyal et al. 2017) when training from
# random init, so each block starts as the identity; neither the original nor fast-reid do it
_C.MODEL.ZERO_INIT_RESIDUAL = False
# resize filter of the train and test transforms: 'bilinear' (the original) | 'bicubic' (fast-reid)
_C.INPUT.INTERPOLATION = "bilinear"
