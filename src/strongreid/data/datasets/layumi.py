"""Datasets in the shapes layumi's Person_reID_baseline_pytorch uses: its prepared `pytorch/`
folder (one sub-folder per identity, written by its prepare.py) and DG-Market, the images
DG-Net generated from Market-1501 (NVlabs/DG-Net), which layumi adds to training with --DG.
"""

from __future__ import annotations

import os
import re

from strongreid.data.datasets.base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    ImageRecord,
    Option,
    ReIDDataset,
    Splits,
    list_image_names,
    parse_pid_cam,
)
from strongreid.errors import DatasetError

# MSMT17 names (`0000_000_01_0303morning_0015_0.jpg`): the camera is the third field, which is
# what layumi's test_MSMT.py reads; Market/Duke/VeRi names carry `c<camera>` instead.
_MSMT_CAMERA = re.compile(r"^\d+_\d+_(\d+)_")
_LEADING_DIGITS = re.compile(r"\d+")


def layumi_camera(filename: str) -> int | None:
    """The 1-based camera of a file name, read as layumi's test.py reads it, else None.

    test.py takes the text after the first 'c' of the name (`0002_c1s1_...` -> 1); it keeps one
    digit, we keep all of them, so VeRi's `c012` is camera 12 (layumi would read 0). MSMT17
    names, which have no 'c', give their third field as test_MSMT.py does.
    """
    name = os.path.basename(filename)
    cut = name.find("c")
    if cut >= 0:
        match = _LEADING_DIGITS.match(name, cut + 1)
        if match is not None:
            return int(match.group())
    match = _MSMT_CAMERA.match(name)
    return int(match.group(1)) if match is not None else None


@DATASETS.register("layumi")
class LayumiPrepared(ReIDDataset):
    """The folder layumi's prepare.py writes: `pytorch/<split>/<pid>/<file>`.

    Splits: train/ (train_all/ with the option train_all or DATASETS.TRAIN_ALL), query/,
    gallery/, and when present val/ (the first image of each training identity, used as the
    validation split with DATASETS.VALIDATION 'first') and multi-query/ (Market's gt_bbox
    boxes, for TEST.MULTI_QUERY). The identity is the sub-folder's name (`-1` = junk, dropped;
    `0000` = Market's distractors, kept); the camera comes from the file name as layumi's
    test.py reads it (see `layumi_camera`). Only names are read, never images.
    """

    TITLE = "layumi prepared folder"
    OPTIONS = {
        "train_all": Option(
            False, "train on train_all/ (every training image) instead of train/ (val/ held out)"
        ),
    }
    FOLDER_NAMES = (
        "pytorch",
        "Market/pytorch",
        "Market-1501-v15.09.15/pytorch",
        "market1501/pytorch",
        "DukeMTMC-reID/pytorch",
    )
    LAYOUT = """\
ROOT/pytorch/             (what layumi's prepare.py writes; ROOT/Market/pytorch/ works too)
    train/<pid>/0002_c1s1_000451_03.jpg ...   train_all/ minus val/
    train_all/<pid>/...                       every training image (option train_all)
    val/<pid>/...                             first image of each training identity (optional)
    query/<pid>/...     gallery/<pid>/...
    multi-query/<pid>/...                     Market gt_bbox boxes (optional)
"""
    URL = "https://github.com/layumi/Person_reID_baseline_pytorch (python prepare.py)"

    def load(self) -> Splits:
        base = self.locate(self.FOLDER_NAMES, ("query", "gallery"))
        train_name = "train_all" if self.options["train_all"] else "train"
        train: list[ImageRecord] = []
        if os.path.isdir(os.path.join(base, train_name)):
            train = self.read_identity_folders("train", os.path.join(base, train_name))
        else:
            # A test-only folder (layumi's test.py needs only query/ and gallery/).
            self.omitted.add("train")
            self.sources["train"] = os.path.join(base, train_name)
        query = self.read_identity_folders("query", os.path.join(base, "query"))
        gallery = self.read_identity_folders("gallery", os.path.join(base, "gallery"))
        if os.path.isdir(os.path.join(base, "val")):
            self.val = self.read_identity_folders("val", os.path.join(base, "val"))
        if os.path.isdir(os.path.join(base, "multi-query")):
            self.multi_query = self.read_identity_folders(
                "multi_query", os.path.join(base, "multi-query")
            )
        return train, query, gallery

    def read_identity_folders(self, split: str, folder: str) -> list[ImageRecord]:
        """Records of `folder/<pid>/<image>`, sorted by identity then file name."""
        self.sources[split] = folder
        records: list[ImageRecord] = []
        with os.scandir(folder) as entries:
            subfolders = sorted(e.name for e in entries if e.is_dir())
        for sub in subfolders:
            try:
                pid = int(sub)
            except ValueError:
                raise DatasetError(
                    f"{self.TITLE}: {os.path.join(folder, sub)} is not an identity folder; "
                    f"{split} sub-folders are named by the identity number, as prepare.py "
                    "writes them (0002/, -1/ ...). Move other folders out."
                ) from None
            if pid == -1:
                continue  # junk boxes, as every loader here drops them
            path_dir = os.path.join(folder, sub)
            for name in list_image_names(path_dir, IMAGE_EXTENSIONS):
                camera = layumi_camera(name)
                if camera is None or camera < 1:
                    raise DatasetError(
                        f"{self.TITLE}: cannot read the camera of {os.path.join(path_dir, name)} "
                        "(layumi's test.py reads the digits after the first 'c', e.g. "
                        "0002_c1s1_000451_03.jpg)."
                    )
                records.append(ImageRecord(os.path.join(path_dir, name), pid, camera - 1))
        return records


# DG-Net's test_folder.py names an image `<structure label>_<appearance label>_gan<source>.jpg`
# in the folder of its appearance label, the source being the Market name it took the
# appearance from, e.g. 000/027_000_gan0002_c1s1_000451_03.jpg.
_DG_NAME = re.compile(r"^(\d+)_(\d+)_gan(.+)$")


@DATASETS.register("dg_market")
class DGMarket(ReIDDataset):
    """DG-Market (128,307 images DG-Net generated from Market-1501): a train-only dataset.

    Layout as published: ROOT/DG-Market/<label>/<structure>_<label>_gan<source>.jpg. Its
    authors publish it without identities; layumi's --DG reads it as an ImageFolder, whose
    classes are the <label> folders (the identity the appearance came from), and so do we: the
    folder is the identity, the camera that of the source name (`gan0002_c1s1_...`; 0 when the
    name carries none). Combine it with another dataset (DATASETS.NAMES "market1501,dg_market"):
    identities and cameras stay disjoint from the other dataset's, as `combine_train` keeps
    them. It has no query or gallery: evaluate on DATASETS.TEST_NAME.
    """

    TITLE = "DG-Market"
    FOLDER_NAMES = ("DG-Market", "dg-market", "DG_Market", "dg_market")
    LAYOUT = """\
ROOT/DG-Market/           (the unzipped DG-Market.zip)
    000/027_000_gan0002_c1s1_000451_03.jpg ...   one folder per label, 128,307 images
"""
    URL = "https://github.com/NVlabs/DG-Net#dg-market (DG-Market.zip, Google Drive / Baidu)"

    def load(self) -> Splits:
        tried = [self.root] + [os.path.join(self.root, c) for c in self.FOLDER_NAMES]
        base = next((t for t in tried if os.path.isdir(t) and _label_folders(t)), None)
        if base is None:
            raise self.not_found(tried, ["<label>/ image folders"], "numbered label folders")
        self.dataset_dir = base
        self.sources["train"] = base
        self.omitted.update({"query", "gallery"})
        train: list[ImageRecord] = []
        for sub in _label_folders(base):
            folder = os.path.join(base, sub)
            for name in list_image_names(folder, IMAGE_EXTENSIONS):
                match = _DG_NAME.match(os.path.splitext(name)[0])
                source = parse_pid_cam(match.group(3)) if match else None
                camid = source[1] - 1 if source is not None and source[1] >= 1 else 0
                train.append(ImageRecord(os.path.join(folder, name), int(sub), camid))
        return train, [], []


def _label_folders(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted((e.name for e in entries if e.is_dir() and e.name.isdigit()), key=int)
