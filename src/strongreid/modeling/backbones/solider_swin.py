"""SOLIDER's Swin Transformer (Chen et al., CVPR 2023), as SOLIDER-REID builds it.

SOLIDER pre-trains a Swin on unlabelled people with a *semantic controller*: after each stage the
tokens are scaled and shifted by two small Linear layers of the pair (lambda, 1 - lambda),

    x <- x * softplus(W_i [lambda, 1 - lambda]) + B_i [lambda, 1 - lambda]

and lambda (MODEL.SEMANTIC_WEIGHT, 0.2 for ReID in its README) trades appearance for semantic
information at test time. The layers are frozen (the pre-training fixed them). A negative lambda
builds the network without them, as SOLIDER does.

The rest is mmseg's Swin, which SOLIDER-REID copied: patch embedding and patch merging that pad
their input at the bottom/right to a multiple of their stride, merging by `unfold` (channel-major
order), windows of 7 with the map zero-padded to a multiple of 7 (the padding takes part in the
attention, unmasked), shifted windows masked with -100. The backbone's map is the last stage's
output after `norm3`, B x C x H/32 x W/32; global average pooling of it is SOLIDER's global
feature. Parameter names are SOLIDER's (`patch_embed.projection`, `stages.2.blocks.5.attn.w_msa.qkv`,
`ffn.layers.0.0`, `stages.0.downsample.reduction`, `semantic_embed_w.1`...), so its files load by
name after the `base.` prefix. Not built, because SOLIDER's test feature never reads them:
`norm0`-`norm2` (the normalised maps of the earlier stages) and the fourth semantic layer pair
(applied after the last stage's output is taken).

Swin has no strided conv in its last stage: MODEL.LAST_STRIDE has no effect (SOLIDER ignores it too).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from strongreid.errors import ConfigError
from strongreid.modeling.backbones.base import (
    BACKBONES,
    check_last_stride,
    init_transformer_weights,
)

# name -> (embed dims, blocks per stage, heads per stage): swin_{tiny,small,base}_patch4_window7_224.
SOLIDER_SWINS = {
    "solider_swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "solider_swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "solider_swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
WINDOW = 7
PATCH = 4
DEFAULT_SEMANTIC_WEIGHT = 0.2  # SOLIDER-REID's README and run.sh for every ReID result
SOLIDER_WEIGHTS = (
    "SOLIDER's LUP1M pre-trained Swin instead (linked from github.com/tinyvision/SOLIDER; its "
    "teacher, as SOLIDER-REID's convert_model.py extracts it)"
)


def _pad_corner(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a B x C x H x W map at the bottom and right to multiples of `multiple`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class PatchEmbed(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dims, kernel_size=PATCH, stride=PATCH)
        self.norm = nn.LayerNorm(dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.projection(_pad_corner(x, PATCH))
        hw = (int(x.shape[2]), int(x.shape[3]))
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (unfold order: channel-major) -> LayerNorm -> Linear to 2C."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dims)
        self.reduction = nn.Linear(4 * dims, 2 * dims, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = hw
        fmap = _pad_corner(x.transpose(1, 2).reshape(-1, x.shape[2], h, w), 2)
        hw = (fmap.shape[2] // 2, fmap.shape[3] // 2)
        x = F.unfold(fmap, kernel_size=2, stride=2).transpose(1, 2)
        return self.reduction(self.norm(x)), hw


class WindowMSA(nn.Module):
    """Multi-head self-attention inside 7x7 windows with a learned relative-position bias."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * WINDOW - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(WINDOW), torch.arange(WINDOW), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + (WINDOW - 1)
        # Persistent, as in SOLIDER's files (the same table index as Swin's).
        self.register_buffer("relative_position_index", rel[0] * (2 * WINDOW - 1) + rel[1])
        self.qkv = nn.Linear(dims, 3 * dims)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, c = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = (attn.reshape(-1, windows, self.heads, n, n) + mask[None, :, None]).reshape(-1, self.heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)


class ShiftWindowMSA(nn.Module):
    def __init__(self, dims: int, heads: int, shift: int, drop_path: float) -> None:
        super().__init__()
        self.shift = shift
        self.w_msa = WindowMSA(dims, heads)
        self.drop = DropPath(drop_path)

    def _mask(self, hp: int, wp: int, device: torch.device) -> torch.Tensor:
        # Regions that the cyclic shift brought together may not attend to each other.
        region = torch.zeros(hp, wp, device=device)
        cuts = (slice(0, -WINDOW), slice(-WINDOW, -self.shift), slice(-self.shift, None))
        for i, rows in enumerate(cuts):
            for j, cols in enumerate(cuts):
                region[rows, cols] = 3 * i + j
        ids = self._windows(region[None, :, :, None]).reshape(-1, WINDOW * WINDOW)
        return (ids[:, None, :] - ids[:, :, None]).ne(0).float() * -100.0

    @staticmethod
    def _windows(x: torch.Tensor) -> torch.Tensor:
        """B x H x W x C -> (B * windows) x 7 x 7 x C."""
        h, w, c = x.shape[1:]
        x = x.reshape(-1, h // WINDOW, WINDOW, w // WINDOW, WINDOW, c)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, WINDOW, WINDOW, c)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        c = x.shape[2]
        fmap = x.reshape(-1, h, w, c)
        fmap = F.pad(fmap, (0, 0, 0, (-w) % WINDOW, 0, (-h) % WINDOW))
        hp, wp = fmap.shape[1], fmap.shape[2]
        mask = None
        if self.shift:
            fmap = torch.roll(fmap, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = self._mask(hp, wp, x.device).to(x.dtype)
        out = self.w_msa(self._windows(fmap).reshape(-1, WINDOW * WINDOW, c), mask)
        out = out.reshape(-1, hp // WINDOW, wp // WINDOW, WINDOW, WINDOW, c)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
        if self.shift:
            out = torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2))
        return self.drop(out[:, :h, :w, :].reshape(-1, h * w, c))


class FFN(nn.Module):
    def __init__(self, dims: int, drop_path: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, 4 * dims), nn.GELU(), nn.Dropout(0.0)),
                                    nn.Linear(4 * dims, dims), nn.Dropout(0.0))
        self.dropout_layer = DropPath(drop_path)

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        return identity + self.dropout_layer(self.layers(x))


class SwinBlock(nn.Module):
    def __init__(self, dims: int, heads: int, shift: bool, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attn = ShiftWindowMSA(dims, heads, WINDOW // 2 if shift else 0, drop_path)
        self.norm2 = nn.LayerNorm(dims)
        self.ffn = FFN(dims, drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return self.ffn(self.norm2(x), identity=x)


class SwinStage(nn.Module):
    def __init__(self, dims: int, depth: int, heads: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dims, heads, i % 2 == 1, 0.0) for i in range(depth))
        self.downsample = PatchMerging(dims) if downsample else None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]):
        """(input of the next stage, its size, this stage's output, its size)."""
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        down, down_hw = self.downsample(x, hw)
        return down, down_hw, x, hw


class SoliderSwin(nn.Module):
    """SOLIDER-REID's Swin: forward gives the last stage's normalised map, B x C x H/32 x W/32."""

    def __init__(self, dims: int, depths: tuple[int, ...], heads: tuple[int, ...],
                 semantic_weight: float = DEFAULT_SEMANTIC_WEIGHT, drop_path: float = 0.1) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dims)
        self.drop_after_pos = nn.Dropout(0.0)
        widths = [dims * 2 ** i for i in range(len(depths))]
        self.stages = nn.ModuleList(SwinStage(widths[i], depths[i], heads[i], downsample=i < len(depths) - 1)
                                    for i in range(len(depths)))
        self.set_drop_path(drop_path)
        self.norm3 = nn.LayerNorm(widths[-1])
        self.widths = widths
        self.feat_dim = widths[-1]
        self.semantic_weight = -1.0
        self.semantic_embed_w: nn.ModuleList | None = None
        self.semantic_embed_b: nn.ModuleList | None = None
        self.set_semantic_weight(semantic_weight)
        self._init_weights()
        self.weights_source = ("manual", SOLIDER_WEIGHTS)

    def set_semantic_weight(self, weight: float) -> None:
        """lambda for the semantic controller; negative: no controller (its layers are removed)."""
        weight = float(weight)
        if weight > 1.0:
            raise ConfigError(f"MODEL.SEMANTIC_WEIGHT = {weight} is above 1; lambda lies in [0, 1].")
        if weight >= 0 and self.semantic_embed_w is None:
            # One pair after each stage whose output feeds another stage (see the module docstring).
            self.semantic_embed_w = nn.ModuleList(nn.Linear(2, c) for c in self.widths[1:])
            self.semantic_embed_b = nn.ModuleList(nn.Linear(2, c) for c in self.widths[1:])
            for m in [*self.semantic_embed_w, *self.semantic_embed_b]:
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
                m.requires_grad_(False)  # fixed by SOLIDER's pre-training
        elif weight < 0:
            self.semantic_embed_w = self.semantic_embed_b = None
        self.semantic_weight = weight

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first block to `rate` at the last."""
        blocks = [b for stage in self.stages for b in stage.blocks]
        for block, p in zip(blocks, torch.linspace(0, float(rate), len(blocks), device="cpu").tolist()):
            block.attn.drop.drop_prob = block.ffn.dropout_layer.drop_prob = p

    def _init_weights(self) -> None:
        # SOLIDER's from-scratch initialisation: truncated N(0, 0.02) Linear layers, unit LayerNorms.
        init_transformer_weights(self, skip_prefix="semantic_embed")
        for m in self.modules():
            if isinstance(m, WindowMSA):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self.patch_embed(x)
        x = self.drop_after_pos(x)
        out, out_hw = x, hw
        # The controller's input, the same for every image: (lambda, 1 - lambda).
        pair = torch.tensor([self.semantic_weight, 1.0 - self.semantic_weight], dtype=x.dtype, device=x.device)
        for i, stage in enumerate(self.stages):
            x, hw, out, out_hw = stage(x, hw)
            if self.semantic_embed_w is not None and self.semantic_embed_b is not None and i < len(self.semantic_embed_w):
                x = x * F.softplus(self.semantic_embed_w[i](pair)) + self.semantic_embed_b[i](pair)
        out = self.norm3(out)
        return out.transpose(1, 2).reshape(-1, out.shape[2], out_hw[0], out_hw[1])


def _register(name: str) -> None:
    dims, depths, heads = SOLIDER_SWINS[name]

    def factory(last_stride: int) -> nn.Module:
        check_last_stride(last_stride)  # accepted and without effect: see the module docstring
        return SoliderSwin(dims, depths, heads)

    factory.__name__ = name
    BACKBONES.register(name)(factory)


for _name in SOLIDER_SWINS:
    _register(_name)
