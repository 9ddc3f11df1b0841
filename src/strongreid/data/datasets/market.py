"""Datasets in the Market-1501 layout: three folders of images named `<pid>_c<cam>...`.

Market-1501, DukeMTMC-reID, Occluded-DukeMTMC and our synthetic set share the layout; so do
VeRi-776 (other folder names) and the generic `folder` loader.
"""

from __future__ import annotations

import os
from typing import ClassVar

from strongreid.data.datasets.base import (
    DATASETS,
    SPLITS,
    ImageRecord,
    ReIDDataset,
    Splits,
    list_image_names,
    parse_pid_cam,
)
from strongreid.errors import DatasetError


class MarketStyleDataset(ReIDDataset):
    """Reads `bounding_box_train/`, `query/` and `bounding_box_test/` (or SPLIT_FOLDERS).

    Names are parsed from the file name only; pid -1 (junk boxes) is dropped from every
    split; cameras are 1-based in the names and 0-based in the records.
    """

    # Sub-folders of ROOT tried after ROOT itself, in order.
    FOLDER_NAMES: ClassVar[tuple[str, ...]] = ()
    SPLIT_FOLDERS: ClassVar[tuple[str, str, str]] = (
        "bounding_box_train",
        "query",
        "bounding_box_test",
    )
    EXTENSIONS: ClassVar[tuple[str, ...]] = (".jpg",)
    # Range checks catch a root pointing at another dataset; None = no limit.
    MAX_PID: ClassVar[int | None] = None
    MAX_CAM: ClassVar[int | None] = None
    NAME_EXAMPLE: ClassVar[str] = "0002_c1s1_000451_03.jpg"

    def split_folders(self) -> tuple[str, str, str]:
        return self.SPLIT_FOLDERS

    def load(self) -> Splits:
        folders = self.split_folders()
        base = self.locate(self.FOLDER_NAMES, folders)
        train, query, gallery = (
            self.read_folder(split, os.path.join(base, folder))
            for split, folder in zip(SPLITS, folders, strict=True)
        )
        return train, query, gallery

    def read_folder(self, split: str, folder: str) -> list[ImageRecord]:
        self.sources[split] = folder
        if not os.path.isdir(folder):
            raise DatasetError(f"{self.TITLE}: the {split} folder {folder} is not a folder.")
        records = []
        for name in list_image_names(folder, self.EXTENSIONS):
            path = os.path.join(folder, name)
            parsed = parse_pid_cam(name)
            if parsed is None:
                raise DatasetError(
                    f"{self.TITLE}: cannot read the identity and camera from {path}; names must "
                    f"start with <pid>_c<camera>, e.g. {self.NAME_EXAMPLE}. Move other files out."
                )
            pid, cam = parsed
            if pid == -1:
                continue
            if pid < 0 or (self.MAX_PID is not None and pid > self.MAX_PID):
                raise DatasetError(
                    f"{self.TITLE}: {path} has identity {pid}, outside 0..{self.MAX_PID or 'N'}. "
                    "Is the root pointing at another dataset?"
                )
            if cam < 1 or (self.MAX_CAM is not None and cam > self.MAX_CAM):
                raise DatasetError(
                    f"{self.TITLE}: {path} has camera {cam}, outside 1..{self.MAX_CAM or 'N'} "
                    "(cameras are numbered from 1, as in Market-1501). Is the root pointing at "
                    "another dataset?"
                )
            records.append(ImageRecord(path, pid, cam - 1))
        return records


@DATASETS.register("market1501")
class Market1501(MarketStyleDataset):
    """Market-1501: 751 train ids / 12,936 images; query 750 / 3,368; gallery 751 / 15,913.

    Accepted: ROOT/market1501/, ROOT/market1501/Market-1501-v15.09.15/,
    ROOT/Market-1501-v15.09.15/, ROOT/Market-1501/, or the dataset folder itself. The gallery
    keeps the `0000` distractors (pid 0); 24 real names end in `.jpg.jpg` and load normally.
    """

    TITLE = "Market-1501"
    FOLDER_NAMES = (
        "market1501",
        "market1501/Market-1501-v15.09.15",
        "Market-1501-v15.09.15",
        "Market-1501",
        "Market1501",
    )
    MAX_PID = 1501
    MAX_CAM = 6
    LAYOUT = """\
ROOT/market1501/          (or ROOT/Market-1501-v15.09.15/)
    bounding_box_train/   0002_c1s1_000451_03.jpg ...   12,936 images
    query/                0001_c1s1_001051_00.jpg ...    3,368 images
    bounding_box_test/    -1_c1s1_000401_03.jpg ...     19,732 images (-1 = junk, dropped)
    gt_bbox/              hand-drawn boxes, optional: the multi-query images (TEST.MULTI_QUERY)
"""
    URL = "https://zheng-lab.cecs.anu.edu.au/Project/project_reid.html (Market-1501-v15.09.15.zip)"

    def load(self) -> Splits:
        splits = super().load()
        # The archive's gt_bbox/ holds the hand-drawn boxes of every identity; the Market
        # multi-query protocol averages a query's same-identity, same-camera boxes from it.
        gt_bbox = os.path.join(self.dataset_dir, "gt_bbox")
        if os.path.isdir(gt_bbox):
            self.multi_query = self.read_folder("multi_query", gt_bbox)
        return splits


@DATASETS.register("dukemtmc")
class DukeMTMCreID(MarketStyleDataset):
    """DukeMTMC-reID: train 702 ids / 16,522; query 702 / 2,228; gallery 1,110 / 17,661.

    Accepted: ROOT/dukemtmc-reid/DukeMTMC-reID/ (the original's path), ROOT/DukeMTMC-reID/,
    ROOT/dukemtmc-reid/, ROOT/dukemtmc/, or the dataset folder itself. Unlike the original,
    pid -1 is dropped here too, and nothing is downloaded (the official URL is dead).
    """

    TITLE = "DukeMTMC-reID"
    FOLDER_NAMES = (
        "dukemtmc-reid/DukeMTMC-reID",
        "DukeMTMC-reID",
        "dukemtmc-reid",
        "dukemtmc",
        "dukemtmcreid",
    )
    MAX_CAM = 8
    NAME_EXAMPLE = "0001_c2_f0046182.jpg"
    LAYOUT = """\
ROOT/dukemtmc-reid/DukeMTMC-reID/   (or ROOT/DukeMTMC-reID/)
    bounding_box_train/   0001_c2_f0046182.jpg ...   16,522 images
    query/                0005_c2_f0046985.jpg ...    2,228 images
    bounding_box_test/    0002_c1_f0044158.jpg ...   17,661 images
"""
    URL = (
        "https://github.com/layumi/DukeMTMC-reID_evaluation (DukeMTMC-reID.zip; the dataset "
        "was withdrawn by its authors, use a copy you are licensed to hold)"
    )


@DATASETS.register("occluded_duke")
class OccludedDuke(MarketStyleDataset):
    """Occluded-DukeMTMC: train 702 / 15,618; query 519 / 2,210; gallery 1,110 / 17,661.

    Accepted: ROOT/Occluded_Duke/ (the official archive's folder), ROOT/occluded_duke/,
    ROOT/occluded-duke/, ROOT/Occluded-DukeMTMC/, or the dataset folder itself. 1,870 query
    images are also in the gallery by design: evaluation drops same-id same-camera matches.
    """

    TITLE = "Occluded-DukeMTMC"
    FOLDER_NAMES = (
        "Occluded_Duke",
        "occluded_duke",
        "occluded-duke",
        "Occluded-DukeMTMC",
        "occluded_dukemtmc",
    )
    MAX_CAM = 8
    NAME_EXAMPLE = "0001_c2_f0046182.jpg"
    LAYOUT = """\
ROOT/Occluded_Duke/       (or ROOT/occluded_duke/)
    bounding_box_train/   0001_c2_f0046182.jpg ...   15,618 images
    query/                0019_c1_f0051230.jpg ...    2,210 images
    bounding_box_test/    0002_c1_f0044158.jpg ...   17,661 images
"""
    URL = (
        "https://github.com/lightas/Occluded-DukeMTMC-Dataset (split lists and the script "
        "that builds the folders from DukeMTMC-reID)"
    )


@DATASETS.register("synthetic")
class SyntheticPedestrians(MarketStyleDataset):
    """The set written by `strongreid synth`: Market layout, any number of ids and cameras.

    Accepted: ROOT/synthetic/ or the dataset folder itself; .jpg, .jpeg, .png or .bmp files.
    """

    TITLE = "synthetic"
    FOLDER_NAMES = ("synthetic",)
    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
    NAME_EXAMPLE = "0001_c1s1_000123_01.jpg"
    LAYOUT = """\
ROOT/synthetic/
    bounding_box_train/   <pid>_c<cam>s<seq>_<frame>_<n>.jpg, e.g. 0001_c1s1_000123_01.jpg
    query/
    bounding_box_test/
"""
    URL = "generated locally: strongreid synth --out ROOT/synthetic"
