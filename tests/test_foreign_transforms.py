"""A foreign checkpoint is tested with its own project's test transform: input size, pixel
statistics and the filter it resizes with, as each project's test script builds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _peer_e2e import OPTS, cosines, peer_pixels
from PIL import Image
from test_layumi_checkpoints import RefFtNet, randomise_bn
from test_solider_checkpoints import SOLIDER, solider_shapes
from test_torchreid_ibn import torchreid_ibn_shapes

from strongreid import FeatureExtractor
from strongreid.config import load_config
from strongreid.modeling import create_backbone
from strongreid.modeling.formats import CHECKPOINT_FORMATS

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _backbone_keys(name: str, prefix: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {prefix + k: v for k, v in create_backbone(name, 1).state_dict().items()}


def _neck(prefix: str, width: int) -> dict[str, torch.Tensor]:
    return _meta({f"{prefix}{leaf}": (width,) for leaf in ("weight", "bias", "running_mean", "running_var")})


# format -> (a file of it, (size, interpolation, mean, std) of the project's test transform):
#   fast-reid  data/transforms/build.py: T.Resize(size_test, interpolation=3) -> bicubic
#   layumi     test.py: transforms.Resize((256, 128), interpolation=3) -> bicubic
#   torchreid  data/transforms.py build_transforms: Resize((height, width)) -> bilinear
#   reid-strong-baseline  data/transforms/build.py: T.Resize(SIZE_TEST) -> bilinear
#   SOLIDER-REID  datasets/make_dataloader.py val_transforms: T.Resize(SIZE_TEST) -> bilinear, 0.5 / 0.5
TRANSFORMS = {
    "fastreid": (lambda: {**_backbone_keys("fastreid_resnet50", "backbone."), **_neck("heads.bottleneck.0.", 2048),
                          **_meta({"heads.weight": (9, 2048)})},
                 ([256, 128], "bicubic", *IMAGENET)),
    "layumi": (lambda: {**_backbone_keys("resnet50", "model."),
                        **_meta({"classifier.add_block.0.weight": (512, 2048), "classifier.add_block.0.bias": (512,),
                                 "classifier.classifier.0.weight": (9, 512), "classifier.classifier.0.bias": (9,)}),
                        **_neck("classifier.add_block.1.", 512)},
               ([256, 128], "bicubic", *IMAGENET)),
    "torchreid": (lambda: _meta(torchreid_ibn_shapes("a", 9)), ([256, 128], "bilinear", *IMAGENET)),
    "reid-strong-baseline": (lambda: {**_backbone_keys("resnet18", "base."), **_neck("bottleneck.", 512),
                                      **_meta({"classifier.weight": (9, 512)})},
                             ([256, 128], "bilinear", *IMAGENET)),
    "solider": (lambda: _meta(solider_shapes(*SOLIDER["tiny"], 9)), ([384, 128], "bilinear", [0.5] * 3, [0.5] * 3)),
}


@pytest.mark.parametrize("fmt", sorted(TRANSFORMS))
def test_every_format_states_its_projects_test_transform(fmt, tmp_path):
    build, (size, interpolation, mean, std) = TRANSFORMS[fmt]
    raw = build()
    assert CHECKPOINT_FORMATS.get(fmt)().detect(raw)
    converted = CHECKPOINT_FORMATS.get(fmt)().convert(raw, tmp_path / "model.pth")
    stated = {**converted.defaults, **converted.overrides}
    assert (stated["INPUT.SIZE_TEST"], stated["INPUT.INTERPOLATION"]) == (size, interpolation)
    np.testing.assert_allclose(stated["INPUT.PIXEL_MEAN"], mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(stated["INPUT.PIXEL_STD"], std, rtol=0, atol=1e-7)


def test_layumi_file_is_resized_bicubically_as_layumi_does(tmp_path: Path):
    torch.manual_seed(2)
    ref = RefFtNet(2)  # torchvision's own initialisation: the features follow the pixels
    randomise_bn(ref)
    path = tmp_path / "ft_ResNet50" / "net_last.pth"
    path.parent.mkdir()
    torch.save(ref.state_dict(), path)
    # Crops with detail at every scale, as a person's are: the resize filter matters.
    images = list(np.random.default_rng(3).integers(0, 256, size=(6, 143, 61, 3), dtype=np.uint8))
    extractor = FeatureExtractor(load_config(None, OPTS), path, device="cpu")
    got = extractor(images)
    with torch.no_grad():
        feats = {name: torch.nn.functional.normalize(ref.eval().test_feature(
            peer_pixels(images, (256, 128), resample, *IMAGENET)), dim=1)
            for name, resample in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR))}
    same, other = ((got - feats[k]).abs().max().item() for k in ("bicubic", "bilinear"))
    assert cosines(got, feats["bicubic"]).min() >= 0.9999 and same <= 1e-5
    # The bilinear features are another set: the filter alone moves them measurably.
    assert other > 1e-4 and other > 100 * same, (same, other)
