"""TransReID's head (He et al., ICCV 2021, damo-cv/TransReID): MODEL.HEAD 'transreid'.

On the transformer of `modeling/backbones/transreid.py` (MODEL.NAME 'transreid:<type>'), a
BNNeck and a bias-free classifier per branch: `bottleneck`/`classifier` for the global branch
and, with JPM, `bottleneck_i`/`classifier_i` (i = 1 .. DIVIDE_LENGTH) for the local ones,
TransReID's own module names. Training returns every branch's logits and pre-BN features,
weighted as TransReID's loss weights them (global 0.5, each local 0.5 / k). The test feature
is the global feature followed by the local ones divided by k (TransReID's `/ 4`), before or
after the BNNecks as TEST.NECK_FEAT says (TransReID's configs: 'before').

Side information (SIE): with SIE_CAMERA the camera id of each image selects a learned vector
added to every token. `strongreid test`, training and `extract` pass the images' camera ids;
images without one (FeatureExtractor without `camids`, the search gallery, the exported ONNX /
BoxMOT graph, whose input is the image alone) use MODEL.TRANSREID.TEST_CAMERA, one fixed camera.

The keys, MODEL.TRANSREID.* (TransReID's own MODEL.* names where they exist):
STRIDE_SIZE (MODEL.STRIDE_SIZE), SIE_CAMERA, SIE_VIEW, SIE_COE, CAMERA_NUM / VIEW_NUM (the
counts TransReID reads off its dataset), TEST_CAMERA / TEST_VIEW, JPM, SHIFT_NUM,
SHUFFLE_GROUP, DIVIDE_LENGTH (TransReID's DEVIDE_LENGTH), RE_ARRANGE, DROP_PATH, DROP_OUT,
ATT_DROP_RATE, and EMBED_DIM / DEPTH / NUM_HEADS / MLP_RATIO (0: the type's own) for reduced
transformers.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config.components import add_defaults, check_at_least, check_choices
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.modeling.backbones.transreid import PREFIX, TransReIDViT, ViTSpec, type_spec
from strongreid.modeling.heads import HEADS, make_bnneck, weights_init_classifier
from strongreid.modeling.outputs import Branches, ModelOutput

logger = logging.getLogger(__name__)

KEYS = "MODEL.TRANSREID"
add_defaults({
    f"{KEYS}.STRIDE_SIZE": [16, 16],
    f"{KEYS}.EMBED_DIM": 0,
    f"{KEYS}.DEPTH": 0,
    f"{KEYS}.NUM_HEADS": 0,
    f"{KEYS}.MLP_RATIO": 0.0,
    f"{KEYS}.SIE_CAMERA": False,
    f"{KEYS}.SIE_VIEW": False,
    f"{KEYS}.SIE_COE": 3.0,
    f"{KEYS}.CAMERA_NUM": 0,
    f"{KEYS}.VIEW_NUM": 0,
    f"{KEYS}.TEST_CAMERA": 0,
    f"{KEYS}.TEST_VIEW": 0,
    f"{KEYS}.JPM": False,
    f"{KEYS}.SHIFT_NUM": 5,
    f"{KEYS}.SHUFFLE_GROUP": 2,
    f"{KEYS}.DIVIDE_LENGTH": 4,
    f"{KEYS}.RE_ARRANGE": True,
    f"{KEYS}.DROP_PATH": 0.1,
    f"{KEYS}.DROP_OUT": 0.0,
    f"{KEYS}.ATT_DROP_RATE": 0.0,
}, "TransReID head (modeling/heads/transreid.py)")


def spec_from_config(cfg: CfgNode) -> ViTSpec:
    """The transformer type of MODEL.NAME with EMBED_DIM / DEPTH / NUM_HEADS / MLP_RATIO applied."""
    base = type_spec(cfg.MODEL.NAME[len(PREFIX):])
    t = cfg.MODEL.TRANSREID
    return ViTSpec(int(t.EMBED_DIM) or base.embed_dim, int(t.DEPTH) or base.depth,
                   int(t.NUM_HEADS) or base.num_heads, float(t.MLP_RATIO) or base.mlp_ratio,
                   base.qkv_bias, base.qk_scale)


@HEADS.register("transreid")
class TransReID(nn.Module):
    """Training forward -> ModelOutput (Branches with JPM); eval forward -> the test feature."""

    def __init__(self, backbone: TransReIDViT, num_classes: int, neck_feat: str = "before",
                 test_camera: int = 0, test_view: int = 0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"the training split has {num_classes} identities; need at least 1.")
        self.backbone = backbone
        self.arch = backbone.arch
        self.num_classes = int(num_classes)
        self.neck_feat = neck_feat
        dim = backbone.feat_dim
        self.num_local = backbone.num_local
        self.feat_dim = dim * (1 + self.num_local)
        # What the metric and center losses see: one branch's feature at a time.
        self.loss_feat_dim = dim
        self.test_camera, self.test_view = int(test_camera), int(test_view)
        suffixes = [""] + [f"_{i}" for i in range(1, self.num_local + 1)]
        for s in suffixes:
            self.add_module("bottleneck" + s, make_bnneck(dim))
            classifier = nn.Linear(dim, self.num_classes, bias=False)
            classifier.apply(weights_init_classifier)
            self.add_module("classifier" + s, classifier)
        self.class_layers = tuple(f"classifier{s}." for s in suffixes)
        k = self.num_local
        self.loss_weights = [0.5] + [0.5 / k] * k if k else [1.0]

    @property
    def takes_camids(self) -> bool:
        """True when the camera selects an SIE vector: the pipeline then passes camera ids."""
        return bool(self.backbone.cameras)

    @classmethod
    def check(cls, cfg: CfgNode) -> None:
        """MODEL.TRANSREID.* and the keys TransReID reads or cannot honour."""
        if not cfg.MODEL.NAME.startswith(PREFIX):
            raise ConfigError(f"MODEL.HEAD 'transreid' needs a TransReID transformer: MODEL.NAME "
                              f"'{PREFIX}vit_base_patch16_224' (or another {PREFIX}<type>), not "
                              f"{cfg.MODEL.NAME!r}")
        spec = spec_from_config(cfg)
        t = cfg.MODEL.TRANSREID
        check_choices(cfg, {"TEST.NECK_FEAT": ("after", "before")})
        for key in ("EMBED_DIM", "DEPTH", "NUM_HEADS", "CAMERA_NUM", "VIEW_NUM", "SHIFT_NUM"):
            if t[key] < 0:
                raise ConfigError(f"{KEYS}.{key} = {t[key]} must be >= 0")
        check_at_least(cfg, [f"{KEYS}.SHUFFLE_GROUP", f"{KEYS}.DIVIDE_LENGTH"], 1)
        if spec.embed_dim % spec.num_heads:
            raise ConfigError(f"{KEYS}.EMBED_DIM {spec.embed_dim} is not a multiple of NUM_HEADS "
                              f"{spec.num_heads}")
        if spec.depth < 2 and t.JPM:
            raise ConfigError(f"{KEYS}.JPM needs DEPTH >= 2: its branches copy the last block")
        stride = list(t.STRIDE_SIZE)
        if len(stride) != 2 or min(stride) < 1:
            raise ConfigError(f"{KEYS}.STRIDE_SIZE = {stride}: give [stride_y, stride_x], e.g. [12, 12]")
        if list(cfg.INPUT.SIZE_TEST) != list(cfg.INPUT.SIZE_TRAIN):
            raise ConfigError(
                f"MODEL.HEAD 'transreid': INPUT.SIZE_TEST {list(cfg.INPUT.SIZE_TEST)} must equal "
                f"INPUT.SIZE_TRAIN {list(cfg.INPUT.SIZE_TRAIN)} (one position embedding per patch "
                "of the training size, as in TransReID)"
            )
        if [float(s) for s in cfg.TEST.MULTI_SCALE] != [1.0]:
            raise ConfigError("TEST.MULTI_SCALE must be [1.0] with MODEL.HEAD 'transreid': its "
                              "transformer takes INPUT.SIZE_TEST images only")
        for switch, count, test in (("SIE_CAMERA", "CAMERA_NUM", "TEST_CAMERA"), ("SIE_VIEW", "VIEW_NUM", "TEST_VIEW")):
            if t[switch] and t[count] < 2:
                raise ConfigError(
                    f"{KEYS}.{switch} needs {KEYS}.{count}: the number of {count.split('_')[0].lower()}s "
                    f"of the training set (at least 2; Market-1501 has 6 cameras, MSMT17 15)"
                )
            if t[switch] and not 0 <= t[test] < t[count]:
                raise ConfigError(f"{KEYS}.{test} = {t[test]} must lie in [0, {count} {t[count]})")

    @classmethod
    def backbone_from_config(cls, cfg: CfgNode) -> TransReIDViT:
        """The transformer at INPUT.SIZE_TRAIN with the stride, SIE and JPM of MODEL.TRANSREID."""
        t = cfg.MODEL.TRANSREID
        return TransReIDViT(
            cfg.MODEL.NAME, spec_from_config(cfg), img_size=tuple(cfg.INPUT.SIZE_TRAIN),
            stride=tuple(t.STRIDE_SIZE), cameras=t.CAMERA_NUM if t.SIE_CAMERA else 0,
            views=t.VIEW_NUM if t.SIE_VIEW else 0, sie_coe=t.SIE_COE, jpm=t.JPM, shift=t.SHIFT_NUM,
            groups=t.SHUFFLE_GROUP, divide=t.DIVIDE_LENGTH, rearrange=t.RE_ARRANGE,
            drop_rate=t.DROP_OUT, attn_drop_rate=t.ATT_DROP_RATE, drop_path_rate=t.DROP_PATH,
        )

    @classmethod
    def from_config(cls, cfg: CfgNode, backbone: nn.Module, num_classes: int) -> TransReID:
        """MODEL.HEAD 'transreid' on the transformer `backbone_from_config` built."""
        if not isinstance(backbone, TransReIDViT):
            raise ConfigError(f"MODEL.HEAD 'transreid' needs a {PREFIX}<type> backbone")
        t = cfg.MODEL.TRANSREID
        model = cls(backbone, num_classes, cfg.TEST.NECK_FEAT, t.TEST_CAMERA, t.TEST_VIEW)
        if model.takes_camids:
            logger.info("TransReID SIE: images without a camera id use camera %d (%s.TEST_CAMERA)",
                        model.test_camera, KEYS)
        return model

    def _side_ids(self, x: torch.Tensor, camids: torch.Tensor | None,
                  viewids: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        batch = x.shape[0]
        if self.backbone.cameras:
            fixed = torch.full((batch,), self.test_camera, dtype=torch.long, device=x.device)
            if camids is None:
                if self.training:  # a training batch always knows its cameras
                    raise StrongReIDError(f"{KEYS}.SIE_CAMERA: the training forward needs the batch's camera ids")
                camids = fixed
            else:
                camids = camids.to(device=x.device, dtype=torch.long).reshape(-1)
                if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
                    if camids.numel() != batch:
                        raise StrongReIDError(f"TransReID got {camids.numel()} camera ids for {batch} images")
                    if bool((camids >= self.backbone.cameras).any()):
                        raise StrongReIDError(
                            f"camera id {int(camids.max())} is outside the {self.backbone.cameras} cameras "
                            f"the TransReID model embeds ({KEYS}.CAMERA_NUM); camera ids are 0-based, "
                            "and images of cameras the model never saw need camids -1 (its TEST_CAMERA)"
                        )
                camids = torch.where(camids < 0, fixed, camids)  # -1: unknown camera
        if self.backbone.views:
            if viewids is None:
                if self.training:
                    raise StrongReIDError(f"{KEYS}.SIE_VIEW: strongreid's datasets carry no view labels "
                                          "to train the view embedding with; set SIE_VIEW False")
                viewids = torch.full((batch,), self.test_view, dtype=torch.long, device=x.device)
        return camids, viewids

    def forward(self, x: torch.Tensor, camids: torch.Tensor | None = None,
                viewids: torch.Tensor | None = None) -> torch.Tensor | ModelOutput:
        camids, viewids = self._side_ids(x, camids, viewids)
        out = self.backbone(x, camids, viewids)
        feats = out if isinstance(out, list) else [out]
        suffixes = [""] + [f"_{i}" for i in range(1, self.num_local + 1)]
        bns = [getattr(self, "bottleneck" + s)(f) for s, f in zip(suffixes, feats)]
        if self.training:
            logits = [getattr(self, "classifier" + s)(b) for s, b in zip(suffixes, bns)]
            if not self.num_local:
                return ModelOutput(logits[0], feats[0])
            return ModelOutput(Branches(logits, self.loss_weights), Branches(feats, self.loss_weights))
        parts = bns if self.neck_feat == "after" else feats
        if not self.num_local:
            return parts[0]
        return torch.cat([parts[0]] + [p / self.num_local for p in parts[1:]], dim=1)
