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
# extension: the format of TEST.WEIGHT / FeatureExtractor weights: 'auto' (detected from the keys),
# 'strongreid', or a registered foreign format (strongreid.modeling.formats.CHECKPOINT_FORMATS).
# Checked when a checkpoint is loaded, since formats register themselves below the config.
_C.MODEL.CHECKPOINT_FORMAT = "auto"
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
# extension: BatchNorm statistics over all ranks under torchrun (SyncBatchNorm on CUDA).
# 'auto' = on when the world is larger than 1, so torchrun trains the single-process recipe;
# 'off' keeps per-rank statistics (faster, another recipe) | 'on'
_C.MODEL.SYNC_BN = "auto"
# extension: mixed precision. 'auto' = bf16 on a CPU with native bf16 (AMX/AVX512-BF16) and
# fp16 with GradScaler on CUDA; 'off' | 'bf16' | 'fp16'
_C.MODEL.AMP = "auto"
# extension: 'auto' (on where it is measured to help: CUDA and CPU) | 'on' | 'off'
_C.MODEL.CHANNELS_LAST = "auto"
# extension: wrap the model in torch.compile
_C.MODEL.COMPILE = False
# extension (layumi heads, modeling/heads/class_block.py, heads/pcb.py): 'baseline' (BNNeck or not, as MODEL.NECK says)
# | 'layumi' (layumi's ClassBlock: Linear -> BN -> (LeakyReLU) -> Dropout -> classifier; the
# test feature is the LINEAR_NUM-d embedding) | 'pcb' (PCB_PARTS horizontal stripes, one
# ClassBlock each; test feature: the part-normalised concatenation). MODEL.NECK and
# TEST.NECK_FEAT apply to 'baseline' only. 'torchreid' (modeling/heads/torchreid_fc.py): torchreid's
# fc head, Linear(LINEAR_NUM) -> BN -> ReLU (none at LINEAR_NUM 0) -> classifier with bias; the
# test feature is the fc output.
_C.MODEL.HEAD = "baseline"
# ClassBlock / torchreid fc width (layumi --linear_num; 0 = no Linear, BN on the backbone feature)
_C.MODEL.LINEAR_NUM = 512
# ClassBlock dropout before the classifier (layumi --droprate); PCB's stripe dropout too
_C.MODEL.DROPRATE = 0.5
# LeakyReLU(0.1) after the ClassBlock BN (layumi's relu=True; its models use False)
_C.MODEL.HEAD_RELU = False
# PCB stripes and the width of each stripe's ClassBlock embedding (layumi: 6 and 256)
_C.MODEL.PCB_PARTS = 6
_C.MODEL.PCB_LINEAR_NUM = 256
# extension: keyword arguments for timm.create_model of a 'timm:<name>' backbone, as a YAML
# mapping (in a yml) or its text (on the command line), e.g. {drop_path_rate: 0.2} (layumi's
# Swin/ConvNeXt), {dynamic_img_size: true}. img_size defaults to INPUT.SIZE_TRAIN for the models
# that take one (ViT, DeiT, DINO, Swin, SwinV2): they train at ReID sizes, position embeddings
# of ImageNet weights interpolated.
_C.MODEL.TIMM_KWARGS = ""
# extension: AGW's non-local blocks in a ResNet backbone, after the last NL_LAYERS[k] blocks of
# layer{k+1} (AGW / fast-reid ResNet-50: [0, 2, 3, 0]); NL_INTER_CHANNELS: the width of theta /
# phi / g (fast-reid's code: 1; 0 = C/2, the Non-local paper's)
_C.MODEL.NON_LOCAL = False
_C.MODEL.NL_LAYERS = [0, 2, 3, 0]
_C.MODEL.NL_INTER_CHANNELS = 1
# --- extension: loss zoo (docs/losses.md) ----------------------------------------------------
# MODEL.METRIC_LOSS_TYPE above also takes 'circle', 'contrastive', 'lifted', 'instance', 'wrt'
# and comma-separated combinations (e.g. 'triplet,circle'; add ',center' with IF_WITH_CENTER).
# ID loss: 'softmax' (bias-free classifier + CE / label smoothing, the original) | 'arcface' |
# 'cosface' | 'sphereface' | 'circle' (circle softmax). The margin types replace the classifier
# with a cosine classifier (same weight key) and add their margin before the cross-entropy.
_C.MODEL.ID_LOSS_TYPE = "softmax"
# ArcFace s and additive angular margin m (radians; 0.5 = pytorch-metric-learning's 28.6 degrees)
_C.MODEL.ARCFACE_SCALE = 64.0
_C.MODEL.ARCFACE_MARGIN = 0.5
# CosFace s and additive cosine margin m (pytorch-metric-learning's defaults, as layumi)
_C.MODEL.COSFACE_SCALE = 64.0
_C.MODEL.COSFACE_MARGIN = 0.35
# SphereFace on the normalised feature: scale s, integer angular margin m (layumi: m 4)
_C.MODEL.SPHEREFACE_SCALE = 30.0
_C.MODEL.SPHEREFACE_MARGIN = 4
# Circle softmax (classification circle loss): fast-reid's SBS recipe uses s 64, m 0.35
_C.MODEL.CIRCLE_SOFTMAX_SCALE = 64.0
_C.MODEL.CIRCLE_SOFTMAX_MARGIN = 0.35

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
#; 'zero' fills 0 after normalisation (the mean pixel); 'random' fills N(0, 1).
_C.INPUT.RE_SL = 0.02
_C.INPUT.RE_SH = 0.4
_C.INPUT.RE_R1 = 0.3
_C.INPUT.RE_FILL = "original"
# --- extension: layumi / fast-reid augmentation (data/transforms.py) --------------------------
# colour jitter first in the train pipeline (layumi --color_jitter) with
# [brightness, contrast, saturation, hue] (layumi: 0.1, 0.1, 0.1, 0)
_C.INPUT.COLOR_JITTER = False
_C.INPUT.CJ_PARAMS = [0.1, 0.1, 0.1, 0.0]
# probability of torchvision's AutoAugment (ImageNet policy) per image; 0 = off (SBS: 0.1)
_C.INPUT.AUTOAUG_PROB = 0.0

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
# extension, layumi compatibility (docs/coming-from-layumi.md):
# 'off' | 'first': hold out the first image (path order) of each training identity as a
# validation split (layumi's val/; the `layumi` dataset uses its own val/ folder); its loss and
# top-1 error are logged each epoch as {"type": "val"} rows of metrics.jsonl
_C.DATASETS.VALIDATION = "off"
# keep the validation images in the training split too (layumi --train_all); the `layumi`
# dataset reads train_all/ instead of train/
_C.DATASETS.TRAIN_ALL = False
# VehicleID test list: 800 | 1600 | 2400 vehicles
_C.DATASETS.VEHICLEID_TEST_SIZE = 800

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
# --- extension: data checks and the data path (docs/data-path.md) ---
# Check every image before training and evaluation, naming all bad files at once:
# 'header' (format, size, end marker: cheap) | 'full' (decode every image) | 'off'
_C.DATALOADER.CHECK_IMAGES = "header"
# JPEG decoder: 'auto' (simplejpeg, PyTurboJPEG, then torchvision.io: the first installed one that
# decodes to Pillow's exact pixels; else Pillow) | 'pil' | 'torchvision' | 'simplejpeg' | 'turbojpeg'
_C.DATALOADER.JPEG_DECODER = "auto"
# Training data path: 'pil' (per-image PIL transforms in loader workers, the original) |
# 'device' (decoded-image cache + batched flip/pad/crop/erasing/normalisation on the training
# device, with the PIL path's per-image random decisions)
_C.DATALOADER.DATA_PATH = "pil"
# Where the 'device' path keeps its uint8 memmap caches; '' = DATASETS.ROOT_DIR/.strongreid_cache
_C.DATALOADER.CACHE_DIR = ""

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
# extension: triplet loss mines over the batches of all ranks (all_gather with gradient).
# 'auto' = on when the world is larger than 1 (the single-process recipe) | 'on' | 'off'
_C.SOLVER.TRIPLET_GATHER = "auto"
# --- extension: layumi / fast-reid training options (docs/coming-from-layumi.md) -------------
# lr multiplier of the backbone's parameters (layumi trains the backbone at 0.1x the head's lr)
_C.SOLVER.BACKBONE_LR_FACTOR = 1.0
# Nesterov momentum for SGD (layumi: on)
_C.SOLVER.NESTEROV = False
# the backbone trains at lr 0 for the first N epochs (fast-reid SBS's FREEZE_ITERS, in epochs)
_C.SOLVER.FREEZE_BACKBONE_EPOCHS = 0
# SCHED 'cosine': the base lr (after warm-up) for the first N epochs, warm-up included, then the
# cosine over the remaining ones (fast-reid SBS's DELAY_EPOCHS)
_C.SOLVER.COSINE_DELAY_EPOCHS = 0
# weight averaging of the model over the last part of training, saved as averaged.pt:
# 'off' | 'ema' (exponential, decay WA_EMA_DECAY per epoch: layumi --wa, 0.996) | 'swa'
# (equal-weight mean, torch.optim.swa_utils); BN statistics recomputed on the training set
_C.SOLVER.WA = "off"
# first epoch averaged, as a fraction of MAX_EPOCHS (layumi: from 0.8 x total epochs)
_C.SOLVER.WA_START = 0.8
_C.SOLVER.WA_EMA_DECAY = 0.996
# --- extension: loss zoo (docs/losses.md); SOLVER.TRIPLET_GATHER gathers every pair loss ------
# Triplet miner: 'batch_hard' (the original, raw Euclidean distances) | 'multi_similarity'
# (layumi: pytorch-metric-learning's MultiSimilarityMiner + TripletMarginLoss, normalised
# features; the margin is SOLVER.MARGIN)
_C.SOLVER.TRIPLET_MINER = "batch_hard"
_C.SOLVER.MS_MINER_EPSILON = 0.1
# Pair-wise circle loss: m and gamma (layumi 0.25 / 32; fast-reid 0.25 / 128); reduction
# 'anchor' (per-anchor mean: paper, fast-reid, pytorch-metric-learning) | 'batch' (layumi)
_C.SOLVER.CIRCLE_MARGIN = 0.25
_C.SOLVER.CIRCLE_GAMMA = 32.0
_C.SOLVER.CIRCLE_REDUCTION = "anchor"
_C.SOLVER.CIRCLE_LOSS_WEIGHT = 1.0
# Contrastive loss on normalised distances (layumi: pos 0, neg 1)
_C.SOLVER.CONTRASTIVE_POS_MARGIN = 0.0
_C.SOLVER.CONTRASTIVE_NEG_MARGIN = 1.0
_C.SOLVER.CONTRASTIVE_LOSS_WEIGHT = 1.0
# Generalised lifted structure loss on normalised distances (layumi: pos 0, neg 1)
_C.SOLVER.LIFTED_POS_MARGIN = 0.0
_C.SOLVER.LIFTED_NEG_MARGIN = 1.0
_C.SOLVER.LIFTED_LOSS_WEIGHT = 1.0
# Instance loss: cosine scale gamma (layumi --ins_gamma 32); target 'image' (each image its own
# class) | 'layumi' (layumi's / pytorch-metric-learning's label-rank target, see docs)
_C.SOLVER.INSTANCE_GAMMA = 32.0
_C.SOLVER.INSTANCE_TARGET = "image"
_C.SOLVER.INSTANCE_LOSS_WEIGHT = 1.0
# Weighted regularised triplet (AGW): no margin
_C.SOLVER.WRT_LOSS_WEIGHT = 1.0

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
# extension, layumi compatibility (docs/coming-from-layumi.md):
# multi-query (Market protocol): a query's feature is the mean of the test dataset's
# multi-query images (Market gt_bbox/, layumi multi-query/) of its identity and camera
_C.TEST.MULTI_QUERY = False
# multi-scale test as layumi's --ms: each value s resizes the image by sqrt(s) per side
# (bicubic) and the features of all scales (and flips) are averaged; [1.0] = one scale
_C.TEST.MULTI_SCALE = [1.0]
# extension: precision of test-time features (`test`, `extract`, FeatureExtractor, evaluation
# during training): 'fp32' (the default: what the exported ONNX / TorchScript graphs compute and
# what the peers' test scripts do) | 'amp' (autocast as MODEL.AMP says, e.g. bf16 on a CPU with
# AMX / AVX512-BF16; docs/deploy.md has the measured mAP effect and speed)
_C.TEST.PRECISION = "fp32"

# ---------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------
# '' means runs/default
_C.OUTPUT_DIR = ""

# ---------------------------------------------------------------------------------------------
# extension: fast-reid's BoT differences (docs/ablation.md). The defaults are the
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
# precision of the baseline head (pooling, BNNeck, classifier) under MODEL.AMP: 'amp' (the
# autocast dtype, as the backbone) | 'fp32' (the head leaves autocast; same cost, less rounding)
_C.MODEL.HEAD_PRECISION = "amp"

# ---------------------------------------------------------------------------------------------
# extension: SOLIDER's Swin (MODEL.HEAD 'solider', MODEL.NAME solider_swin_{tiny,small,base};
# modeling/backbones/solider_swin.py, modeling/heads/solider.py)
# ---------------------------------------------------------------------------------------------
# lambda of SOLIDER's semantic controller in [0, 1] (0.2: SOLIDER-REID's ReID results);
# negative: a Swin without the controller
_C.MODEL.SEMANTIC_WEIGHT = 0.2
# stochastic-depth rate of the last Swin block (0 for the first, linear in between; SOLIDER 0.1)
_C.MODEL.DROP_PATH = 0.1

# extension: learning without identity labels (strongreid.adapt, docs/adaptation.md). With
# ENABLED the training split's identity labels are never read: every epoch the features of all
# its images are clustered (k-reciprocal Jaccard distance -> DBSCAN) into pseudo-identities,
# and MODEL.METRIC_LOSS_TYPE 'cluster_memory' trains against their centroids.
# ---------------------------------------------------------------------------------------------
_C.ADAPT = CN()
_C.ADAPT.ENABLED = False
# DBSCAN: neighbourhood radius on the Jaccard distance and the points a core point needs
_C.ADAPT.EPS = 0.6
_C.ADAPT.MIN_SAMPLES = 4
# k-reciprocal neighbours (k1) and the query-expansion neighbours (k2) of the Jaccard distance
_C.ADAPT.K1 = 30
_C.ADAPT.K2 = 6
# the cluster memory: InfoNCE temperature and the centroid momentum
_C.ADAPT.TEMP = 0.05
_C.ADAPT.MOMENTUM = 0.2
# within-camera tracklets (the training records' (pid, camid) pairs): 'off' (the pid is never
# read) | 'must_link' (a tracklet is never split by the clustering)
_C.ADAPT.TRACKLETS = "off"
# iterations per epoch (the P x K batches over the pseudo-identities are drawn again as needed)
_C.ADAPT.ITERS = 50
# recompute the BatchNorm statistics on the training images before the first clustering (AdaBN)
_C.ADAPT.RESET_BN = False
# cluster camera-centred features: each camera's mean feature is removed before the distance,
# so that what a camera adds to all its images (its light, height, background) does not group
# them; the memory's centroids stay those of the features themselves
_C.ADAPT.CAMERA_CENTER = False
_C.SOLVER.CLUSTER_MEMORY_LOSS_WEIGHT = 1.0
# extension: the feature the metric terms (triplet, cluster_memory...) train with, MODEL.HEAD
# 'baseline' with MODEL.NECK 'bnneck': 'before' the BNNeck (Luo et al.) | 'after' it (as
# cluster-contrast's memory, which also clusters the BN feature)
_C.MODEL.METRIC_FEAT = "before"
