"""TransReID's vision transformer (He et al., ICCV 2021): `MODEL.NAME 'transreid:<type>'`.

A ViT whose 16x16 patches overlap (the patch conv moves by MODEL.TRANSREID.STRIDE_SIZE: 12 at
256x128 gives 21 x 10 patches), whose tokens get a learned side-information embedding (SIE)
of the camera (and view) scaled by SIE_COE, and, with JPM, whose last block runs twice more on
its own copies: once over all tokens (the global branch, `b1`) and once per group of shifted
and shuffled patches, each with the class token in front (the local branches, `b2`).

Parameter names are TransReID's `base` (`patch_embed.proj`, `cls_token`, `pos_embed`,
`sie_embed`, `blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`) and its
`b1`/`b2` (Sequential(block, LayerNorm)). With JPM TransReID's base keeps a last block and a
final norm that its forward never runs; this trunk does not hold them: its `blocks` are the
first depth - 1, and ImageNet weights of the last block and norm seed `b1` and `b2`, as
TransReID's deep copies of the loaded block do.

The geometry comes from the config, so the TransReID head builds this trunk
(`TransReID.backbone_from_config`); `create_backbone('transreid:<type>')` alone gives the
plain trunk at stride 16 without SIE or JPM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from strongreid.config.components import config_check
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.modeling.backbones.base import BACKBONE_FAMILIES, init_transformer_weights

PREFIX = "transreid:"
PATCH = 16
LN_EPS = 1e-6
IMAGENET_FILES = ("jx_vit_base_p16_224-80ecf9dd.pth (ViT-B), vit_small_p16_224-15ec54c9.pth, "
                  "deit_small_distilled_patch16_224-649709d9.pth or "
                  "deit_base_distilled_patch16_224-df68dfff.pth, the files TransReID's README links")


@dataclass(frozen=True)
class ViTSpec:
    """The shape of one of TransReID's transformer types."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    # vit_small scales attention by 768^-0.5 instead of head_dim^-0.5 (timm 0.3's old weights).
    qk_scale: float | None = None


# MODEL.TRANSFORMER_TYPE of TransReID without its "_TransReID" suffix. deit_base is vit_base's
# structure (TransReID maps both to the same factory; only the ImageNet file differs).
TYPES = {
    "vit_base_patch16_224": ViTSpec(768, 12, 12, 4.0, True),
    "deit_base_patch16_224": ViTSpec(768, 12, 12, 4.0, True),
    "vit_small_patch16_224": ViTSpec(768, 8, 8, 3.0, False, 768 ** -0.5),
    "deit_small_patch16_224": ViTSpec(384, 12, 6, 4.0, True),
}


def patch_grid(img_size: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of overlapping 16x16 patches: (H - 16) // stride_y + 1, likewise for W."""
    return (img_size[0] - PATCH) // stride[0] + 1, (img_size[1] - PATCH) // stride[1] + 1


def shuffle_tokens(tokens: torch.Tensor, shift: int, groups: int) -> torch.Tensor:
    """JPM's re-arrangement of B x (1 + N) x D tokens into N (or N + 1) patch tokens.

    Shift: the patch tokens from index `shift` on, then patches 1 .. shift - 1 (the class token
    leaves). Shuffle: the sequence is cut into `groups` equal runs (when it does not divide, the
    second-to-last token is appended once, as TransReID does) and the runs are interleaved.
    """
    x = torch.cat([tokens[:, shift:], tokens[:, 1:shift]], dim=1)
    batch, length, dim = x.shape
    if length % groups:
        x = torch.cat([x, x[:, -2:-1]], dim=1)
    x = x.reshape(batch, groups, -1, dim).transpose(1, 2)
    return x.reshape(batch, -1, dim)


def shuffled_length(num_patches: int, shift: int, groups: int) -> int | None:
    """How many tokens `shuffle_tokens` returns for `num_patches` patches, None if it cannot."""
    length = num_patches + 1 - shift + max(shift - 1, 0)
    if length % groups:
        length += 1
    return None if length % groups else length


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, qk_scale: float | None,
                 attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = qk_scale or (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than scaled_dot_product_attention: the scale of vit_small is not
        # head_dim^-0.5, and the plain ops export to ONNX opset 17 as they are.
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class DropPath(nn.Module):
    """Stochastic depth: a sample's residual branch is dropped with probability p (rescaled)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, spec: ViTSpec, dim: int, heads: int, mlp_ratio: float, drop: float,
                 attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, spec.qkv_bias, spec.qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """16x16 patches taken every `stride` pixels: B x 3 x H x W -> B x (rows * cols) x D."""

    def __init__(self, img_size: tuple[int, int], stride: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.img_size = tuple(img_size)
        self.grid = patch_grid(self.img_size, stride)
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=tuple(stride))
        # TransReID's init of the patch conv: N(0, 2 / (k * k * out_channels)).
        nn.init.normal_(self.proj.weight, 0.0, math.sqrt(2.0 / (PATCH * PATCH * dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise StrongReIDError(
                f"TransReID's transformer takes {self.img_size[0]} x {self.img_size[1]} images (its "
                f"position embedding has one entry per patch), got {x.shape[-2]} x {x.shape[-1]}: "
                "INPUT.SIZE_TEST must equal INPUT.SIZE_TRAIN"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class TransReIDViT(nn.Module):
    """forward(x, camids, viewids) -> B x D class-token feature, or with JPM the list
    [global, local_1 .. local_k] of B x D class-token features."""

    def __init__(
        self,
        arch: str,
        spec: ViTSpec,
        img_size: tuple[int, int] = (256, 128),
        stride: tuple[int, int] = (PATCH, PATCH),
        cameras: int = 0,
        views: int = 0,
        sie_coe: float = 3.0,
        jpm: bool = False,
        shift: int = 5,
        groups: int = 2,
        divide: int = 4,
        rearrange: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        dim = self.feat_dim = spec.embed_dim
        self.arch = arch
        self.weights_source = ("manual", IMAGENET_FILES)
        self.patch_embed = PatchEmbed(img_size, stride, dim)
        rows, cols = self.patch_embed.grid
        self.num_patches = rows * cols
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        # One SIE vector per camera, per view, or per (camera, view) pair (index cam * views + view).
        self.cameras, self.views, self.sie_coe = int(cameras), int(views), float(sie_coe)
        rows_sie = max(self.cameras, 1) * max(self.views, 1) if (self.cameras or self.views) else 0
        self.sie_embed = nn.Parameter(torch.zeros(rows_sie, 1, dim)) if rows_sie else None
        self.pos_drop = nn.Dropout(drop_rate)
        depth = spec.depth
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        make = lambda i: Block(spec, dim, spec.num_heads, spec.mlp_ratio, drop_rate,  # noqa: E731
                               attn_drop_rate, rates[i])
        self.jpm = bool(jpm)
        self.blocks = nn.ModuleList(make(i) for i in range(depth - 1 if jpm else depth))
        if jpm:
            self.b1 = nn.Sequential(make(depth - 1), nn.LayerNorm(dim, eps=LN_EPS))
            self.b2 = nn.Sequential(make(depth - 1), nn.LayerNorm(dim, eps=LN_EPS))
            self.shift, self.groups, self.divide, self.rearrange = int(shift), int(groups), int(divide), bool(rearrange)
            tokens = shuffled_length(self.num_patches, self.shift, self.groups) if rearrange else self.num_patches
            if tokens is None or tokens // self.divide < 1:
                raise ConfigError(
                    f"TransReID's JPM cannot split {self.num_patches} patches: MODEL.TRANSREID.SHIFT_NUM "
                    f"{shift}, SHUFFLE_GROUP {groups} and DIVIDE_LENGTH {divide} leave no equal groups; "
                    "use SHUFFLE_GROUP 2 and DIVIDE_LENGTH 4 (TransReID's)"
                )
        else:
            self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.sie_embed is not None:
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        init_transformer_weights(self)

    @property
    def num_local(self) -> int:
        return self.divide if self.jpm else 0

    def side_embedding(self, camids: torch.Tensor | None, viewids: torch.Tensor | None) -> torch.Tensor:
        """SIE_COE x the SIE vector of each image's camera / view (B x 1 x D): TransReID's
        index camera * views + view when both are on."""
        assert self.sie_embed is not None
        if self.cameras and self.views:
            index = camids * self.views + viewids
        else:
            index = camids if self.cameras else viewids
        return self.sie_coe * self.sie_embed[index]

    def tokens(self, x: torch.Tensor, camids: torch.Tensor | None = None,
               viewids: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens after every block but JPM's (B x (1 + N) x D), before the final norm."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.sie_embed is not None:
            x = x + self.side_embedding(camids, viewids)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        x = self.tokens(x, camids, viewids)
        if not self.jpm:
            return self.norm(x)[:, 0]
        feats = [self.b1(x)[:, 0]]
        head = x[:, :1]
        patches = shuffle_tokens(x, self.shift, self.groups) if self.rearrange else x[:, 1:]
        # Each local branch sees the class token and one run of N // DIVIDE_LENGTH patches.
        run = (x.shape[1] - 1) // self.divide
        for i in range(self.divide):
            feats.append(self.b2(torch.cat([head, patches[:, i * run:(i + 1) * run]], dim=1))[:, 0])
        return feats

    # -- ImageNet weights ----------------------------------------------------------------------

    def adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An ImageNet ViT / DeiT file made to fit, as TransReID's load_param does it: the
        position grid resized bilinearly to this patch grid, DeiT's distillation token dropped,
        an old linear patch projection reshaped; with JPM the last block and the final norm
        become both branches' starting point."""
        from strongreid.modeling.weights import canonical_key

        out: dict[str, torch.Tensor] = {}
        distilled = any(canonical_key(k) == "dist_token" for k in state)
        for key, value in state.items():
            name = canonical_key(key)
            if name.startswith(("head", "dist")):
                continue
            if name == "patch_embed.proj.weight" and value.ndim < 4:
                value = value.reshape(self.patch_embed.proj.weight.shape)
            elif name == "pos_embed":
                if distilled:
                    value = torch.cat([value[:, :1], value[:, 2:]], dim=1)
                if value.shape != self.pos_embed.shape:
                    value = resize_pos_embed(value, self.patch_embed.grid)
            out[name] = value
        if self.jpm:
            last = f"blocks.{len(self.blocks)}."
            for name in [n for n in out if n.startswith(last) or n.startswith("norm.")]:
                value = out.pop(name)
                inner = "0." + name[len(last):] if name.startswith(last) else "1." + name[len("norm."):]
                out["b1." + inner] = value
                out["b2." + inner] = value.clone()
        return out


def resize_pos_embed(posemb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A square ImageNet position grid (1 x (1 + g*g) x D) resampled bilinearly to `grid`."""
    token, cells = posemb[:, :1], posemb[0, 1:]
    side = int(math.sqrt(len(cells)))
    cells = cells.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells, size=grid, mode="bilinear", align_corners=False)
    cells = cells.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([token, cells], dim=1)


def type_spec(name: str) -> ViTSpec:
    """The ViTSpec of a `transreid:<type>` name's type; ConfigError for an unknown one."""
    if name not in TYPES:
        raise ConfigError(
            f"MODEL.NAME = {PREFIX}{name!r}: TransReID's transformer types are "
            f"{', '.join(PREFIX + t for t in TYPES)}"
        )
    return TYPES[name]


@config_check("transreid backbone")
def check_transreid_pairing(cfg: CfgNode) -> None:
    """The transformer returns class-token features, which only the TransReID head reads."""
    if cfg.MODEL.NAME.startswith(PREFIX) and cfg.MODEL.HEAD != "transreid":
        raise ConfigError(f"MODEL.NAME {cfg.MODEL.NAME!r} is TransReID's transformer: set MODEL.HEAD "
                          f"'transreid' (MODEL.HEAD is {cfg.MODEL.HEAD!r})")


@BACKBONE_FAMILIES.register(PREFIX)
def create_transreid_backbone(name: str, last_stride: int, kwargs: dict | None = None,
                              img_size: tuple[int, int] | None = None) -> nn.Module:
    """MODEL.NAME 'transreid:<type>' without the TransReID head: stride 16, no SIE, no JPM."""
    if kwargs:
        raise ConfigError(f"MODEL.TIMM_KWARGS {kwargs!r} do not apply to {PREFIX}{name}; use the "
                          "MODEL.TRANSREID keys")
    return TransReIDViT(PREFIX + name, type_spec(name), img_size=tuple(img_size or (256, 128)))
