"""VehicleID (PKU, Liu et al. 2016): vehicle ReID with the official 800/1600/2400 test lists."""

from __future__ import annotations

import os
import random

from strongreid.data.datasets.base import (
    DATASETS,
    ImageRecord,
    Option,
    ReIDDataset,
    Splits,
    read_list_lines,
)
from strongreid.errors import DatasetError

TEST_SIZES = ("800", "1600", "2400")
# VehicleID records no camera. The gallery gets camid 1 and the query camid 0, so that the
# same-identity same-camera rule of the evaluation never discards the one true match.
QUERY_CAMID, GALLERY_CAMID = 0, 1


@DATASETS.register("vehicleid")
class VehicleID(ReIDDataset):
    """VehicleID: 221,763 images of 26,267 vehicles; train list 13,164 vehicles; test lists of
    800, 1,600 and 2,400 vehicles.

    Accepted: ROOT/VehicleID_V1.0/, ROOT/vehicleid/, ROOT/VehicleID/, or the dataset folder
    itself, holding image/ and train_test_split/{train_list,test_list_800,...}.txt (lines
    `<image name without .jpg> <vehicle id>`). The test list is option test_size
    (DATASETS.VEHICLEID_TEST_SIZE). Protocol: one image of each test vehicle is its gallery
    image, the others are queries; gallery_pick 'first' takes the first in list order (layumi's
    prepare_VehicleID.py), 'random' a seeded random one (fast-reid shuffles likewise).
    """

    TITLE = "VehicleID"
    OPTIONS = {
        "test_size": Option("800", "official test list: 800, 1600 or 2400 vehicles", TEST_SIZES),
        "gallery_pick": Option(
            "first", "which image of a test vehicle is its gallery image", ("first", "random")
        ),
    }
    FOLDER_NAMES = ("VehicleID_V1.0", "vehicleid", "VehicleID", "vehicle_id")
    LAYOUT = """\
ROOT/VehicleID_V1.0/
    image/0000001.jpg ...                221,763 images
    train_test_split/train_list.txt      0004357 4 ...  (image name, vehicle id)
    train_test_split/test_list_800.txt   test_list_1600.txt   test_list_2400.txt
"""
    URL = "https://www.pkuml.org/resources/pku-vehicleid.html (request form)"

    def load(self) -> Splits:
        size = self.options["test_size"]
        test_list = os.path.join("train_test_split", f"test_list_{size}.txt")
        base = self.locate(self.FOLDER_NAMES, ("image", "train_test_split/train_list.txt", test_list))
        train = self._read("train", os.path.join(base, "train_test_split", "train_list.txt"), 0)
        test = self._read("query", os.path.join(base, test_list), QUERY_CAMID)
        self.sources["gallery"] = self.sources["query"]
        if self.options["gallery_pick"] == "random":
            test = list(test)
            random.Random(0).shuffle(test)
        seen: set[int] = set()
        query: list[ImageRecord] = []
        gallery: list[ImageRecord] = []
        for record in test:
            if record.pid in seen:
                query.append(record)
            else:
                seen.add(record.pid)
                gallery.append(ImageRecord(record.path, record.pid, GALLERY_CAMID))
        if self.options["gallery_pick"] == "random":
            query.sort(key=lambda r: r.path)
            gallery.sort(key=lambda r: r.path)
        return train, query, gallery

    def _read(self, split: str, list_file: str, camid: int) -> list[ImageRecord]:
        self.sources[split] = list_file
        image_dir = os.path.join(self.dataset_dir, "image")
        records: list[ImageRecord] = []
        lines: list[int] = []
        for number, fields in read_list_lines(list_file):
            if len(fields) != 2 or not fields[1].isdigit():
                raise DatasetError(
                    f"{self.TITLE}: {list_file} line {number}: expected '<image name> <vehicle "
                    f"id>', e.g. '0004357 4', got {' '.join(fields)!r}."
                )
            name = fields[0] if fields[0].lower().endswith(".jpg") else fields[0] + ".jpg"
            records.append(ImageRecord(os.path.join(image_dir, name), int(fields[1]), camid))
            lines.append(number)
        return self.keep_existing(records, lines, list_file)
