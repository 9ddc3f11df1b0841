"""CLIP-ReID's image model (Li et al., AAAI 2023): CLIP's image tower with two BNNecks.

MODEL.HEAD 'visual_clipreid' (CLIP-ReID's model on CLIP's `visual` tower) on MODEL.NAME
'clip:ViT-B-16' or 'clip:RN50'. The tower gives three features (backbones/clip.py, `encode`):
the second-to-last block's (stage's), the last one's (`img`, 768-d for ViT-B/16, 2048-d for
RN50) and CLIP's projected embedding (`proj`, 512 / 1024-d).
`img` and `proj` each pass a BNNeck (`bottleneck`, `bottleneck_proj`, BN bias frozen) and a
bias-free classifier (`classifier`, `classifier_proj`). Training: the ID loss is summed over the
two classifiers, the metric loss over the three features (CLIP-ReID's baseline, `train.py`).
Test feature: [img, proj] concatenated, before the necks with TEST.NECK_FEAT 'before' (what its
published configs use) or after them with 'after'.

Side information (ViT only): with MODEL.SIE_CAMERA a learnt embedding per camera (`cv_embed`,
MODEL.SIE_CAMERA_NUM rows) times MODEL.SIE_COE is added to the class token. The test feature
then depends on the camera: `forward(x, camids)`; without camera ids nothing is added, as
CLIP-ReID does when it gets none. strongreid tests such files; it does not train with cameras.
The module names are CLIP-ReID's, so its files map by renaming `image_encoder.` to
`backbone.visual.` (modeling/formats/clipreid.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config import flag
from strongreid.config.components import add_defaults
from strongreid.errors import ConfigError
from strongreid.modeling.heads import HEADS, make_bnneck, weights_init_classifier
from strongreid.modeling.outputs import Branches, ModelOutput

# CLIP-ReID's (and TransReID's) names and defaults for side information.
add_defaults({"MODEL.SIE_CAMERA": False, "MODEL.SIE_COE": 3.0, "MODEL.SIE_CAMERA_NUM": 0},
             owner="clipreid head")


@HEADS.register("visual_clipreid")
class CLIPReIDModel(nn.Module):
    """Training forward -> ModelOutput([logits, proj logits], [before, img, proj]); eval -> test feature."""

    def __init__(self, backbone: nn.Module, num_classes: int, neck_feat: str = "before",
                 sie_cameras: int = 0, sie_coe: float = 3.0) -> None:
        super().__init__()
        if not callable(getattr(backbone, "encode", None)) or not hasattr(backbone, "proj_dim"):
            raise ConfigError(
                f"MODEL.HEAD 'visual_clipreid' needs a CLIP image tower (MODEL.NAME 'clip:ViT-B-16' or "
                f"'clip:RN50'), not {getattr(backbone, 'arch', type(backbone).__name__)!r}."
            )
        if num_classes < 1:
            raise ConfigError(f"the training split has {num_classes} identities; need at least 1.")
        if neck_feat not in ("after", "before"):
            raise ConfigError(f"TEST.NECK_FEAT = {neck_feat!r}: use 'after' or 'before'.")
        if sie_cameras and backbone.kind != "vit":
            raise ConfigError("MODEL.SIE_CAMERA: CLIP-ReID adds camera embeddings to the ViT's class "
                              "token; its RN50 has none. Set MODEL.SIE_CAMERA False.")
        self.backbone = backbone
        self.in_planes = int(backbone.feat_dim)
        self.in_planes_proj = int(backbone.proj_dim)
        self.feat_dim = self.in_planes + self.in_planes_proj
        self.num_classes = int(num_classes)
        self.neck_feat = neck_feat
        self.arch = str(backbone.arch)
        self.bottleneck = make_bnneck(self.in_planes)
        self.bottleneck_proj = make_bnneck(self.in_planes_proj)
        self.classifier = nn.Linear(self.in_planes, self.num_classes, bias=False)
        self.classifier_proj = nn.Linear(self.in_planes_proj, self.num_classes, bias=False)
        self.classifier.apply(weights_init_classifier)
        self.classifier_proj.apply(weights_init_classifier)
        self.sie_coe = float(sie_coe)
        if sie_cameras:
            self.cv_embed: nn.Parameter | None = nn.Parameter(torch.zeros(sie_cameras, self.in_planes))
            nn.init.trunc_normal_(self.cv_embed, std=0.02)
        else:
            self.cv_embed = None
        self.class_layers = ("classifier.", "classifier_proj.")

    @property
    def takes_camids(self) -> bool:
        """True with a camera embedding: the test pipeline and the trainer then pass camera ids."""
        return self.cv_embed is not None

    @classmethod
    def check(cls, cfg: CfgNode) -> None:
        """The keys CLIP-ReID's model fixes or reads: BNNeck, softmax ID loss, no center loss, SIE."""
        m = cfg.MODEL
        if m.NECK != "bnneck":
            raise ConfigError(f"MODEL.HEAD 'visual_clipreid' has two BNNecks; MODEL.NECK is {m.NECK!r}: "
                              "set 'bnneck'.")
        if flag(m.IF_WITH_CENTER):
            raise ConfigError("MODEL.HEAD 'visual_clipreid' trains three features of different widths; "
                              "center loss needs one: set MODEL.IF_WITH_CENTER 'no'.")
        if m.ID_LOSS_TYPE != "softmax":
            raise ConfigError(f"MODEL.HEAD 'visual_clipreid' trains its two classifiers with softmax "
                              f"cross-entropy; MODEL.ID_LOSS_TYPE is {m.ID_LOSS_TYPE!r}: set 'softmax'.")
        if m.SIE_COE < 0:
            raise ConfigError(f"MODEL.SIE_COE = {m.SIE_COE} must be >= 0.")
        if m.SIE_CAMERA and m.SIE_CAMERA_NUM < 1:
            raise ConfigError("MODEL.SIE_CAMERA needs MODEL.SIE_CAMERA_NUM: the number of cameras "
                              "of the training set (the rows of the camera embedding).")

    @classmethod
    def from_config(cls, cfg: CfgNode, backbone: nn.Module, num_classes: int) -> CLIPReIDModel:
        """MODEL.HEAD 'visual_clipreid': TEST.NECK_FEAT, MODEL.SIE_CAMERA / SIE_CAMERA_NUM / SIE_COE."""
        cls.check(cfg)
        cameras = int(cfg.MODEL.SIE_CAMERA_NUM) if cfg.MODEL.SIE_CAMERA else 0
        return cls(backbone, num_classes, neck_feat=cfg.TEST.NECK_FEAT, sie_cameras=cameras,
                   sie_coe=cfg.MODEL.SIE_COE)

    def _camera_embedding(self, camids: torch.Tensor | None) -> torch.Tensor | None:
        """SIE_COE x the camera's embedding per image; no term for an unknown camera (id -1)."""
        if self.cv_embed is None or camids is None:
            return None
        camids = torch.as_tensor(camids, device=self.cv_embed.device).long()
        if bool((camids >= self.cv_embed.shape[0]).any()):
            raise ConfigError(
                f"camera ids {sorted(set(camids.tolist()))} are outside the model's "
                f"{self.cv_embed.shape[0]} camera embeddings (MODEL.SIE_CAMERA_NUM)."
            )
        known = (camids >= 0).unsqueeze(1).to(self.cv_embed.dtype)
        return self.sie_coe * self.cv_embed[camids.clamp(min=0)] * known

    def forward(self, x: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor | ModelOutput:
        if self.training and self.cv_embed is not None and camids is None:
            # The trainer hands models images and identities only: the camera embedding would
            # never learn, and the test features would then add untrained rows.
            raise ConfigError("training with MODEL.SIE_CAMERA is not supported (the trainer gives "
                              "the model no camera ids); set MODEL.SIE_CAMERA False to train.")
        before, img, proj = self.backbone.encode(x, self._camera_embedding(camids))
        feat = self.bottleneck(img)
        feat_proj = self.bottleneck_proj(proj)
        if self.training:
            logits = Branches([self.classifier(feat), self.classifier_proj(feat_proj)], [1.0, 1.0])
            return ModelOutput(logits, Branches([before, img, proj], [1.0, 1.0, 1.0]))
        if self.neck_feat == "after":
            return torch.cat([feat, feat_proj], dim=1)
        return torch.cat([img, proj], dim=1)
