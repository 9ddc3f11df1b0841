"""`FeatureExtractor`, the one-liner a tracker or a search system needs, and `strongreid extract`.

The feature of an image is computed exactly as `strongreid test` computes it: the test transform
(resize to INPUT.SIZE_TEST, ToTensor, normalise), the model's eval forward (the BN feature with
TEST.NECK_FEAT 'after', the pooled one with 'before'), then, with TEST.FLIP_AUG, the mean of the
image's and its horizontal mirror's features (TEST.MULTI_SCALE adds rescaled copies to that
mean, as layumi's --ms), and last, with TEST.FEAT_NORM 'yes', L2
normalisation (eps 1e-12). The flip mean is taken BEFORE normalising, so with both options on
the result is normalise((f(x) + f(flip(x))) / 2), a unit vector.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from yacs.config import CfgNode

from strongreid.engine.inference import test_feature, test_scales
from strongreid.errors import ConfigError, DatasetError, StrongReIDError
from strongreid.evaluation.calibration import Calibration, calibration_path
from strongreid.modeling.checkpoint import read_checkpoint_info
from strongreid.modeling.loading import config_for, load_inference_model
from strongreid.paths import atomic_path, atomic_write, check_output_path

logger = logging.getLogger("strongreid")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
OUTPUT_SUFFIXES = (".npz", ".safetensors")

# Market-1501 / DukeMTMC-reID / VeRi: `0002_c1s1_000451_03.jpg`, `0001_c2_f0046182.jpg`.
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# MSMT17: `0000_000_01_0303morning_0015_0.jpg` (pid, index, camera, ...).
_MSMT_NAME = re.compile(r"^(\d+)_\d+_(\d+)_")


def parse_pid_camid(path: str | os.PathLike) -> tuple[int, int]:
    """(pid, 0-based camid) from a Market/Duke-style or MSMT-style file name, else (-1, -1)."""
    name = os.path.basename(os.fspath(path))
    match = _MARKET_NAME.match(name) or _MSMT_NAME.match(name)
    if match is None:
        return -1, -1
    pid, cam = int(match.group(1)), int(match.group(2)) - 1
    return (pid, cam) if cam >= 0 else (-1, -1)


def list_images(source: str | os.PathLike, flag: str = "--images") -> list[str]:
    """Image paths of a folder (recursive, .jpg/.jpeg/.png/.bmp, sorted) or of a list file.

    A list file holds one path per line; blank lines and lines starting with '#' are skipped,
    and relative paths are taken relative to the list file's folder. `flag`: the command's
    option that gave `source`, named in the errors.
    """
    src = Path(source)
    if src.is_dir():
        found = [
            os.path.join(dirpath, name)
            for dirpath, _, names in os.walk(src)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        found.sort(key=lambda p: Path(p).relative_to(src).as_posix())
        if not found:
            raise DatasetError(
                f"no images (.jpg, .jpeg, .png, .bmp) found under {src}; check {flag}"
            )
        return found
    if src.is_file():
        try:
            lines = src.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read the image list {src}: {exc}") from None
        paths = []
        for line in lines:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = Path(entry)
            paths.append(str(path if path.is_absolute() else src.parent / path))
        if not paths:
            raise DatasetError(f"the image list {src} holds no paths (one image path a line)")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DatasetError(f"the image list {src} names a missing file: {missing[0]}{more}")
        return paths
    raise DatasetError(f"{flag} {src} is neither a folder nor a list file")


class FeatureExtractor:
    """Test features of images: `FeatureExtractor(config, weights)(images) -> (N, D) float32`.

    `config`: a yaml path, a CfgNode, or None for the config stored in the checkpoint (the
    defaults when it has none). `weights`: a strongreid checkpoint, a .safetensors file from
    `strongreid export`, or a peer's checkpoint (default: TEST.WEIGHT). `device`: 'auto', 'cpu',
    'cuda[:N]', a torch.device, or None for MODEL.DEVICE. `batch_size`: default
    TEST.IMS_PER_BATCH. `opts`: any config keys on top of `config`, as on the command line
    (["TEST.FLIP_AUG", "True", "TEST.MULTI_SCALE", "[1.0,1.1]"]) or as a mapping
    ({"TEST.FLIP_AUG": True, "MODEL.LAST_STRIDE": 1}).

    Accepted images (a list, or one of them alone):
      * file paths;
      * PIL images (converted to RGB);
      * numpy uint8 arrays, H x W x 3 RGB (or H x W grey), or a N x H x W x 3 stack;
      * torch uint8 tensors C x H x W or N x C x H x W: raw RGB pixels, preprocessed like arrays;
      * torch float tensors C x H x W or N x C x H x W: taken as already preprocessed (the test
        transform's output, INPUT.SIZE_TEST in size) and fed to the model as they are.
    Features come back on the CPU in input order, computed in fp32 unless TEST.PRECISION is 'amp'
    (then MODEL.AMP's autocast), as in `strongreid test`.
    TEST.FLIP_AUG averages the features of each image and its mirror BEFORE the TEST.FEAT_NORM
    L2 normalisation, as `strongreid test` does (see the module docstring).

    `calibration`: the JSON `strongreid calibrate` wrote; by default the one beside the weights
    (best.pt -> best.calibration.json) when it exists; False: none. With one, `probability(scores)` gives
    P(same person) of cosine scores and `same_person(a, b, precision)` decides at a precision;
    without one, everything else works as before and those two explain how to calibrate.
    """

    def __init__(
        self,
        config: str | os.PathLike | CfgNode | None = None,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int | None = None,
        opts: Sequence[str] | Mapping[str, Any] | None = None,
        calibration: str | os.PathLike | bool | None = None,
    ) -> None:
        from strongreid.config import flag
        from strongreid.config.loader import with_user_options
        from strongreid.data import build_transforms
        from strongreid.engine.runtime import feature_channels_last, feature_dtype, select_device

        info = read_checkpoint_info(weights) if weights else None
        cfg = config_for(config, info)
        if opts:
            cfg = with_user_options(cfg, opts)
        if not weights:
            weights = cfg.TEST.WEIGHT
            if not weights:
                raise ConfigError(
                    "FeatureExtractor needs weights: pass weights='run/best.pt' or set TEST.WEIGHT"
                )
            info = read_checkpoint_info(weights)
        self.weights = os.fspath(weights)
        # A foreign checkpoint (fast-reid, torchreid, layumi...) implies its own input size and
        # pixel statistics: the transforms below follow the config the model was built with.
        loaded = load_inference_model(cfg, self.weights, info)
        model, cfg, self.checkpoint_format = loaded.model, loaded.cfg, loaded.format
        self.cfg = cfg
        self.device = select_device(cfg if device is None else device)
        self.batch_size = int(batch_size if batch_size is not None else cfg.TEST.IMS_PER_BATCH)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        self.flip = bool(cfg.TEST.FLIP_AUG)
        self.scales = test_scales(cfg)
        self.feat_norm = flag(cfg.TEST.FEAT_NORM)
        self.input_size = (int(cfg.INPUT.SIZE_TEST[0]), int(cfg.INPUT.SIZE_TEST[1]))
        self.transform = build_transforms(cfg, is_train=False)
        self.amp_dtype = feature_dtype(cfg, self.device)
        self.channels_last = feature_channels_last(cfg, self.device, self.amp_dtype)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.feat_dim = int(model.feat_dim)
        self.calibration_file: str | None = None
        self.calibration: Calibration | None = None
        beside = calibration_path(self.weights)
        if calibration is True or calibration is None and beside.is_file():
            calibration = beside
        if calibration is not None and calibration is not False:
            self.calibration_file = os.fspath(calibration)
            self.calibration = Calibration.load(self.calibration_file)

    def __repr__(self) -> str:
        return (f"FeatureExtractor({self.cfg.MODEL.NAME}, weights={self.weights!r}, device={self.device}, "
                f"dim={self.feat_dim}, flip={self.flip}, scales={list(self.scales)}, "
                f"feat_norm={self.feat_norm})")

    # -- inputs ---------------------------------------------------------------------------------

    def _pil_to_tensor(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img.convert("RGB"))

    def _array_to_tensor(self, arr: np.ndarray, where: str) -> torch.Tensor:
        if arr.dtype != np.uint8:
            raise StrongReIDError(
                f"{where}: numpy images must be uint8 RGB (H x W x 3), got {arr.dtype}; convert "
                "floats in [0, 1] with (a * 255).round().astype(np.uint8)"
            )
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3)):
            img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
            return self._pil_to_tensor(img)
        raise StrongReIDError(f"{where}: expected an H x W x 3 array, got shape {tuple(arr.shape)}")

    def _tensor_batch(self, t: torch.Tensor, where: str) -> list[torch.Tensor]:
        batch = t.unsqueeze(0) if t.ndim == 3 else t
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise StrongReIDError(
                f"{where}: tensors must be C x H x W or N x C x H x W with 3 channels, got "
                f"shape {tuple(t.shape)}"
            )
        if batch.dtype == torch.uint8:
            return [self._array_to_tensor(x.permute(1, 2, 0).cpu().numpy(), where) for x in batch]
        if not batch.is_floating_point():
            raise StrongReIDError(f"{where}: tensors must be uint8 (raw pixels) or float, got {t.dtype}")
        if tuple(batch.shape[-2:]) != self.input_size:
            raise StrongReIDError(
                f"{where}: a float tensor is taken as preprocessed, so it must be "
                f"{self.input_size[0]} x {self.input_size[1]} (INPUT.SIZE_TEST), got "
                f"{tuple(batch.shape[-2:])}; pass raw images as paths, PIL images, uint8 arrays or "
                "uint8 tensors to have them resized and normalised"
            )
        return list(batch.float())

    def _flatten(self, images: Any) -> list[Any]:
        """Input items in order, each one image (a path, PIL image, array or 3-D tensor)."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            return [images]
        if isinstance(images, torch.Tensor):
            return [images] if images.ndim == 3 else list(images.unbind(0)) if images.ndim == 4 \
                else [images]
        if isinstance(images, np.ndarray):
            return list(images) if images.ndim == 4 else [images]
        if isinstance(images, Iterable):
            items: list[Any] = []
            for item in images:
                if isinstance(item, torch.Tensor) and item.ndim == 4:
                    items.extend(item.unbind(0))
                elif isinstance(item, np.ndarray) and item.ndim == 4:
                    items.extend(item)
                else:
                    items.append(item)
            return items
        raise StrongReIDError(f"cannot read images from a {type(images).__name__}")

    def preprocess(self, images: Any) -> torch.Tensor:
        """The model input batch (N x 3 x H x W, float32, CPU) for `images`."""
        tensors: list[torch.Tensor] = []
        for i, item in enumerate(self._flatten(images)):
            where = f"image {i}"
            if isinstance(item, (str, os.PathLike)):
                tensors.append(self._pil_to_tensor(read_image_file(item)))
            elif isinstance(item, Image.Image):
                tensors.append(self._pil_to_tensor(item))
            elif isinstance(item, np.ndarray):
                tensors.append(self._array_to_tensor(item, where))
            elif isinstance(item, torch.Tensor):
                tensors.extend(self._tensor_batch(item, where))
            else:
                raise StrongReIDError(
                    f"{where} is a {type(item).__name__}; give paths, PIL images, uint8 arrays or tensors"
                )
        if not tensors:
            return torch.empty(0, 3, *self.input_size)
        return torch.stack([t.cpu() for t in tensors])

    # -- features -------------------------------------------------------------------------------

    @torch.inference_mode()
    def features(self, batch: torch.Tensor, camids: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Features of one preprocessed batch: forward (+ flip / multi-scale mean), then L2 with
        FEAT_NORM. `camids`: one 0-based camera id per image, for a model that embeds the camera
        (TransReID's SIE; -1 or None: its MODEL.TRANSREID.TEST_CAMERA); other models ignore them."""
        if batch.shape[0] == 0:
            return torch.empty(0, self.feat_dim)
        x = batch.to(self.device, non_blocking=True)
        f = test_feature(self.model, x, self.flip, self.scales, self.feat_norm, self.amp_dtype, self.channels_last,
                         camids=camids)
        return f.float().cpu()

    # -- same person ----------------------------------------------------------------------------

    def _calibrated(self) -> Calibration:
        if self.calibration is None:
            raise StrongReIDError(
                f"{self.weights} has no calibration ({calibration_path(self.weights)} does not "
                f"exist): run `strongreid calibrate --model {self.weights} --data LABELLED_IMAGES` "
                "(or --from-clusters IMAGES), or pass calibration='file.calibration.json'"
            )
        return self.calibration

    def probability(self, scores: Any) -> np.ndarray:
        """P(same person) of cosine scores between features of this model."""
        return self._calibrated().probability(scores)

    def similarity(self, a: Any, b: Any) -> np.ndarray:
        """Cosine scores of a[i] with b[i] (one side may be a single item); features or images."""
        fa, fb = self._as_features(a, "a"), self._as_features(b, "b")
        if fa.shape[0] != fb.shape[0] and 1 not in (fa.shape[0], fb.shape[0]):
            raise StrongReIDError(f"same_person compares a[i] with b[i]: got {fa.shape[0]} and "
                                  f"{fb.shape[0]} items (give equal numbers, or one against many)")
        fa = fa / np.maximum(np.linalg.norm(fa, axis=1, keepdims=True), 1e-12)
        fb = fb / np.maximum(np.linalg.norm(fb, axis=1, keepdims=True), 1e-12)
        return (fa * fb).sum(axis=1)

    def same_person(self, a: Any, b: Any, precision: float = 0.95) -> np.ndarray:
        """Whether a[i] and b[i] show the same person, at the threshold that reaches `precision`
        on the calibration data: features ((D,) or (N, D) floats) or images, as __call__ takes."""
        calibration = self._calibrated()
        return calibration.same_person(self.similarity(a, b), precision)

    def _as_features(self, x: Any, name: str) -> np.ndarray:
        """(N, D) float64 features: float arrays / tensors of D columns are features already;
        anything else is embedded as images."""
        is_array = isinstance(x, (np.ndarray, torch.Tensor))
        floating = is_array and (x.is_floating_point() if isinstance(x, torch.Tensor)
                                 else np.issubdtype(x.dtype, np.floating))
        if floating and x.ndim in (1, 2) and x.shape[-1] == self.feat_dim:
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
            return np.asarray(arr, np.float64).reshape(-1, self.feat_dim)
        if floating and x.ndim in (1, 2):
            raise StrongReIDError(f"{name}: features of this model have {self.feat_dim} values, "
                                  f"got shape {tuple(x.shape)}")
        return self(x).numpy().astype(np.float64)

    def __call__(self, images: Any, camids: int | Sequence[int] | None = None) -> torch.Tensor:
        """Features of `images`; `camids` (one int for all, or one per image) as in `features`."""
        items = self._flatten(images)
        cams = None if camids is None else np.broadcast_to(np.asarray(camids, dtype=np.int64), (len(items),))
        out = [self.features(self.preprocess(items[i:i + self.batch_size]),
                             None if cams is None else cams[i:i + self.batch_size])
               for i in range(0, len(items), self.batch_size)]
        if not out:
            return torch.empty(0, self.feat_dim)
        return torch.cat(out)


def read_image_file(path: str | os.PathLike, flag: str | None = None) -> Image.Image:
    """`data.read_image`, with a message for a user's own image: the data layer's advice
    (DATASETS.ROOT_DIR, DATALOADER.SKIP_CORRUPT) is about training data and does nothing here.
    `flag`: the option that listed the image (e.g. '--images'), named in the message."""
    from strongreid.data import read_image

    try:
        return read_image(path)
    except DatasetError as exc:
        raise DatasetError(_image_problem(os.fspath(path), str(exc), flag)) from None


def _image_problem(path: str, text: str, flag: str | None) -> str:
    where = f" listed by {flag}" if flag else ""
    also = f", or leave it out of {flag}" if flag else ""
    if not os.path.isfile(path):
        return f"the image {path!r}{where} does not exist (moved or deleted?); check the path"
    # read_image says "cannot decode image '<path>' (<cause>); replace or delete ...".
    head, tail = f"cannot decode image {path!r} (", "); replace or delete"
    cause = text[len(head):text.rfind(tail)] if text.startswith(head) and tail in text else text
    return f"cannot decode image {path!r}{where} ({cause}); remove or replace the file{also}"


class _PathDataset(torch.utils.data.Dataset):
    """Decodes in loader workers; a bad file comes back as a message so the main process can
    raise one clean DatasetError (a worker's exception would carry a traceback in its text)."""

    def __init__(self, paths: Sequence[str], transform: Any, flag: str | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.flag = flag

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str]:
        try:
            return self.transform(read_image_file(self.paths[index], self.flag)), ""
        except DatasetError as exc:
            return None, str(exc)


def _collate(items: list[tuple[torch.Tensor | None, str]]) -> tuple[torch.Tensor | None, str]:
    for tensor, error in items:
        if tensor is None:
            return None, error
    return torch.stack([t for t, _ in items]), ""


def write_features(out: str | os.PathLike, feats: torch.Tensor, paths: Sequence[str],
                   pids: np.ndarray, camids: np.ndarray, metadata: dict[str, str] | None = None,
                   flag: str = "--out") -> list[Path]:
    """`.npz` with feats/paths/pids/camids, or `.safetensors` (feats) + `.csv` (index) beside it.

    Each file is written to a temporary name and then renamed, so an existing file is replaced
    whole or not at all; on a failure the temporary files go and the error (a StrongReIDError
    naming `flag` and the path) says why."""
    out = Path(out)
    feats = feats.detach().float().cpu().contiguous()
    index = out.with_suffix(".csv")
    try:
        if out.suffix == ".npz":
            # A file object: np.savez would append .npz to a str name.
            atomic_write(out, lambda f: np.savez(
                f, feats=feats.numpy(), paths=np.array(list(paths), dtype=str),
                pids=np.asarray(pids, dtype=np.int64), camids=np.asarray(camids, dtype=np.int64)))
            return [out]
        from safetensors.torch import save_file

        # Both files are complete before either replaces an older one: the inner block (the
        # features) replaces its file first, then the outer (the index).
        with atomic_path(index) as tmp_csv, atomic_path(out) as tmp:
            save_file({"feats": feats}, str(tmp), metadata=dict(metadata or {}))
            with open(tmp_csv, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["index", "path", "pid", "camid"])
                for i, (p, pid, cam) in enumerate(zip(paths, pids, camids)):
                    writer.writerow([i, p, int(pid), int(cam)])
        return [out, index]
    except OSError as exc:
        raise StrongReIDError(
            f"{flag} {out}: cannot write the features ({exc.strerror or exc}"
            f"{f': {exc.filename}' if exc.filename else ''}); check the path, its permissions "
            "and the free space"
        ) from None


def check_feature_output(out: str | os.PathLike, flag: str = "--out") -> Path:
    """`out` (.npz or .safetensors, whose .csv index goes beside it) can be written: checked
    before the features are computed, so a bad path costs nothing."""
    target = Path(out)
    if target.suffix not in OUTPUT_SUFFIXES:
        raise StrongReIDError(f"{flag} {out} must end with .npz or .safetensors")
    check_output_path(target, flag)
    if target.suffix == ".safetensors" and target.with_suffix(".csv").is_dir():
        raise StrongReIDError(f"{flag} {out}: its index {target.with_suffix('.csv')} would "
                              "replace a folder; give another --out")
    return target


def extract_command(cfg: CfgNode, images: str, out: str) -> int:
    """`strongreid extract --config F TEST.WEIGHT ckpt --images DIR_OR_LIST --out FILE`."""
    from tqdm import tqdm

    check_feature_output(out, "--out")
    if not cfg.TEST.WEIGHT:
        raise ConfigError("strongreid extract needs TEST.WEIGHT: the checkpoint, e.g. "
                          "TEST.WEIGHT runs/demo/best.pt")
    paths = list_images(images, "--images")
    extractor = FeatureExtractor(config=cfg, weights=cfg.TEST.WEIGHT, device=None)
    workers = min(int(cfg.DATALOADER.NUM_WORKERS), os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        _PathDataset(paths, extractor.transform, "--images"), batch_size=extractor.batch_size,
        shuffle=False, num_workers=workers, collate_fn=_collate, pin_memory=extractor.device.type == "cuda",
    )
    chunks = []
    # The camera ids of Market/MSMT-style names reach a model that embeds the camera (-1 where a
    # name has none: the model's fixed MODEL.TRANSREID.TEST_CAMERA).
    ids = np.array([parse_pid_camid(p) for p in paths], dtype=np.int64).reshape(-1, 2)
    done = 0
    # disable=None: a bar on a terminal, silence in logs and pipes.
    for batch, error in tqdm(loader, desc="extract", unit="batch", disable=None, file=sys.stderr):
        if batch is None:
            raise DatasetError(error)
        chunks.append(extractor.features(batch, ids[done:done + batch.shape[0], 1]))
        done += batch.shape[0]
    feats = torch.cat(chunks)
    written = write_features(
        out, feats, paths, ids[:, 0], ids[:, 1],
        {"weights": extractor.weights, "arch": cfg.MODEL.NAME, "feat_norm": str(extractor.feat_norm),
         "flip": str(extractor.flip), "neck_feat": str(cfg.TEST.NECK_FEAT),
         "multi_scale": ",".join(str(s) for s in extractor.scales)},
    )
    print(f"{len(paths)} features of dimension {feats.shape[1]} written to "
          f"{' and '.join(str(p) for p in written)}")
    return 0
