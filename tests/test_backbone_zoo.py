"""Every layumi backbone and head builds at its ReID size and trains: forward + backward on two
images, random init. Also MODEL.TIMM_KWARGS, last stride 1 where the architecture allows it,
and the build-time error where it does not (HRNet)."""

from __future__ import annotations

import time

import pytest
import timm
import torch
import torch.nn.functional as F
from _train_utils import model_cfg

from strongreid.config import load_config
from strongreid.errors import ConfigError
from strongreid.modeling import build_model, create_backbone
from strongreid.modeling.outputs import is_part_logits
from strongreid.modeling.weights import load_backbone_state

# name, MODEL.HEAD, size, last stride, expected map (rows, cols) or None, test-feature width
ZOO = [
    ("resnet50", "baseline", (256, 128), 1, (16, 8), 2048),
    ("resnet50_ibn_a", "baseline", (256, 128), 1, (16, 8), 2048),
    ("timm:densenet121", "layumi", (256, 128), 1, (16, 8), 512),
    ("timm:swin_tiny_patch4_window7_224", "layumi", (256, 128), 2, (8, 4), 512),
    ("timm:swinv2_tiny_window8_256", "layumi", (256, 128), 2, (8, 4), 512),
    ("timm:convnext_tiny", "baseline", (256, 128), 1, (16, 8), 768),
    ("timm:efficientnet_b0", "baseline", (256, 128), 1, (16, 8), 1280),
    ("timm:hrnet_w18", "layumi", (256, 128), 2, (8, 4), 512),
    ("timm:vit_small_patch16_224", "baseline", (256, 128), 1, None, 384),
    ("resnet50", "pcb", (384, 192), 1, (24, 12), 2048 * 6),
    ("resnet50", "layumi", (256, 128), 2, (8, 4), 512),
]
TIMES: dict[str, float] = {}


@pytest.mark.parametrize("name, head, size, stride, fmap, dim", ZOO,
                         ids=[f"{z[0]}-{z[1]}" for z in ZOO])
def test_builds_and_trains_at_reid_size(name, head, size, stride, fmap, dim):
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = model_cfg(MODEL__NAME=name, MODEL__HEAD=head, MODEL__LAST_STRIDE=stride,
                    INPUT__SIZE_TRAIN=list(size), INPUT__SIZE_TEST=list(size))
    model = build_model(cfg, 4).train()
    x = torch.randn(2, 3, *size)
    if fmap is not None:
        with torch.no_grad():
            assert tuple(model.backbone(x).shape[2:]) == fmap
    logits, feats = model(x)
    parts = logits if is_part_logits(logits) else [logits]
    loss = sum(F.cross_entropy(p, torch.tensor([0, 1])) for p in parts) + feats.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, dim)
    TIMES[f"{name}-{head}"] = time.perf_counter() - t0


def test_hrnet_last_stride_1_fails_at_build_naming_the_key():
    with pytest.raises(ConfigError, match=r"MODEL.LAST_STRIDE = 1 is not possible with timm:hrnet_w18.*"
                                          r"Set MODEL.LAST_STRIDE 2"):
        create_backbone("timm:hrnet_w18", 1)


def test_densenet_and_efficientnet_take_last_stride_1_between_stages():
    # The strided layer sits between timm's last two stages (transition3 / blocks.5).
    with torch.device("meta"):
        for name in ("timm:densenet121", "timm:efficientnet_b0"):
            for stride, rows in ((1, 16), (2, 8)):
                b = create_backbone(name, stride)
                assert b(torch.empty(1, 3, 256, 128)).shape[2] == rows, (name, stride)


def test_timm_kwargs_reach_timm_from_yaml_and_command_line(tmp_path):
    yml = tmp_path / "c.yml"
    yml.write_text("MODEL:\n  DEVICE: cpu\n  NAME: 'timm:vit_small_patch16_224'\n"
                   "  TIMM_KWARGS: {drop_path_rate: 0.2, img_size: [128, 64]}\n")
    cfg = load_config(str(yml), [])
    from strongreid.config.loader import timm_kwargs

    assert timm_kwargs(cfg) == {"drop_path_rate": 0.2, "img_size": (128, 64)}
    with torch.device("meta"):
        backbone = create_backbone(cfg.MODEL.NAME, 1, timm_kwargs(cfg), img_size=(256, 128))
    assert backbone.model.patch_embed.img_size == (128, 64)  # the key wins over INPUT.SIZE_TRAIN
    assert backbone.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    cli = load_config(None, ["MODEL.DEVICE", "cpu", "MODEL.NAME", "timm:convnext_tiny",
                             "MODEL.TIMM_KWARGS", "{drop_path_rate: 0.1}"])
    assert timm_kwargs(cli) == {"drop_path_rate": 0.1}


@pytest.mark.parametrize("opts, match", [
    (["MODEL.TIMM_KWARGS", "{drop_path_rate: 0.2}"], "applies to timm backbones"),
    (["MODEL.NAME", "timm:convnext_tiny", "MODEL.TIMM_KWARGS", "drop_path_rate"], "give a mapping"),
    (["MODEL.NAME", "timm:convnext_tiny", "MODEL.TIMM_KWARGS", "{a: [}"], "not a YAML mapping"),
])
def test_bad_timm_kwargs_fail_up_front(opts, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["MODEL.DEVICE", "cpu", *opts])


def test_timm_rejecting_a_keyword_is_a_config_error():
    with pytest.raises(ConfigError, match=r"MODEL.TIMM_KWARGS = \{'no_such_arg': 1\}"):
        create_backbone("timm:resnet18", 2, {"no_such_arg": 1})


def test_imagenet_vit_weights_are_resampled_to_the_reid_grid():
    # A 224x224 ViT's state (14x14 position grid) loads into the 256x128 model (16x8 grid).
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    backbone = create_backbone("timm:vit_tiny_patch16_224", 1, img_size=(256, 128))
    assert backbone.model.pos_embed.shape == (1, 1 + 16 * 8, 192)
    report = load_backbone_state(backbone, src.state_dict(), "vit 224")
    assert not report.mismatched and "model.pos_embed" in report.loaded
    # The class token's embedding is carried over unchanged.
    assert torch.equal(backbone.model.pos_embed[0, 0], src.pos_embed[0, 0])


# --------------------------------------------------------------------------------------------
# AGW's non-local blocks
# --------------------------------------------------------------------------------------------


def test_non_local_formula():
    from strongreid.modeling.non_local import NonLocal

    torch.manual_seed(0)
    nl = NonLocal(4, inter_channels=2)
    nn_init = torch.nn.init
    nn_init.normal_(nl.W[1].weight)  # leave the zero init to see the attention term
    nl.eval()
    x = torch.randn(2, 4, 3, 2)
    with torch.no_grad():
        def conv(c, t):
            return torch.einsum("oc,bchw->bohw", c.weight[:, :, 0, 0], t) + c.bias.view(1, -1, 1, 1)
        th, ph, g = (conv(c, x).flatten(2) for c in (nl.theta, nl.phi, nl.g))  # B x I x N
        att = torch.einsum("bin,bim->bnm", th, ph) / 6  # N = 3 * 2 positions
        y = torch.einsum("bnm,bim->bin", att, g).reshape(2, 2, 3, 2)
        expected = x + nl.W[1](conv(nl.W[0], y))
        assert torch.allclose(nl(x), expected, atol=1e-5)


def test_non_local_blocks_sit_where_agw_puts_them():
    import copy

    cfg = model_cfg(MODEL__NAME="resnet50", MODEL__NON_LOCAL=True)
    plain = build_model(model_cfg(MODEL__NAME="resnet50"), 3)
    model = build_model(cfg, 3).eval()
    with_nl = [n for n, _ in model.named_modules() if n.endswith(".non_local")]
    assert with_nl == ["backbone.layer2.2.non_local", "backbone.layer2.3.non_local",
                       "backbone.layer3.3.non_local", "backbone.layer3.4.non_local",
                       "backbone.layer3.5.non_local"]
    # The ResNet's own names are unchanged (ImageNet files load); the blocks start as identity.
    assert set(plain.state_dict()) < set(model.state_dict())
    model.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain.eval()(x), atol=1e-5)
        twin = copy.deepcopy(model)
        torch.nn.init.ones_(twin.backbone.layer3[5].non_local.W[1].weight)
        assert not torch.allclose(twin(x), model(x))  # the copy runs its own block
    with pytest.raises(ConfigError, match="MODEL.NON_LOCAL needs a ResNet-style backbone"):
        build_model(model_cfg(MODEL__NAME="timm:efficientnet_b0", MODEL__NON_LOCAL=True), 3)
