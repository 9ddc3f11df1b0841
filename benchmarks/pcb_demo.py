"""PCB on the synthetic set: configs/demo_bot.yml with MODEL.HEAD 'pcb', against an mAP target.

The demo recipe (ResNet-18 from scratch, BNNeck-free PCB head here, CE + triplet + center loss,
16 epochs) with layumi's six horizontal stripes. PCB needs a feature map at least as high as
the number of stripes; ResNet-18 with last stride 1 gives H/16 rows, so the default input is
96x48 (6 x 3 map, the demo's 2:1 aspect as layumi's 384x192).

    python benchmarks/pcb_demo.py                      # 6 parts at 96x48, target mAP 0.60
    python benchmarks/pcb_demo.py --parts 4 --size 64 32
    python benchmarks/pcb_demo.py --opts SOLVER.MAX_EPOCHS 8

Prints the final mAP / rank-1, the wall time, and whether the target was reached (exit status
1 when not).
"""

from __future__ import annotations

import sys

from target_demo import demo_parser, train_against_target


def main(argv: list[str] | None = None) -> int:
    parser = demo_parser(__doc__, "pcb_demo", (96, 48), 0.60)
    parser.add_argument("--parts", type=int, default=6)
    args = parser.parse_args(argv)
    return train_against_target("pcb_demo", "demo_bot.yml",
                                ["MODEL.HEAD", "pcb", "MODEL.PCB_PARTS", str(args.parts)],
                                args, parts=args.parts)


if __name__ == "__main__":
    sys.exit(main())
