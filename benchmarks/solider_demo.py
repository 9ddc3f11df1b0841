"""SOLIDER's Swin on the synthetic set: configs/solider_swin_base.yml at a reduced size, against an mAP target.

The recipe's head, losses, pixel statistics and semantic controller (lambda 0.2) on
`solider_swin_tiny` trained from scratch (SOLIDER's LUP1M weights cannot be downloaded here) at
64x32, a few epochs, with AdamW 0.001 (cosine to 0.05x) instead of the recipe's SGD 0.0008, which
assumes the pre-trained Swin. It exercises the whole path (training, evaluation, checkpoint) on 2 CPU cores; the
published Market-1501 figures in docs/recipes.md need the pre-trained weights and a GPU.

    python benchmarks/solider_demo.py                       # 6 epochs at 64x32, target mAP 0.2
    python benchmarks/solider_demo.py --opts SOLVER.MAX_EPOCHS 12

Prints the final mAP / rank-1, the wall time, and whether the target was reached (exit status
1 when not).
"""

from __future__ import annotations

import sys

from target_demo import demo_parser, train_against_target


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__, "solider_demo", (64, 32), 0.20)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    epochs = str(args.epochs)
    return train_against_target("solider_demo", "solider_swin_base.yml", [
        "MODEL.NAME", "solider_swin_tiny", "MODEL.PRETRAIN_CHOICE", "none", "MODEL.DEVICE", "cpu",
        "INPUT.PADDING", "3", "DATASETS.NAMES", "synthetic", "DATALOADER.NUM_WORKERS", "2",
        "SOLVER.OPTIMIZER_NAME", "AdamW", "SOLVER.BASE_LR", "0.001", "SOLVER.COSINE_MIN_LR_FACTOR", "0.05",
        "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.WEIGHT_DECAY_BIAS", "0.0", "SOLVER.BIAS_LR_FACTOR", "1",
        "SOLVER.MAX_EPOCHS", epochs, "SOLVER.WARMUP_ITERS", "1", "SOLVER.WARMUP_FACTOR", "0.1",
        "SOLVER.EVAL_PERIOD", epochs, "SOLVER.CHECKPOINT_PERIOD", epochs, "SOLVER.LOG_PERIOD", "20",
        "TEST.IMS_PER_BATCH", "128",
    ], args, model="solider_swin_tiny")


if __name__ == "__main__":
    sys.exit(main())
