"""Helpers shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from yacs.config import CfgNode


def model_cfg(**overrides) -> CfgNode:
    """Defaults with a random-init ResNet-18; overrides as SECTION__KEY=value."""
    from strongreid.config import get_cfg_defaults

    cfg = get_cfg_defaults()
    cfg.MODEL.NAME = "resnet18"
    cfg.MODEL.PRETRAIN_CHOICE = "none"
    for key, value in overrides.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    return cfg


def tiny_train_opts(root: Path, out: Path, **overrides) -> list[str]:
    """KEY VALUE overrides for a seconds-long CPU run on the tiny synthetic dataset."""
    opts = {
        "MODEL.DEVICE": "cpu",
        "MODEL.NAME": "resnet18",
        "MODEL.PRETRAIN_CHOICE": "none",
        "MODEL.AMP": "off",
        "MODEL.CHANNELS_LAST": "off",
        "MODEL.IF_WITH_CENTER": "yes",
        "MODEL.METRIC_LOSS_TYPE": "triplet_center",
        "INPUT.SIZE_TRAIN": "[64, 32]",
        "INPUT.SIZE_TEST": "[64, 32]",
        "INPUT.PADDING": "4",
        "DATASETS.NAMES": "synthetic",
        "DATASETS.ROOT_DIR": str(root),
        "DATALOADER.SAMPLER": "softmax_triplet",
        "DATALOADER.NUM_INSTANCE": "4",
        "DATALOADER.NUM_WORKERS": "0",
        "SOLVER.IMS_PER_BATCH": "16",
        "SOLVER.MAX_EPOCHS": "2",
        "SOLVER.BASE_LR": "0.002",
        "SOLVER.WARMUP_ITERS": "0",
        "SOLVER.STEPS": "[100]",
        "SOLVER.EVAL_PERIOD": "1",
        # No <MODEL.NAME>_epoch<N>.pt (134 MB each for ResNet-18 with Adam's state) unless a test
        # asks for it: last.pt and best.pt are what the tests read.
        "SOLVER.CHECKPOINT_PERIOD": "100",
        "SOLVER.LOG_PERIOD": "5",
        "TEST.IMS_PER_BATCH": "64",
        "OUTPUT_DIR": str(out),
    }
    opts.update({k: str(v) for k, v in overrides.items()})
    return [x for kv in opts.items() for x in kv]
