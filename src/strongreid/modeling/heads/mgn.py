"""MGN (Wang et al., "Learning Discriminative Features with Multiple Granularities", 2018) as
fast-reid builds it (meta_arch/mgn.py); MODEL.HEAD 'mgn'.

A ResNet is cut after the first block of layer3 (`backbone`: conv1, bn1, relu, maxpool, layer1,
layer2, layer3[0], fast-reid's nn.Sequential indices 0-6). Three branches each get their own copy
of the rest of layer3 ("res_conv4") and of layer4:

    b1  layer3[1:] + layer4 (LAST_STRIDE as configured)        global        -> b1_head
    b2  layer3[1:] + layer4 at stride 1 ("res_p_conv5")        global, 2 rows -> b2_head, b21_head, b22_head
    b3  layer3[1:] + layer4 at stride 1                        global, 3 rows -> b3_head, b31..b33_head

The rows are `torch.chunk` of the branch map along its height, as fast-reid cuts them. Each of
the eight heads is fast-reid's EmbeddingHead: pooling (`pool_layer`: learned GeM with
MODEL.POOLING 'gem', p starting at MODEL.GEM_P, as MGN's SBS base; or average), a 1x1 conv to
MODEL.MGN_EMBEDDING_DIM (256 in fast-reid's Base-MGN; 0 drops it) and a BatchNorm whose shift is
frozen (`bottleneck`), and a bias-free classifier (`classifier`, fast-reid's `weight`).

Test feature: the eight BN outputs concatenated in fast-reid's order b1, b2, b3, b21, b22, b31,
b32, b33 (8 x 256 = 2048 values). Training: eight logits (the ID loss sums them; fast-reid
weighs each by 1/8, SOLVER.ID_LOSS_WEIGHT 0.125) and that same concatenation for the metric
losses (fast-reid runs five triplet losses, on b1, b2, b3 and the concatenated rows of b2 and
of b3, each weighted 0.2; strongreid's metric losses see one feature).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from strongreid.config.components import add_defaults
from strongreid.errors import ConfigError
from strongreid.modeling.backbones import apply_last_stride
from strongreid.modeling.heads import HEADS, GlobalAvgPool, weights_init_kaiming
from strongreid.modeling.heads.pooling import LearnedGeM
from strongreid.modeling.outputs import ModelOutput

add_defaults({"MODEL.MGN_EMBEDDING_DIM": 256}, "head mgn")

# Head names in the order fast-reid concatenates their features, with (branch, rows, row index);
# row index None is the branch's global head.
HEAD_LAYOUT = (
    ("b1_head", "b1", 1, None), ("b2_head", "b2", 2, None), ("b3_head", "b3", 3, None),
    ("b21_head", "b2", 2, 0), ("b22_head", "b2", 2, 1),
    ("b31_head", "b3", 3, 0), ("b32_head", "b3", 3, 1), ("b33_head", "b3", 3, 2),
)
STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class EmbeddingHead(nn.Module):
    """fast-reid's EmbeddingHead with its BNNeck: pool -> (1x1 conv) -> BN -> classifier."""

    def __init__(self, channels: int, num_classes: int, embedding_dim: int, pooling: str,
                 gem_p: float) -> None:
        super().__init__()
        if pooling == "gem":
            self.pool_layer: nn.Module = LearnedGeM(gem_p)
        elif pooling == "avg":
            self.pool_layer = GlobalAvgPool()
        else:
            raise ConfigError(f"MODEL.POOLING = {pooling!r}: use 'avg' or 'gem'.")
        neck: list[nn.Module] = []
        if embedding_dim > 0:
            neck.append(nn.Conv2d(channels, embedding_dim, 1, bias=False))
            channels = embedding_dim
        bn = nn.BatchNorm2d(channels)
        bn.bias.requires_grad_(False)
        neck.append(bn)
        self.bottleneck = nn.Sequential(*neck)
        self.bottleneck.apply(weights_init_kaiming)
        self.classifier = nn.Linear(channels, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)  # fast-reid's classifier init
        self.feat_dim = channels

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        pooled = self.pool_layer(fmap)
        if pooled.ndim == 2:  # average pooling flattens; the neck works on B x C x 1 x 1
            pooled = pooled[:, :, None, None]
        return self.bottleneck(pooled).flatten(1)


def _check_resnet(backbone: nn.Module) -> None:
    arch = getattr(backbone, "arch", type(backbone).__name__)
    missing = [s for s in STAGES if not hasattr(backbone, s)]
    if missing or len(getattr(backbone, "layer3", ())) < 2:
        raise ConfigError(
            f"MODEL.HEAD 'mgn' cuts a ResNet after layer3's first block; MODEL.NAME {arch!r} has no "
            f"such stages ({', '.join(missing) or 'layer3 has one block'}). Use fastreid_resnet50_ibn "
            "(fast-reid's MGN), fastreid_resnet50, resnet50 or resnet50_ibn_a."
        )
    if any(getattr(backbone, "nl_index", [[]])) or any(k.startswith("NL_") for k, _ in backbone.named_children()):
        raise ConfigError(
            f"MODEL.HEAD 'mgn' does not run the non-local blocks of {arch!r} (fast-reid's MGN turns "
            "WITH_NL off); use the backbone without '_nl'."
        )


@HEADS.register("mgn")
class MGN(nn.Module):
    """fast-reid's MGN on a ResNet: training forward -> ModelOutput([8 logits], B x 8D features);
    eval forward -> the B x 8D concatenated BN outputs."""

    def __init__(self, backbone: nn.Module, num_classes: int, embedding_dim: int = 256,
                 pooling: str = "gem", gem_p: float = 3.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"the training split has {num_classes} identities; need at least 1.")
        if embedding_dim < 0:
            raise ConfigError(f"MODEL.MGN_EMBEDDING_DIM = {embedding_dim} must be >= 0 (0: no 1x1 conv).")
        _check_resnet(backbone)
        self.arch = str(getattr(backbone, "arch", type(backbone).__name__))
        self.backbone = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool,
                                      backbone.layer1, backbone.layer2, backbone.layer3[0])
        self.b1 = nn.Sequential(nn.Sequential(*copy.deepcopy(list(backbone.layer3[1:]))),
                                copy.deepcopy(backbone.layer4))
        for name in ("b2", "b3"):
            # fast-reid's res_p_conv5: layer4's blocks and weights, never strided.
            part_conv5 = copy.deepcopy(backbone.layer4)
            apply_last_stride(part_conv5, 1)
            setattr(self, name, nn.Sequential(nn.Sequential(*copy.deepcopy(list(backbone.layer3[1:]))),
                                              part_conv5))
        channels = int(backbone.feat_dim)
        for head, *_ in HEAD_LAYOUT:
            setattr(self, head, EmbeddingHead(channels, num_classes, embedding_dim, pooling, gem_p))
        self.feat_dim = len(HEAD_LAYOUT) * self.b1_head.feat_dim
        self.num_classes = int(num_classes)
        self.class_layers = tuple(f"{head}.classifier." for head, *_ in HEAD_LAYOUT)
        # The ResNet's stages, for SOLVER.FREEZE_BACKBONE_EPOCHS / BACKBONE_LR_FACTOR (fast-reid's
        # MGN freezes backbone, b1, b2 and b3 alike).
        self.backbone_prefixes = ("backbone.", "b1.", "b2.", "b3.")

    @classmethod
    def from_config(cls, cfg, backbone: nn.Module, num_classes: int) -> MGN:
        """MODEL.HEAD 'mgn': MODEL.MGN_EMBEDDING_DIM, MODEL.POOLING ('gem': learned p from GEM_P)."""
        m = cfg.MODEL
        return cls(backbone, num_classes, embedding_dim=m.MGN_EMBEDDING_DIM, pooling=m.POOLING,
                   gem_p=m.GEM_P)

    @classmethod
    def check(cls, cfg) -> None:
        m = cfg.MODEL
        if m.MGN_EMBEDDING_DIM < 0:
            raise ConfigError(f"MODEL.MGN_EMBEDDING_DIM = {m.MGN_EMBEDDING_DIM} must be >= 0 (0: no 1x1 conv).")
        if m.NECK != "bnneck":
            raise ConfigError("MODEL.HEAD 'mgn' has a BNNeck in each of its eight heads: set MODEL.NECK 'bnneck'.")

    def backbone_loaded(self, backbone: nn.Module) -> None:
        """Copy layer3[1:] and layer4 of `backbone` (after ImageNet weights were loaded into it)
        into the three branches, as fast-reid copies them when it builds MGN."""
        rest = nn.Sequential(*backbone.layer3[1:]).state_dict()
        conv5 = backbone.layer4.state_dict()
        for name in ("b1", "b2", "b3"):
            branch = getattr(self, name)
            branch[0].load_state_dict(rest)
            branch[1].load_state_dict(conv5)

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared = self.backbone(x)
        branches = {name: getattr(self, name)(shared) for name in ("b1", "b2", "b3")}
        rows = {name: torch.chunk(branches[name], parts, dim=2) for name, parts in (("b2", 2), ("b3", 3))}
        for name, parts in (("b2", 2), ("b3", 3)):
            if len(rows[name]) != parts:
                height = branches[name].shape[2]
                raise ConfigError(
                    f"MGN cuts branch {name}'s map into {parts} rows, but at this input size the map "
                    f"is {height} high, which torch.chunk splits into {len(rows[name])}: use an input "
                    "height giving 3 or more rows at stride 16 other than 4 (fast-reid: 384)."
                )
        return [branches[branch] if row is None else rows[branch][row]
                for _, branch, _, row in HEAD_LAYOUT]

    def forward(self, x: torch.Tensor) -> torch.Tensor | ModelOutput:
        heads = [getattr(self, head) for head, *_ in HEAD_LAYOUT]
        feats = [head.embed(fmap) for head, fmap in zip(heads, self._maps(x))]
        joined = torch.cat(feats, dim=1)
        if self.training:
            return ModelOutput([head.classifier(f) for head, f in zip(heads, feats)], joined)
        return joined
