"""CLIP's image towers (ViT-B/16, RN50) built with open_clip, adapted as CLIP-ReID adapts them.

MODEL.NAME 'clip:ViT-B-16' or 'clip:RN50'. CLIP-ReID changes OpenAI's towers for 256x128 crops:

* ViT: the patch convolution moves by a stride of its own (16, or 12 for "overlapping patches"),
  so the token grid is ((H - 16) // s + 1) x ((W - 16) // s + 1) and the positional embedding has
  one row per token plus the class token's. CLIP's square 14x14 grid is resized to it bilinearly.
  An optional camera embedding is added to the class token before the positional embedding.
* RN50: the last stage does not downsample (last stride 1), so the attention pooling sees a
  H/16 x W/16 map and its positional embedding is resized the same way.

MODEL.TIMM_KWARGS reach the factory and change the tower's size, as a CLIP-ReID file of another
shape needs (the checkpoint format sets them): ViT `width, layers, heads, output_dim, patch_size,
stride`; RN `layers ([3, 4, 6, 3]), width, heads, output_dim`. Nothing is downloaded: CLIP's own
weights load from a file (MODEL.PRETRAIN_PATH, an open_clip or OpenAI state dict with `visual.*`
keys), their positional embeddings resized by `adapt_state`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from strongreid.errors import ConfigError
from strongreid.modeling.backbones.base import BACKBONE_FAMILIES, apply_last_stride

CLIP_PREFIX = "clip:"

# OpenAI's published towers: width, depth, heads, output (joint embedding) width.
TOWERS: dict[str, dict] = {
    "ViT-B-16": {"kind": "vit", "width": 768, "layers": 12, "heads": 12, "output_dim": 512,
                 "patch_size": 16, "stride": 16},
    "RN50": {"kind": "rn", "width": 64, "layers": [3, 4, 6, 3], "heads": 32, "output_dim": 1024},
}
_VIT_KEYS = {"width", "layers", "heads", "output_dim", "patch_size", "stride"}
_RN_KEYS = {"width", "layers", "heads", "output_dim"}


def resize_positional_embedding(posemb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A (1 + g*g) x C positional embedding on a square g x g grid, bilinearly resized to
    (1 + h*w) x C for the grid (h, w); the leading (class / mean token) row is kept."""
    token, cells = posemb[:1], posemb[1:]
    side = math.isqrt(cells.shape[0])
    if side * side != cells.shape[0]:
        raise ConfigError(f"a positional embedding of {posemb.shape[0]} rows is not 1 + a square grid")
    if (side, side) == tuple(grid):
        return posemb
    square = cells.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=tuple(grid), mode="bilinear", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(posemb.dtype)
    return torch.cat([token, resized], dim=0)


class ClipVisionTower(nn.Module):
    """CLIP's image encoder (`self.visual`, open_clip's module, OpenAI's parameter names).

    `forward` gives the generic backbone output (ViT: the final tokens as a B x C x N x 1 map,
    RN: the last stage's map); `encode` gives what CLIP-ReID's heads read: the class token (ViT)
    or pooled map (RN) of the second-to-last block / stage, of the last one, and the projected
    embedding (ViT: the class token through `proj`; RN: attention pooling's mean token).
    """

    def __init__(self, name: str, last_stride: int, img_size: tuple[int, int],
                 kwargs: dict | None = None) -> None:
        super().__init__()
        if name not in TOWERS:
            raise ConfigError(
                f"MODEL.NAME = 'clip:{name}' is not a CLIP tower strongreid builds; use "
                f"{', '.join(CLIP_PREFIX + n for n in TOWERS)}."
            )
        spec = dict(TOWERS[name])
        kind = spec.pop("kind")
        extra = dict(kwargs or {})
        allowed = _VIT_KEYS if kind == "vit" else _RN_KEYS
        unknown = sorted(set(extra) - allowed)
        if unknown:
            raise ConfigError(
                f"MODEL.TIMM_KWARGS {', '.join(unknown)} do not apply to clip:{name}; it takes "
                f"{', '.join(sorted(allowed))}."
            )
        spec.update(extra)
        self.kind = kind
        self.arch = CLIP_PREFIX + name
        self.spec = spec
        height, width = (int(v) for v in img_size)
        if kind == "vit":
            self._build_vit(spec, height, width)
        else:
            self._build_rn(spec, last_stride, height, width)
        self.weights_source = (
            "manual",
            "CLIP's weights as a state dict with 'visual.*' keys (open_clip's "
            f"open_clip_pytorch_model.bin for {name}, or OpenAI's file re-saved with state_dict())",
        )

    def _build_vit(self, spec: dict, height: int, width: int) -> None:
        from open_clip.transformer import QuickGELU, VisionTransformer

        patch, stride = int(spec["patch_size"]), int(spec["stride"])
        if not 1 <= stride <= patch or height < patch or width < patch:
            raise ConfigError(
                f"clip ViT: stride {stride} with patch {patch} at {height}x{width}: the stride "
                "must lie in [1, patch] and the image be at least one patch."
            )
        self.grid = ((height - patch) // stride + 1, (width - patch) // stride + 1)
        # open_clip sizes the positional embedding from image_size // patch_size: asking for
        # grid * patch gives CLIP-ReID's token count; the convolution then moves by `stride`.
        visual = VisionTransformer(
            image_size=(self.grid[0] * patch, self.grid[1] * patch), patch_size=patch,
            width=int(spec["width"]), layers=int(spec["layers"]), heads=int(spec["heads"]),
            mlp_ratio=4.0, output_dim=int(spec["output_dim"]), act_layer=QuickGELU,
        )
        visual.conv1.stride = (stride, stride)
        self.visual = visual
        self.feat_dim = int(spec["width"])
        self.proj_dim = int(spec["output_dim"])
        if len(visual.transformer.resblocks) < 2:
            raise ConfigError("clip ViT: CLIP-ReID reads the second-to-last block; give layers >= 2.")

    def _build_rn(self, spec: dict, last_stride: int, height: int, width: int) -> None:
        from open_clip.modified_resnet import ModifiedResNet

        layers = [int(v) for v in spec["layers"]]
        if len(layers) != 4:
            raise ConfigError(f"clip RN: layers {layers} must have four stage depths.")
        visual = ModifiedResNet(layers=layers, output_dim=int(spec["output_dim"]),
                                heads=int(spec["heads"]), image_size=224, width=int(spec["width"]))
        apply_last_stride(visual.layer4, last_stride)  # stride 1: the anti-aliasing pools go
        stride = 16 if last_stride == 1 else 32
        if height % stride or width % stride:
            raise ConfigError(f"clip RN at last stride {last_stride}: INPUT sizes must be "
                              f"multiples of {stride}, not {height}x{width}.")
        self.grid = (height // stride, width // stride)
        embed = int(spec["width"]) * 32
        pool = visual.attnpool
        pool.positional_embedding = nn.Parameter(
            torch.randn(self.grid[0] * self.grid[1] + 1, embed) / embed ** 0.5)
        self.visual = visual
        self.feat_dim = embed
        self.proj_dim = int(spec["output_dim"])

    def adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CLIP's own weights for this tower: the `visual.*` tensors (text tower dropped), the
        positional embedding resized from CLIP's square grid to this tower's, as CLIP-ReID does."""
        out = {k: v for k, v in state.items() if k.startswith("visual.")}
        key = "visual.positional_embedding" if self.kind == "vit" else "visual.attnpool.positional_embedding"
        if key in out:
            out[key] = resize_positional_embedding(out[key], self.grid)
        return out

    def _vit_tokens(self, x: torch.Tensor, cv_embed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)  # B x N x C
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        if cv_embed is not None:
            cls = cls + cv_embed.to(x.dtype).unsqueeze(1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1](x)
        return x, v.ln_post(last)

    def encode(self, x: torch.Tensor, cv_embed: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(second-to-last feature, last feature, projected feature), each B x C."""
        if self.kind == "vit":
            before, final = self._vit_tokens(x, cv_embed)
            cls = final[:, 0]
            return before[:, 0], cls, cls @ self.visual.proj
        v = self.visual
        x3 = v.layer3(v.layer2(v.layer1(v.stem(x))))
        x4 = v.layer4(x3)
        return x3.mean(dim=(2, 3)), x4.mean(dim=(2, 3)), v.attnpool(x4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vit":
            _, final = self._vit_tokens(x, None)
            return final.transpose(1, 2).unsqueeze(-1)
        v = self.visual
        return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))


@BACKBONE_FAMILIES.register(CLIP_PREFIX)
def create_clip_backbone(name: str, last_stride: int, kwargs: dict | None = None,
                         img_size: tuple[int, int] | None = None) -> nn.Module:
    """MODEL.NAME 'clip:<tower>': CLIP's image tower at INPUT.SIZE_TRAIN (MODEL.TIMM_KWARGS: its size)."""
    return ClipVisionTower(name, last_stride, tuple(img_size or (256, 128)), kwargs)
