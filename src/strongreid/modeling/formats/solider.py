"""SOLIDER-REID's trained ReID files (`transformer_120.pth`, its model-zoo Swin Tiny/Small/Base).

Its processor saves `model.state_dict()` of `build_transformer`, bare (a `module.` prefix when
the model was wrapped): the Swin under `base.` (`base.patch_embed.projection`,
`base.stages.<i>.blocks.<j>.attn.w_msa.qkv`, `base.norm0..3`, `base.semantic_embed_w.<i>`),
then `bottleneck.*` (BNNeck) and `classifier.weight`. What the keys say:

    patch_embed.projection rows, blocks per stage,    -> solider_swin_tiny / _small / _base
    heads (bias-table columns)
    semantic_embed_w.* present                        -> the semantic controller is built
    (absent)                                          -> MODEL.SEMANTIC_WEIGHT -1 (none)

Used: the Swin, `norm3`, the semantic layers after stages 0-2, the BNNeck and the classifier.
Listed as ignored, because SOLIDER's test feature never reads them: `norm0`-`norm2` (the
earlier stages' maps it returns beside the feature) and `semantic_embed_{w,b}.3` (applied after
the last stage's output is taken). A file with `fcneck` (MODEL.REDUCE_FEAT_DIM) or an absolute
position embedding was trained with an option strongreid does not build and is refused.

The weights do not record lambda (MODEL.SEMANTIC_WEIGHT): 0.2, SOLIDER-REID's value for all its
ReID results, unless the user's config sets it. The test transform is SOLIDER-REID's
(its configs and datasets/make_dataloader.py): Resize to 384 x 128 with torchvision's default
filter (bilinear: only its training Resize asks for bicubic), mean = std = 0.5; the test feature
is the global feature before the BNNeck (TEST.NECK_FEAT 'before'), L2-normalised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from strongreid.errors import CheckpointError
from strongreid.modeling.backbones.solider_swin import DEFAULT_SEMANTIC_WEIGHT, SOLIDER_SWINS
from strongreid.modeling.formats import CHECKPOINT_FORMATS, Converted
from strongreid.modeling.formats._peers import tensors_of, training_state, unused_error

SWIN = "base."
PROBE = SWIN + "stages.0.blocks.0.attn.w_msa.qkv.weight"
# Tensors of SOLIDER's Swin that its test feature does not use.
UNREAD = re.compile(r"^base\.(norm[012]\.|semantic_embed_[wb]\.3\.)")


def _state(raw: Mapping[str, Any]):
    return tensors_of(raw, ("state_dict", "model"))


def _architecture(state: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(embed dims, blocks per stage, heads per stage) read off the tensors."""
    dims = int(state[SWIN + "patch_embed.projection.weight"].shape[0])
    depths, heads = [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"base\.stages\.{i}\.blocks\.(\d+)\.", k))}
        table = state.get(f"{SWIN}stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table")
        depths.append(max(blocks) + 1 if blocks else 0)
        heads.append(int(table.shape[1]) if table is not None else 0)
    return dims, tuple(depths), tuple(heads)


@CHECKPOINT_FORMATS.register("solider")
class SoliderFormat:
    description = "SOLIDER-REID Swin Tiny / Small / Base ReID files (base.* / bottleneck.* / classifier.*)"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        state, _ = _state(raw)
        return PROBE in state and SWIN + "patch_embed.projection.weight" in state

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state, outer = _state(raw)
        if not self.detect(raw) or "classifier.weight" not in state or "bottleneck.weight" not in state:
            raise CheckpointError(
                f"{path} is not a SOLIDER-REID Swin ReID file: it lacks base.patch_embed.projection, "
                f"{PROBE}, bottleneck.* or classifier.weight (MODEL.CHECKPOINT_FORMAT is 'solider'; "
                "set it to 'auto' to detect the format)"
            )
        shape = _architecture(state)
        name = next((n for n, spec in SOLIDER_SWINS.items() if spec == shape), None)
        if name is None:
            known = "; ".join(f"{n}: dims {d}, depths {list(b)}, heads {list(h)}" for n, (d, b, h) in SOLIDER_SWINS.items())
            raise CheckpointError(
                f"{path} is a SOLIDER-REID Swin with dims {shape[0]}, depths {list(shape[1])} and heads "
                f"{list(shape[2])}, none of the Swins SOLIDER publishes ({known})"
            )
        out: dict[str, torch.Tensor] = {}
        ignored = training_state(outer)
        unused = []
        for key, tensor in state.items():
            if UNREAD.match(key):
                ignored.append(f"{key} (not read by SOLIDER's test feature)")
            elif key.startswith(SWIN) and not key.startswith(SWIN + "absolute_pos_embed"):
                out["backbone." + key[len(SWIN):]] = tensor
            elif key.startswith("bottleneck.") or key == "classifier.weight":
                out[key] = tensor
            else:
                unused.append(key)  # fcneck.* (REDUCE_FEAT_DIM), absolute_pos_embed, ...
        if unused:
            raise unused_error(path, "SOLIDER-REID", name, unused)
        semantic = SWIN + "semantic_embed_w.0.weight" in state
        overrides: dict[str, Any] = {
            "MODEL.NAME": name, "MODEL.HEAD": "solider", "TEST.NECK_FEAT": "before",
            "INPUT.SIZE_TEST": [384, 128], "INPUT.INTERPOLATION": "bilinear",
            "INPUT.PIXEL_MEAN": [0.5, 0.5, 0.5], "INPUT.PIXEL_STD": [0.5, 0.5, 0.5],
        }
        defaults: dict[str, Any] = {}
        warnings: dict[str, str] = {}
        if semantic:
            defaults["MODEL.SEMANTIC_WEIGHT"] = DEFAULT_SEMANTIC_WEIGHT
            warnings["MODEL.SEMANTIC_WEIGHT"] = (
                f"{path}: the file does not record the semantic weight lambda; using "
                f"{DEFAULT_SEMANTIC_WEIGHT}, SOLIDER-REID's value for all its ReID results. If the "
                "model was trained with another MODEL.SEMANTIC_WEIGHT, set that value: lambda scales "
                "every stage's tokens, so another value gives other features and a lower mAP."
            )
        else:
            overrides["MODEL.SEMANTIC_WEIGHT"] = -1.0  # trained without the controller
        return Converted(state=out, overrides=overrides, num_classes=int(state["classifier.weight"].shape[0]),
                         source=f"SOLIDER-REID {name}", ignored=ignored, defaults=defaults, warnings=warnings)
