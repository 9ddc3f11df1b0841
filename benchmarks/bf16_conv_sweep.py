"""Which bf16 convolutions this CPU gets wrong: a sweep of 3x3 convolutions, bf16 against fp32.

    python benchmarks/bf16_conv_sweep.py
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/bf16_conv_sweep.py   # without AMX

With torch 2.14.1 on an AMX CPU, oneDNN's bf16 3x3 stride-2 convolution of a 4 x 2 feature map
returned wrong values, zeros or NaN (15 of the 400 shapes below, all of them 4 x 2 at stride
2; none with AMX turned off). That is why engine/inference.test_feature and the Trainer check
mixed-precision features against fp32 once per input shape (runtime.autocast_agrees).
Prints every shape whose relative error exceeds 2 % (bf16 rounding gives about 0.3 %).
"""

from __future__ import annotations

import argparse

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bad, total = [], 0
    for c_in, c_out in [(64, 128), (128, 256), (256, 512), (64, 64), (128, 128)]:
        for stride in (1, 2):
            for h, w in [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (6, 3), (8, 4), (16, 8)]:
                for n in (1, 2, 4, 8, 16):
                    conv = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False).eval()
                    x = torch.randn(n, c_in, h, w)
                    with torch.no_grad():
                        ref = conv(x)
                        got = torch.nn.functional.conv2d(x.bfloat16(), conv.weight.bfloat16(), None, stride, 1).float()
                    err = float((got - ref).norm() / ref.norm())
                    total += 1
                    if not err < 0.02:  # `not <` so that NaN counts
                        bad.append((n, c_in, h, w, c_out, stride, err))
    print(f"{len(bad)} of {total} shapes wrong in bf16 (relative error over 2 %)")
    for n, c_in, h, w, c_out, stride, err in bad:
        print(f"  input {n} x {c_in} x {h} x {w} -> {c_out} channels, stride {stride}: relative error {err:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
