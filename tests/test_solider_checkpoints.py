"""SOLIDER-REID's Swin ReID files: built here with SOLIDER's key names and shapes (read off its
make_model.py / swin_transformer.py), loaded without a format key, and checked against SOLIDER's
forward written out below from its code: mmseg's Swin with corner padding, unfold merging,
windows of 7 over a zero-padded map, the -100 shift mask, and the semantic controller after
each stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _peer_e2e import OPTS, cosines, through_every_entry
from _train_utils import tiny_train_opts
from PIL import Image

from strongreid.config import load_config
from strongreid.errors import CheckpointError, ConfigError
from strongreid.modeling import build_model, create_backbone
from strongreid.modeling.formats import detect_format
from strongreid.modeling.loading import load_inference_model

# SOLIDER's swin_{tiny,small,base}_patch4_window7_224: embed dims, blocks and heads per stage.
SOLIDER = {"tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
           "base": (128, (2, 2, 18, 2), (4, 8, 16, 32))}


def solider_shapes(dims: int, depths, heads, classes: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a SOLIDER-REID build_transformer state dict (out_indices 0-3, semantic
    embedding on, no fcneck) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "base.patch_embed.projection.weight": (dims, 3, 4, 4), "base.patch_embed.projection.bias": (dims,),
        "base.patch_embed.norm.weight": (dims,), "base.patch_embed.norm.bias": (dims,)}
    widths = [dims, 2 * dims, 4 * dims, 8 * dims]
    for i, c in enumerate(widths):
        for j in range(depths[i]):
            p = f"base.stages.{i}.blocks.{j}."
            for norm in ("norm1", "norm2"):
                shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (c,)
            shapes[p + "attn.w_msa.relative_position_bias_table"] = (13 * 13, heads[i])
            shapes[p + "attn.w_msa.relative_position_index"] = (49, 49)
            shapes[p + "attn.w_msa.qkv.weight"], shapes[p + "attn.w_msa.qkv.bias"] = (3 * c, c), (3 * c,)
            shapes[p + "attn.w_msa.proj.weight"], shapes[p + "attn.w_msa.proj.bias"] = (c, c), (c,)
            shapes[p + "ffn.layers.0.0.weight"], shapes[p + "ffn.layers.0.0.bias"] = (4 * c, c), (4 * c,)
            shapes[p + "ffn.layers.1.weight"], shapes[p + "ffn.layers.1.bias"] = (c, 4 * c), (c,)
        if i < 3:
            p = f"base.stages.{i}.downsample."
            shapes[p + "norm.weight"] = shapes[p + "norm.bias"] = (4 * c,)
            shapes[p + "reduction.weight"] = (2 * c, 4 * c)
        shapes[f"base.norm{i}.weight"] = shapes[f"base.norm{i}.bias"] = (c,)
        width = widths[min(i + 1, 3)]  # the last pair reuses the third stage's output width
        for kind in "wb":
            shapes[f"base.semantic_embed_{kind}.{i}.weight"] = (width, 2)
            shapes[f"base.semantic_embed_{kind}.{i}.bias"] = (width,)
    c = widths[-1]
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"bottleneck.{leaf}"] = (c,)
    shapes["bottleneck.num_batches_tracked"] = ()
    shapes["classifier.weight"] = (classes, c)
    return shapes


def solider_index() -> torch.Tensor:
    """SOLIDER's relative_position_index: double_step_seq(13, 7, 1, 7), summed with its
    transpose, flipped left-right."""
    seq = (torch.arange(0, 13 * 7, 13)[:, None] + torch.arange(7)[None, :]).reshape(1, -1)
    return (seq + seq.T).flip(1)


def solider_file(size: str = "tiny", classes: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    """A trained-looking SOLIDER-REID state dict with random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in solider_shapes(*SOLIDER[size], classes).items():
        if key.endswith("relative_position_index"):
            t = solider_index()
        elif key.endswith("num_batches_tracked"):
            t = torch.tensor(500)
        elif key.endswith("relative_position_bias_table") or ".semantic_embed_" in key:
            t = torch.randn(shape, generator=g) * 0.5
        elif len(shape) >= 2:  # Linear / conv weights at the scale of their fan-in
            t = torch.randn(shape, generator=g) / (torch.tensor(shape[1:]).prod().float().sqrt())
        elif key.endswith(("running_var",)) or (key.endswith("weight") and "norm" in key) or key == "bottleneck.weight":
            t = torch.rand(shape, generator=g) + 0.5
        else:  # biases, running means
            t = torch.randn(shape, generator=g) * 0.05
        state[key] = t
    return state


# ---- SOLIDER's forward, from its swin_transformer.py and make_model.py --------------------------


def _ln(t, sd, key):
    return F.layer_norm(t, t.shape[-1:], sd[key + ".weight"], sd[key + ".bias"])


def _windows_attention(t, sd, p, hw, heads, shift):
    """ShiftWindowMSA: pad to multiples of 7, roll, attend per 7x7 window (bias + mask), unroll, crop."""
    n, (h, w), c = t.shape[0], hw, t.shape[2]
    fmap = t.reshape(n, h, w, c)
    hp, wp = -(-h // 7) * 7, -(-w // 7) * 7
    fmap = F.pad(fmap, (0, 0, 0, wp - w, 0, hp - h))
    if shift:
        fmap = fmap.roll((-shift, -shift), (1, 2))

    def part(size, k):  # the three bands of the shifted map along one axis
        return 0 if k < size - 7 else 1 if k < size - shift else 2

    labels = torch.tensor([[3 * part(hp, a) + part(wp, b) for b in range(wp)] for a in range(hp)])
    table, index = sd[p + "relative_position_bias_table"], sd[p + "relative_position_index"]
    bias = table[index.reshape(-1)].reshape(49, 49, heads).permute(2, 0, 1)
    out = torch.zeros_like(fmap)
    for a in range(0, hp, 7):
        for b in range(0, wp, 7):
            win = fmap[:, a:a + 7, b:b + 7].reshape(n, 49, c)
            q, k, v = F.linear(win, sd[p + "qkv.weight"], sd[p + "qkv.bias"]).reshape(
                n, 49, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            att = (q * (c // heads) ** -0.5) @ k.transpose(-1, -2) + bias
            if shift:
                lab = labels[a:a + 7, b:b + 7].reshape(49)
                att = att + (lab[:, None] != lab[None, :]).float() * -100.0
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, 49, c)
            out[:, a:a + 7, b:b + 7] = F.linear(y, sd[p + "proj.weight"], sd[p + "proj.bias"]).reshape(n, 7, 7, c)
    if shift:
        out = out.roll((shift, shift), (1, 2))
    return out[:, :h, :w].reshape(n, h * w, c)


def _merge(t, sd, p, hw):
    """PatchMerging: corner-pad to even, nn.Unfold(2, 2) order (channel, then row, then column)."""
    n, (h, w), c = t.shape[0], hw, t.shape[2]
    fmap = F.pad(t.reshape(n, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
    h2, w2 = fmap.shape[1] // 2, fmap.shape[2] // 2
    cat = fmap.reshape(n, h2, 2, w2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(n, h2 * w2, 4 * c)
    return F.linear(_ln(cat, sd, p + "norm"), sd[p + "reduction.weight"]), (h2, w2)


def solider_forward(sd: dict, x: torch.Tensor, size: str = "tiny", lam: float = 0.2,
                    neck_feat: str = "before") -> torch.Tensor:
    """build_transformer's eval forward: Swin -> avgpool(norm3(last stage)) -> (BNNeck)."""
    _, depths, heads = SOLIDER[size]
    base = {k[5:]: v for k, v in sd.items() if k.startswith("base.")}
    x = F.pad(x, (0, -x.shape[3] % 4, 0, -x.shape[2] % 4))
    f = F.conv2d(x, base["patch_embed.projection.weight"], base["patch_embed.projection.bias"], stride=4)
    hw = (f.shape[2], f.shape[3])
    t = _ln(f.flatten(2).transpose(1, 2), base, "patch_embed.norm")
    pair = torch.tensor([lam, 1 - lam])
    for i in range(4):
        for j in range(depths[i]):
            p = f"stages.{i}.blocks.{j}."
            t = t + _windows_attention(_ln(t, base, p + "norm1"), base, p + "attn.w_msa.", hw, heads[i],
                                       3 if j % 2 else 0)
            hidden = F.gelu(F.linear(_ln(t, base, p + "norm2"), base[p + "ffn.layers.0.0.weight"],
                                     base[p + "ffn.layers.0.0.bias"]))
            t = t + F.linear(hidden, base[p + "ffn.layers.1.weight"], base[p + "ffn.layers.1.bias"])
        out = t
        if i < 3:
            t, hw = _merge(t, base, f"stages.{i}.downsample.", hw)
        if lam >= 0:
            scale = F.linear(pair, base[f"semantic_embed_w.{i}.weight"], base[f"semantic_embed_w.{i}.bias"])
            t = t * F.softplus(scale) + F.linear(pair, base[f"semantic_embed_b.{i}.weight"],
                                                 base[f"semantic_embed_b.{i}.bias"])
    feat = _ln(out, base, "norm3").mean(1)
    if neck_feat == "before":
        return feat
    mean, var = sd["bottleneck.running_mean"], sd["bottleneck.running_var"]
    return (feat - mean) / torch.sqrt(var + 1e-5) * sd["bottleneck.weight"] + sd["bottleneck.bias"]


# ---- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    state = solider_file("tiny", classes=751)
    path = tmp_path_factory.mktemp("solider") / "transformer_120.pth"
    torch.save(state, path)  # SOLIDER's processor: torch.save(model.state_dict(), ...)
    return path, state


def test_tiny_file_loads_by_its_keys_and_computes_solider_features(tiny_file):
    path, state = tiny_file
    assert detect_format(torch.load(path, weights_only=True)) == "solider"
    loaded = load_inference_model(load_config(None, OPTS), path)
    c = loaded.cfg
    assert (loaded.format, c.MODEL.NAME, c.MODEL.HEAD, c.TEST.NECK_FEAT) == (
        "solider", "solider_swin_tiny", "solider", "before")
    assert (list(c.INPUT.SIZE_TEST), c.INPUT.INTERPOLATION, list(c.INPUT.PIXEL_MEAN), list(c.INPUT.PIXEL_STD)) == (
        [384, 128], "bilinear", [0.5] * 3, [0.5] * 3)
    assert c.MODEL.SEMANTIC_WEIGHT == 0.2 and len(loaded.warnings) == 1
    assert "MODEL.SEMANTIC_WEIGHT" in loaded.warnings[0]
    # 16 images at a size whose every stage needs corner and window padding: 34x15 tokens, ...
    x = torch.randn(16, 3, 136, 60, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = loaded.model(x), solider_forward(state, x)
    assert cosines(ours, theirs).min() >= 0.9999
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_semantic_weight_is_the_users_and_changes_the_features(tiny_file):
    path, state = tiny_file
    x = torch.randn(4, 3, 96, 32, generator=torch.Generator().manual_seed(4))
    loaded = load_inference_model(load_config(None, [*OPTS, "MODEL.SEMANTIC_WEIGHT", "0.8"]), path)
    assert loaded.cfg.MODEL.SEMANTIC_WEIGHT == 0.8 and loaded.warnings == ()
    with torch.no_grad():
        ours = loaded.model(x)
        assert cosines(ours, solider_forward(state, x, lam=0.8)).min() >= 0.9999
        assert cosines(ours, solider_forward(state, x, lam=0.2)).min() < 0.999
    # TEST.NECK_FEAT is SOLIDER's 'before' whatever the config says: its test feature.
    after = load_inference_model(load_config(None, [*OPTS, "TEST.NECK_FEAT", "after"]), path)
    assert after.cfg.TEST.NECK_FEAT == "before"


def test_ignored_tensors_are_named_and_foreign_options_refused(tiny_file, tmp_path):
    path, state = tiny_file
    from strongreid.modeling.formats.solider import SoliderFormat

    converted = SoliderFormat().convert(state, path)
    ignored = {s.split()[0] for s in converted.ignored}
    assert ignored == {f"base.norm{i}.{leaf}" for i in range(3) for leaf in ("weight", "bias")} | {
        f"base.semantic_embed_{k}.3.{leaf}" for k in "wb" for leaf in ("weight", "bias")}
    assert len(converted.state) + len(ignored) == len(state)
    # A wrapped, DataParallel-prefixed file is the same file.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    assert load_inference_model(load_config(None, OPTS), tmp_path / "wrapped.pth").cfg.MODEL.NAME == "solider_swin_tiny"
    # MODEL.REDUCE_FEAT_DIM's fcneck: not built here, refused by name.
    torch.save({**state, "fcneck.weight": torch.zeros(512, 768)}, tmp_path / "fcneck.pth")
    with pytest.raises(CheckpointError, match="SOLIDER-REID checkpoint of solider_swin_tiny.*fcneck.weight"):
        load_inference_model(load_config(None, OPTS), tmp_path / "fcneck.pth")
    # Without the semantic layers (SOLIDER's semantic_weight < 0) the controller is off.
    plain = {k: v for k, v in state.items() if ".semantic_embed_" not in k}
    torch.save(plain, tmp_path / "plain.pth")
    loaded = load_inference_model(load_config(None, OPTS), tmp_path / "plain.pth")
    assert loaded.cfg.MODEL.SEMANTIC_WEIGHT == -1.0 and loaded.model.backbone.semantic_embed_w is None
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert cosines(loaded.model(x), solider_forward(plain, x, lam=-1.0)).min() >= 0.9999


@pytest.mark.parametrize("size", ["small", "base"])
def test_small_and_base_key_names_and_shapes(size):
    # Meta tensors: the names and shapes without the memory; the converted state must fill the
    # model built for it exactly.
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in solider_shapes(*SOLIDER[size], 751).items()}
        from strongreid.modeling.formats.solider import SoliderFormat

        converted = SoliderFormat().convert(state, "swin_" + size)
        cfg = load_config(None, [*OPTS, "MODEL.NAME", f"solider_swin_{size}", "MODEL.HEAD", "solider"])
        model = build_model(cfg, converted.num_classes)
    assert converted.overrides["MODEL.NAME"] == f"solider_swin_{size}"
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in converted.state.items()}


def test_relative_position_index_and_config_checks():
    backbone = create_backbone("solider_swin_tiny", 1)
    assert torch.equal(backbone.stages[0].blocks[0].attn.w_msa.relative_position_index, solider_index())
    with pytest.raises(ConfigError, match="MODEL.NAME must be one of solider_swin_tiny"):
        load_config(None, [*OPTS, "MODEL.HEAD", "solider"])
    with pytest.raises(ConfigError, match="MODEL.SEMANTIC_WEIGHT = 1.5"):
        load_config(None, [*OPTS, "MODEL.HEAD", "solider", "MODEL.NAME", "solider_swin_tiny",
                           "MODEL.SEMANTIC_WEIGHT", "1.5"])


def test_preset_loads_and_trains_one_step(tmp_path):
    cfg = load_config("configs/solider_swin_base.yml", [])
    m = cfg.MODEL
    assert (m.NAME, m.HEAD, m.SEMANTIC_WEIGHT, m.DROP_PATH, cfg.TEST.NECK_FEAT) == (
        "solider_swin_base", "solider", 0.2, 0.1, "before")
    assert list(cfg.INPUT.SIZE_TRAIN) == [384, 128] and list(cfg.INPUT.PIXEL_MEAN) == [0.5] * 3
    # The training forward of the tiny Swin: logits from the BN feature, the global feature for
    # the triplet loss; the semantic layers stay frozen.
    tiny = load_config(None, [*OPTS, "MODEL.NAME", "solider_swin_tiny", "MODEL.HEAD", "solider"])
    model = build_model(tiny, 5).train()
    out = model(torch.randn(4, 3, 64, 32))
    assert out.logits.shape == (4, 5) and out.features.shape == (4, 768)
    out.logits.sum().backward()
    assert model.backbone.semantic_embed_w[0].weight.grad is None
    assert model.backbone.stages[0].blocks[0].attn.w_msa.qkv.weight.grad is not None


def test_solider_file_through_every_entry(tiny_file, few_people, tmp_path):
    path, state = tiny_file

    def reference(x):
        with torch.no_grad():
            return solider_forward(state, x)

    through_every_entry(path, few_people, tmp_path, source="SOLIDER-REID solider_swin_tiny",
                        fmt="solider", size=(384, 128), reference=reference,
                        resample=Image.Resampling.BILINEAR, mean=[0.5] * 3, std=[0.5] * 3,
                        train_opts=tiny_train_opts(few_people, tmp_path / "unused"))


def test_solider_pretrained_teacher_as_pretrain_path(tiny_file, tmp_path):
    # SOLIDER's convert_model.py output: the teacher's `backbone.*` Swin and its DINO `head.*`.
    _, state = tiny_file
    teacher = {"backbone." + k[5:]: v for k, v in state.items() if k.startswith("base.")}
    teacher["head.mlp.0.weight"] = torch.zeros(2048, 768)
    torch.save(teacher, tmp_path / "checkpoint_tea.pth")
    cfg = load_config(None, [*OPTS, "MODEL.NAME", "solider_swin_tiny", "MODEL.HEAD", "solider",
                             "MODEL.PRETRAIN_CHOICE", "imagenet", "MODEL.PRETRAIN_PATH",
                             str(tmp_path / "checkpoint_tea.pth")])
    model = build_model(cfg, 5)
    key = "stages.2.blocks.5.attn.w_msa.qkv.weight"
    assert torch.equal(model.backbone.state_dict()[key], state["base." + key])
    assert torch.equal(model.backbone.semantic_embed_b[1].bias, state["base.semantic_embed_b.1.bias"])


def test_train_then_test_a_tiny_solider_swin(tiny_synthetic_root, tmp_path):
    from strongreid.cli import main

    out = tmp_path / "run"
    opts = tiny_train_opts(tiny_synthetic_root, out, **{
        "MODEL.NAME": "solider_swin_tiny", "MODEL.HEAD": "solider", "MODEL.SEMANTIC_WEIGHT": "0.6",
        "SOLVER.MAX_EPOCHS": "1", "SOLVER.OPTIMIZER_NAME": "SGD", "TEST.NECK_FEAT": "before"})
    assert main(["train", *opts]) == 0
    # The checkpoint is strongreid's own: it rebuilds lambda 0.6 from its stored config.
    from strongreid.modeling.checkpoint import read_checkpoint_info
    from strongreid.modeling.loading import config_for

    info = read_checkpoint_info(out / "last.pt")
    loaded = load_inference_model(config_for(None, info), out / "last.pt", info)
    assert (loaded.format, loaded.cfg.MODEL.HEAD, loaded.model.backbone.semantic_weight) == ("strongreid", "solider", 0.6)
