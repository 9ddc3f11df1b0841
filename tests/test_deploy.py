"""FeatureExtractor, `strongreid extract` and `strongreid export` on a tiny random-weight ResNet-18."""

from __future__ import annotations

import csv
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.config.loader import dump_config
from strongreid.deploy import export as export_mod
from strongreid.deploy.export import PARITY_TOLERANCE, export_command, export_model
from strongreid.deploy.extractor import extract_command, list_images, parse_pid_camid
from strongreid.errors import CheckpointError, ConfigError, DatasetError, StrongReIDError
from strongreid.modeling import build_model

SIZE = (32, 16)
OPTS = {
    "MODEL.DEVICE": "cpu", "MODEL.NAME": "resnet18", "MODEL.PRETRAIN_CHOICE": "none",
    "MODEL.AMP": "off", "MODEL.CHANNELS_LAST": "off", "INPUT.SIZE_TEST": str(list(SIZE)),
    "DATASETS.NAMES": "synthetic", "DATALOADER.NUM_WORKERS": "0", "TEST.IMS_PER_BATCH": "4",
}


def make_cfg(**overrides):
    opts = {**OPTS, **{k: str(v) for k, v in overrides.items()}}
    return load_config(None, [x for kv in opts.items() for x in kv])


def save_ckpt(path: Path, cfg, num_classes: int = 5, seed: int = 0, fields: dict | None = None) -> Path:
    """A checkpoint as training writes it, with non-trivial BN statistics so eval BN matters."""
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    ckpt = {"model": model.state_dict(), "num_classes": num_classes, "arch": cfg.MODEL.NAME,
            "config": dump_config(cfg)}
    ckpt.update(fields or {})
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    cfg = make_cfg()
    ckpt = save_ckpt(root / "model.pt", cfg)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["0002_c1s1_000451_03.jpg", "sub/0007_c3s2_000100_01.png", "other.bmp"]
    for i, name in enumerate(names):
        arr = rng.integers(0, 256, size=(40 + 8 * i, 20 + 4 * i, 3), dtype=np.uint8)
        # Lossless formats only, so decoding gives back exactly `arr` for the array inputs.
        Image.fromarray(arr).save(images / name, format="PNG" if not name.endswith("bmp") else "BMP")
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "cfg": cfg, "ckpt": ckpt, "images": images,
            "paths": [str(images / n) for n in names]}


class FirstRow(nn.Module):
    """A stand-in model whose feature is row 0 of channel 0: hand-computable flip results."""

    feat_dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :]


# ---------------------------------------------------------------------------------------------
# FeatureExtractor


def test_same_features_for_every_input_kind(run) -> None:
    fe = FeatureExtractor(config=run["cfg"], weights=run["ckpt"], device="cpu")
    paths = run["paths"]
    arrays = [np.array(Image.open(p).convert("RGB")) for p in paths]
    from_paths = fe(paths)
    assert from_paths.shape == (3, 512) and from_paths.dtype == torch.float32
    assert from_paths.device.type == "cpu"
    assert torch.equal(fe([Path(p) for p in paths]), from_paths)
    assert torch.equal(fe([Image.open(p) for p in paths]), from_paths)
    assert torch.equal(fe(arrays), from_paths)
    assert torch.equal(fe([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]), from_paths)
    assert torch.equal(fe(fe.preprocess(paths)), from_paths)  # a preprocessed float batch
    # One image alone: another batch size may pick another kernel, hence allclose.
    assert torch.allclose(fe(paths[1]), from_paths[1:2], atol=1e-6)
    # And it is the model's test feature, L2-normalised (TEST.FEAT_NORM 'yes').
    with torch.no_grad():
        manual = F.normalize(fe.model(fe.preprocess(paths)), dim=1)
    assert torch.allclose(from_paths, manual, atol=1e-6)
    assert torch.allclose(from_paths.norm(dim=1), torch.ones(3), atol=1e-6)


def test_batch_size_and_config_source_do_not_change_features(run) -> None:
    reference = FeatureExtractor(config=run["cfg"], weights=run["ckpt"], device="cpu")(run["paths"])
    one_by_one = FeatureExtractor(config=run["cfg"], weights=run["ckpt"], device="cpu", batch_size=1)
    assert torch.allclose(one_by_one(run["paths"]), reference, atol=1e-5)
    # config=None takes the config stored in the checkpoint.
    from_ckpt = FeatureExtractor(weights=run["ckpt"], device="cpu")
    assert from_ckpt.input_size == SIZE
    assert torch.allclose(from_ckpt(run["paths"]), reference, atol=1e-5)
    yml = run["root"] / "config.yml"
    yml.write_text(dump_config(run["cfg"]))
    assert torch.allclose(FeatureExtractor(config=yml, weights=run["ckpt"])(run["paths"]), reference,
                          atol=1e-5)


def test_flip_average_by_hand(run) -> None:
    fe = FeatureExtractor(config=run["cfg"], weights=run["ckpt"], device="cpu")
    fe.model = FirstRow()
    x = torch.tensor([[[[1.0, 3.0]]] * 3, [[[4.0, 0.0]]] * 3])  # 2 x 3 x 1 x 2
    fe.flip, fe.feat_norm = False, False
    assert fe.features(x).tolist() == [[1.0, 3.0], [4.0, 0.0]]
    fe.flip = True  # mean of [1, 3] and its mirror [3, 1]
    assert fe.features(x).tolist() == [[2.0, 2.0], [2.0, 2.0]]
    fe.feat_norm = True  # normalised after the mean: [2, 2] / (2 sqrt 2)
    half = 1 / math.sqrt(2)
    assert torch.allclose(fe.features(x), torch.full((2, 2), half), atol=1e-7)


def test_flip_augmentation_on_the_real_model(run) -> None:
    paths = run["paths"]
    plain = FeatureExtractor(config=make_cfg(**{"TEST.FEAT_NORM": "no"}), weights=run["ckpt"])
    x = plain.preprocess(paths)
    raw, raw_mirror = plain(x), plain(torch.flip(x, dims=[3]))
    flipped = FeatureExtractor(config=make_cfg(**{"TEST.FEAT_NORM": "no", "TEST.FLIP_AUG": "True"}),
                               weights=run["ckpt"])(paths)
    assert not torch.allclose(flipped, raw, atol=1e-4)  # flip changes the features
    assert torch.allclose(flipped, (raw + raw_mirror) / 2, atol=1e-5)
    both = FeatureExtractor(config=make_cfg(**{"TEST.FLIP_AUG": "True"}), weights=run["ckpt"])(paths)
    assert torch.allclose(both, F.normalize((raw + raw_mirror) / 2, dim=1), atol=1e-5)


def test_neck_feat_before_gives_the_pooled_feature(run) -> None:
    after = FeatureExtractor(config=make_cfg(**{"TEST.FEAT_NORM": "no"}), weights=run["ckpt"])
    before = FeatureExtractor(config=make_cfg(**{"TEST.FEAT_NORM": "no", "TEST.NECK_FEAT": "before"}),
                              weights=run["ckpt"])
    x = after.preprocess(run["paths"])
    with torch.no_grad():
        pooled = after.model.pool(after.model.backbone(x))
    assert torch.allclose(before(x), pooled, atol=1e-6)
    assert torch.allclose(after(x), after.model.bottleneck(pooled), atol=1e-5)


def test_bf16_autocast_still_returns_float32(run) -> None:
    # channels_last, as MODEL.CHANNELS_LAST auto picks with bf16 on a CPU: oneDNN's bf16
    # convolution on contiguous tensors returned NaN for this 32x16 input on an AMX CPU in some
    # test orders (torch 2.14.1), which is not what this test is about.
    fe = FeatureExtractor(config=make_cfg(**{"MODEL.AMP": "bf16", "TEST.PRECISION": "amp",
                                              "MODEL.CHANNELS_LAST": "on"}),
                          weights=run["ckpt"])
    feats = fe(run["paths"][:2])
    reference = FeatureExtractor(config=run["cfg"], weights=run["ckpt"])(run["paths"][:2])
    assert feats.dtype == torch.float32
    assert F.cosine_similarity(feats, reference).min() > 0.95


def test_bad_inputs_are_named(run, tmp_path) -> None:
    fe = FeatureExtractor(config=run["cfg"], weights=run["ckpt"])
    bad = tmp_path / "0001_c1_broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is no jpeg")
    with pytest.raises(DatasetError, match="0001_c1_broken.jpg"):
        fe([run["paths"][0], str(bad)])
    with pytest.raises(StrongReIDError, match="uint8"):
        fe(np.zeros((32, 16, 3), dtype=np.float32))
    with pytest.raises(StrongReIDError, match=r"INPUT\.SIZE_TEST"):
        fe(torch.zeros(1, 3, 64, 32))
    with pytest.raises(StrongReIDError, match="3 channels"):
        fe(torch.zeros(1, 4, 32, 16))
    with pytest.raises(ConfigError, match="TEST.WEIGHT"):
        FeatureExtractor(config=run["cfg"])


def test_checkpoint_of_another_architecture_names_both(run, tmp_path) -> None:
    other = save_ckpt(tmp_path / "r34.pt", make_cfg(**{"MODEL.NAME": "resnet34"}))
    with pytest.raises(CheckpointError, match=r"'resnet34' model but MODEL\.NAME is 'resnet18'"):
        FeatureExtractor(config=run["cfg"], weights=other)
    # A bare state dict records no architecture: the weights themselves do not fit.
    torch.save(torch.load(other, weights_only=True)["model"], tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="resnet18"):
        FeatureExtractor(config=run["cfg"], weights=tmp_path / "bare.pt")


def test_checkpoint_class_count(run, tmp_path) -> None:
    # Another dataset's class count is fine: the model is built with the checkpoint's own.
    seven = save_ckpt(tmp_path / "seven.pt", run["cfg"], num_classes=7)
    assert FeatureExtractor(config=run["cfg"], weights=seven).model.num_classes == 7
    # A checkpoint whose recorded count contradicts its classifier names both counts.
    lying = save_ckpt(tmp_path / "lying.pt", run["cfg"], num_classes=5, fields={"num_classes": 9})
    with pytest.raises(CheckpointError, match="num_classes 9 but its classifier has 5 classes"):
        FeatureExtractor(config=run["cfg"], weights=lying)
    # A bare state dict (the original project's format) takes the count from its classifier.
    torch.save(torch.load(seven, weights_only=True)["model"], tmp_path / "bare.pt")
    assert FeatureExtractor(config=run["cfg"], weights=tmp_path / "bare.pt").model.num_classes == 7


# ---------------------------------------------------------------------------------------------
# strongreid extract


def test_parse_pid_camid_table() -> None:
    assert parse_pid_camid("a/0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_pid_camid("-1_c3s2_000001_01.jpg") == (-1, 2)
    assert parse_pid_camid("0001_c2_f0046182.jpg") == (1, 1)  # DukeMTMC-reID
    assert parse_pid_camid("0000_000_01_0303morning_0015_0.jpg") == (0, 0)  # MSMT17
    assert parse_pid_camid("0101_003_15_0303noon_1234_1.jpg") == (101, 14)
    assert parse_pid_camid("0001_c0.jpg") == (-1, -1)  # camera numbers start at 1
    assert parse_pid_camid("cat.png") == (-1, -1)


@given(pid=st.integers(-1, 99999), cam=st.integers(1, 99),
       rest=st.text("0123456789s_", max_size=12).filter(lambda r: not r[:1].isdigit()))
def test_parse_market_names(pid: int, cam: int, rest: str) -> None:
    # `rest` is what follows the camera number (`s1_000451_03`, `_f0046182`): never a digit.
    assert parse_pid_camid(f"/x/{pid:04d}_c{cam}{rest}.jpg") == (pid, cam - 1)


@given(pid=st.integers(0, 9999), index=st.integers(0, 999), cam=st.integers(1, 15))
def test_parse_msmt_names(pid: int, index: int, cam: int) -> None:
    assert parse_pid_camid(f"{pid:04d}_{index:03d}_{cam:02d}_0113morning_0003_0.jpg") == (pid, cam - 1)


def test_list_images_folder_and_list_file(run, tmp_path) -> None:
    images = run["images"]
    assert list_images(images) == [str(images / "0002_c1s1_000451_03.jpg"), str(images / "other.bmp"),
                                   str(images / "sub" / "0007_c3s2_000100_01.png")]
    listing = images / "list.txt"
    listing.write_text("# query\nother.bmp\n\n" + str(images / "sub" / "0007_c3s2_000100_01.png") + "\n")
    assert list_images(listing) == [str(images / "other.bmp"),
                                    str(images / "sub" / "0007_c3s2_000100_01.png")]
    listing.write_text("other.bmp\nmissing.jpg\n")
    with pytest.raises(DatasetError, match="missing.jpg"):
        list_images(listing)
    listing.unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DatasetError, match="neither a folder nor a list file"):
        list_images(tmp_path / "nowhere")


def test_extract_npz_and_safetensors(run, tmp_path, capsys) -> None:
    cfg = make_cfg(**{"TEST.WEIGHT": run["ckpt"], "TEST.IMS_PER_BATCH": 2})
    out = tmp_path / "feats.npz"
    assert extract_command(cfg, str(run["images"]), str(out)) == 0
    assert "3 features of dimension 512" in capsys.readouterr().out
    expected_paths = list_images(run["images"])
    with np.load(out, allow_pickle=False) as data:
        assert data["feats"].dtype == np.float32 and data["feats"].shape == (3, 512)
        assert data["paths"].tolist() == expected_paths
        assert data["pids"].tolist() == [2, -1, 7]
        assert data["camids"].tolist() == [0, -1, 2]
        feats = torch.from_numpy(data["feats"])
    reference = FeatureExtractor(config=cfg, weights=run["ckpt"])(expected_paths)
    assert torch.allclose(feats, reference, atol=1e-5)

    from safetensors.torch import load_file

    st_out = tmp_path / "feats.safetensors"
    assert extract_command(cfg, str(run["images"]), str(st_out)) == 0
    assert torch.allclose(load_file(str(st_out))["feats"], reference, atol=1e-5)
    with open(st_out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "path", "pid", "camid"]
    assert rows[1:] == [["0", expected_paths[0], "2", "0"], ["1", expected_paths[1], "-1", "-1"],
                        ["2", expected_paths[2], "7", "2"]]
    with pytest.raises(StrongReIDError, match=r"must end with \.npz or \.safetensors"):
        extract_command(cfg, str(run["images"]), str(tmp_path / "feats.txt"))


def test_extract_cli_names_an_undecodable_image(run, tmp_path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.open(run["paths"][0]).save(folder / "0001_c1s1_000001_01.png")
    (folder / "0001_c2s1_000002_01.jpg").write_bytes(b"GIF89a truncated")
    config = tmp_path / "cfg.yml"
    config.write_text(dump_config(make_cfg(**{"DATALOADER.NUM_WORKERS": 1})))
    code = main(["extract", "--config", str(config), "--images", str(folder), "--out",
                 str(tmp_path / "f.npz"), "TEST.WEIGHT", str(run["ckpt"])])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: cannot decode image" in err and "0001_c2s1_000002_01.jpg" in err
    assert "Traceback" not in err
    assert not (tmp_path / "f.npz").exists()


# ---------------------------------------------------------------------------------------------
# strongreid export


def _preprocessed(run) -> tuple[torch.Tensor, torch.Tensor]:
    fe = FeatureExtractor(config=run["cfg"], weights=run["ckpt"])
    x = fe.preprocess(run["paths"] + run["paths"][:2])  # a batch of 5, not a traced size
    return x, fe(x)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="the deploy extra (onnx, onnxruntime) is not installed: pip install '.[deploy]'",
)
def test_onnx_export_parity_and_dynamic_batch(run, tmp_path, capsys) -> None:
    import onnx
    import onnxruntime as ort

    cfg = make_cfg(**{"TEST.WEIGHT": run["ckpt"]})
    out = tmp_path / "model.onnx"
    assert export_command(cfg, "onnx", str(out)) == 0
    printed = capsys.readouterr().out
    diff = float(printed.split("max |onnx - pytorch| = ")[1].split()[0])
    assert 0 <= diff <= PARITY_TOLERANCE
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["feat_norm"] == "yes" and meta["input_size"] == "[32, 16]" and meta["arch"] == "resnet18"
    x, features = _preprocessed(run)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (5, 512)
    assert np.abs(got - features.numpy()).max() <= PARITY_TOLERANCE
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # FEAT_NORM inside the graph


def test_torchscript_export_parity(run, tmp_path) -> None:
    cfg = make_cfg(**{"TEST.WEIGHT": run["ckpt"], "TEST.FLIP_AUG": "True"})
    path, diff, _ = export_model(cfg, "torchscript", tmp_path / "model.ts")
    assert diff <= PARITY_TOLERANCE
    with warnings.catch_warnings():  # PyTorch 2.14 deprecates TorchScript in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path))
    fe = FeatureExtractor(config=cfg, weights=run["ckpt"])
    x = fe.preprocess(run["paths"])
    with torch.no_grad():
        assert torch.allclose(loaded(x), fe(x), atol=PARITY_TOLERANCE)


def test_safetensors_round_trip(run, tmp_path) -> None:
    cfg = make_cfg(**{"TEST.WEIGHT": run["ckpt"]})
    path, diff, _ = export_model(cfg, "safetensors", tmp_path / "model.safetensors")
    assert diff == 0.0
    x, features = _preprocessed(run)
    # The file loads like a checkpoint, config included.
    assert torch.equal(FeatureExtractor(weights=path)(x), features)


def test_export_fails_above_the_tolerance(run, tmp_path, monkeypatch) -> None:
    real = export_mod._run_torchscript

    def drifting(out):
        run_ts = real(out)
        return lambda x: run_ts(x) + 1e-3

    monkeypatch.setattr(export_mod, "_run_torchscript", drifting)
    cfg = make_cfg(**{"TEST.WEIGHT": run["ckpt"]})
    with pytest.raises(StrongReIDError, match=r"differs from PyTorch by up to 0\.001"):
        export_model(cfg, "torchscript", tmp_path / "drift.ts")
    with pytest.raises(ConfigError, match="TEST.WEIGHT"):
        export_model(make_cfg(), "torchscript", tmp_path / "x.ts")
    with pytest.raises(ConfigError, match="--format"):
        export_model(cfg, "tflite", tmp_path / "x.tflite")


def test_test_extract_export_and_extractor_compute_one_feature(run) -> None:
    """PCB with flip and two scales: every consumer gets the feature of engine.inference.test_feature."""
    from strongreid.deploy.export import build_inference_model
    from strongreid.engine.inference import extract_features, test_feature, tta_forward

    cfg = make_cfg(**{"MODEL.HEAD": "pcb", "MODEL.PCB_PARTS": 2, "MODEL.LAST_STRIDE": 1,
                      "TEST.FLIP_AUG": True, "TEST.MULTI_SCALE": "[1.0, 1.1]", "TEST.FEAT_NORM": "yes"})
    ckpt = save_ckpt(run["root"] / "pcb.pt", cfg)
    fe = FeatureExtractor(config=cfg, weights=ckpt, device="cpu")
    batch = fe.preprocess(run["paths"])
    with torch.no_grad():
        by_hand = F.normalize(tta_forward(fe.model, batch, True, (1.0, 1.1)), dim=1)
        exported, _ = build_inference_model(cfg, ckpt)
        feats = {
            "FeatureExtractor": fe(run["paths"]),
            "test_feature": test_feature(fe.model, batch, True, (1.0, 1.1), normalize=True),
            "export graph": exported(batch),
            # strongreid test: unnormalised features, TEST.FEAT_NORM applied by the evaluator
            "test": F.normalize(extract_features(fe.model, [(batch, [0] * 3, [0] * 3, run["paths"])],
                                                 torch.device("cpu"), flip=True, scales=(1.0, 1.1))[0], dim=1),
        }
    for name, got in feats.items():
        torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-6, msg=name)
    # PCB merges raw stripes; the mean of its normalised views differs, so a consumer with a recipe
    # of its own would fail above.
    with torch.no_grad():
        plain_mean = F.normalize(tta_forward(lambda x: fe.model(x), batch, True, (1.0, 1.1)), dim=1)
    assert not torch.allclose(plain_mean, by_hand, atol=1e-4)


# --------------------------------------------------------------------------------------------
# one feature everywhere: test / extract / FeatureExtractor / ONNX; the input contract


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="the deploy extra (onnx, onnxruntime) is not installed: pip install '.[deploy]'",
)
def test_test_extract_extractor_and_onnx_give_one_feature(tiny_synthetic_root, tmp_path, capsys) -> None:
    """MODEL.AMP and CHANNELS_LAST stay 'auto' (bf16 + channels_last on an AMX CPU for
    training): test-time features are fp32 unless TEST.PRECISION amp, so all four agree."""
    import json

    import onnx
    import onnxruntime as ort

    from strongreid.data.datasets import build_dataset
    from strongreid.evaluation import evaluate_from_config

    base = {**OPTS, "MODEL.AMP": "auto", "MODEL.CHANNELS_LAST": "auto", "INPUT.INTERPOLATION": "bicubic",
            "TEST.FLIP_AUG": "True", "TEST.MULTI_SCALE": "[1.0,1.5]", "DATASETS.ROOT_DIR": str(tiny_synthetic_root)}
    cfg = make_cfg(**{k: v for k, v in base.items() if k not in OPTS or OPTS[k] != v})
    ckpt = save_ckpt(tmp_path / "model.pt", cfg)
    opts = [x for kv in {**base, "TEST.WEIGHT": str(ckpt)}.items() for x in kv]
    ds = build_dataset("synthetic", tiny_synthetic_root)
    records = ds.query + ds.gallery
    fe = FeatureExtractor(cfg, ckpt)
    assert fe.amp_dtype is None and not fe.channels_last
    feats = fe([r.path for r in records])

    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(r.path for r in records))
    assert main(["extract", "--images", str(listing), "--out", str(tmp_path / "f.npz"), *opts]) == 0
    assert np.array_equal(np.load(tmp_path / "f.npz")["feats"], feats.numpy())

    out = tmp_path / "model.onnx"
    assert main(["export", "--out", str(out), *opts]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["interpolation"] == "bicubic" and meta["multi_scale"] == "[1.0, 1.5]"
    assert "with bicubic interpolation" in meta["input"]
    assert "its horizontal mirror" in meta["views"] and "[1.5]" in meta["views"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = fe.preprocess([r.path for r in records])
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert np.abs(got - feats.numpy()).max() <= PARITY_TOLERANCE

    res_dir = tmp_path / "test"
    assert main(["test", *opts, "OUTPUT_DIR", str(res_dir)]) == 0
    res = json.loads((res_dir / "results.json").read_text())
    assert res["precision"] == "float32" and res["interpolation"] == "bicubic"
    nq = len(ds.query)
    pids, cams = np.array([r.pid for r in records]), np.array([r.camid for r in records])
    want = evaluate_from_config(load_config(None, opts), feats[:nq], feats[nq:], pids[:nq], pids[nq:],
                                cams[:nq], cams[nq:])["plain"]
    assert res["mAP"] == pytest.approx(want.mAP, abs=1e-9)
    capsys.readouterr()


def test_precision_amp_is_asked_for_explicitly(run) -> None:
    fp32 = FeatureExtractor(config=make_cfg(**{"MODEL.AMP": "bf16"}), weights=run["ckpt"])
    amp = FeatureExtractor(config=make_cfg(**{"MODEL.AMP": "bf16", "TEST.PRECISION": "amp"}),
                           weights=run["ckpt"])
    assert fp32.amp_dtype is None and amp.amp_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="TEST.PRECISION"):
        make_cfg(**{"TEST.PRECISION": "bf16"})


def test_feature_extractor_takes_any_config_key_as_opts(run) -> None:
    listed = FeatureExtractor(run["cfg"], run["ckpt"], opts=["TEST.FLIP_AUG", "True", "TEST.MULTI_SCALE",
                                                             "[1.0,1.2]"])
    mapped = FeatureExtractor(run["cfg"], run["ckpt"], opts={"TEST.FLIP_AUG": True,
                                                             "TEST.MULTI_SCALE": [1.0, 1.2]})
    assert listed.flip and listed.scales == (1.0, 1.2) and mapped.flip and mapped.scales == (1.0, 1.2)
    assert torch.equal(listed(run["paths"]), mapped(run["paths"]))
    assert not torch.allclose(listed(run["paths"]), FeatureExtractor(run["cfg"], run["ckpt"])(run["paths"]))
    with pytest.raises(ConfigError, match="TEST.FLIP_AUGG"):
        FeatureExtractor(run["cfg"], run["ckpt"], opts={"TEST.FLIP_AUGG": True})
    with pytest.raises(ConfigError, match="a list of KEY VALUE strings"):
        FeatureExtractor(run["cfg"], run["ckpt"], opts="TEST.FLIP_AUG True")


def test_documented_preprocessing_reproduces_the_test_transform(run) -> None:
    """docs/deploy.md's lines for feeding an exported file: PIL resize with the metadata's
    interpolation, / 255, (x - mean) / std, NCHW."""
    cfg = make_cfg(**{"INPUT.INTERPOLATION": "bicubic", "INPUT.PIXEL_MEAN": "[0.5, 0.4, 0.3]"})
    fe = FeatureExtractor(cfg, run["ckpt"])
    mean, std = np.array([0.5, 0.4, 0.3]), np.array(cfg.INPUT.PIXEL_STD)
    for path in run["paths"]:
        img = Image.open(path).convert("RGB").resize((SIZE[1], SIZE[0]), Image.BICUBIC)
        x = ((np.asarray(img, np.float32) / 255 - mean) / std).astype(np.float32).transpose(2, 0, 1)
        assert np.abs(x - fe.preprocess([path])[0].numpy()).max() < 1e-6


class UnderAutocast(nn.Module):
    """A stand-in whose feature is the first four pixels, rounded to bf16 under autocast, or
    broken there as `fault` says ('zero', 'nan', or 'nan_later': NaN from the second call on)."""

    def __init__(self, fault: str | None = None) -> None:
        super().__init__()
        self.fault, self.autocast_calls, self.fp32_calls = fault, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.flatten(1)[:, :4].float()
        if not torch.is_autocast_enabled("cpu"):
            self.fp32_calls += 1
            return out
        self.autocast_calls += 1
        if self.fault == "zero":
            return torch.zeros_like(out)
        if self.fault == "nan" or (self.fault == "nan_later" and self.autocast_calls > 1):
            return out * float("nan")
        return out.bfloat16()


def test_autocast_agrees_by_row_cosine() -> None:
    from strongreid.engine.runtime import autocast_agrees

    full = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # Row cosines 1 and 1/sqrt(2) = 0.7071.
    reduced = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert not autocast_agrees(reduced, full)
    assert autocast_agrees(reduced, full, min_cosine=0.70)
    assert not autocast_agrees(reduced, full, min_cosine=0.71)
    assert autocast_agrees(full * 3, full)
    assert not autocast_agrees(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), full)  # a zero row
    assert not autocast_agrees(torch.tensor([[1.0, float("nan")], [1.0, 1.0]]), full)
    assert not autocast_agrees(full[:1], full)


def test_a_shape_whose_mixed_precision_features_are_wrong_is_computed_in_fp32(caplog) -> None:
    from strongreid.engine.inference import test_feature

    model, images = UnderAutocast("zero"), torch.rand(2, 3, 8, 4)
    with caplog.at_level("WARNING", logger="strongreid"):
        feats = test_feature(model, images, amp_dtype=torch.bfloat16)
    assert torch.equal(feats, images.flatten(1)[:, :4])
    assert "disagree with fp32" in caplog.text and "[2, 3, 8, 4]" in caplog.text
    assert (model.autocast_calls, model.fp32_calls) == (1, 1)
    # That shape goes straight to fp32 from now on; another shape is checked once more.
    assert torch.equal(test_feature(model, images * 2, amp_dtype=torch.bfloat16), (images * 2).flatten(1)[:, :4])
    assert (model.autocast_calls, model.fp32_calls) == (1, 2)
    test_feature(model, torch.rand(3, 3, 8, 4), amp_dtype=torch.bfloat16)
    assert (model.autocast_calls, model.fp32_calls) == (2, 3)


def test_sound_mixed_precision_is_checked_once_per_shape_and_kept() -> None:
    from strongreid.engine.inference import test_feature

    model, images = UnderAutocast(), torch.rand(2, 3, 8, 4)
    first = test_feature(model, images, amp_dtype=torch.bfloat16)
    assert torch.equal(first, images.flatten(1)[:, :4].bfloat16().float())  # the bf16 result
    assert (model.autocast_calls, model.fp32_calls) == (1, 1)
    test_feature(model, images, amp_dtype=torch.bfloat16)
    assert (model.autocast_calls, model.fp32_calls) == (2, 1)
    # Flipped views are another computation, so they get their own check.
    test_feature(model, images, flip=True, amp_dtype=torch.bfloat16)
    assert (model.autocast_calls, model.fp32_calls) == (4, 3)


def test_non_finite_mixed_precision_features_are_recomputed_in_fp32(caplog) -> None:
    from strongreid.engine.inference import test_feature

    model, images = UnderAutocast("nan_later"), torch.rand(2, 3, 8, 4)
    test_feature(model, images, amp_dtype=torch.bfloat16)  # sound at the check
    with caplog.at_level("WARNING", logger="strongreid"):
        feats = test_feature(model, images, amp_dtype=torch.bfloat16)
    assert torch.equal(feats, images.flatten(1)[:, :4])
    assert "recomputed in fp32" in caplog.text
    # fp32 never takes the second pass (the exported graphs hold no such branch).
    assert torch.isnan(test_feature(lambda x: x.flatten(1) * float("nan"), images)).all()


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="needs onnxruntime: pip install 'strongreid[deploy]'")
def test_onnxruntime_starts_with_its_usage_telemetry_off() -> None:
    import os
    import subprocess
    import sys

    code = ("import os, sys; from strongreid.deploy.runtimes import load_onnxruntime; "
            "load_onnxruntime(); sys.stdout.write(os.environ['ORT_TELEMETRY_DISABLED'])")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if k != "ORT_TELEMETRY_DISABLED"}
    env["PYTHONPATH"] = src
    # Off unless the user said otherwise, before onnxruntime starts in the process...
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert off.returncode == 0 and off.stdout == "1", off.stderr
    # ...and a user's own choice is theirs.
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "ORT_TELEMETRY_DISABLED": "0"},
                          capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0 and kept.stdout == "0", kept.stderr
