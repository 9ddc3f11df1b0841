"""MSMT17 (V1 and V2), read from its four official list files."""

from __future__ import annotations

import os
import re

from strongreid.data.datasets.base import (
    DATASETS,
    ImageRecord,
    Option,
    ReIDDataset,
    Splits,
    read_list_lines,
)
from strongreid.errors import DatasetError

# (version folder, train image folder, test image folder); V2 first, as the original reads V2.
_VERSIONS = (
    ("MSMT17_V2", "mask_train_v2", "mask_test_v2"),
    ("MSMT17_V1", "train", "test"),
)
_NUM_CAMERAS = 15
# identity _ index _ camera _ : the first three fields are numbers in every MSMT17 name.
_NAME = re.compile(r"^\d+_\d+_(\d+)_")


def parse_msmt_camera(filename: str) -> int | None:
    """The 1-based camera of `PPPP_NNN_CC_DDDDtime_FFFF_K[_ex].jpg` (the 3rd `_` field), or None."""
    match = _NAME.match(os.path.basename(filename))
    return int(match.group(1)) if match else None


@DATASETS.register("msmt17")
class MSMT17(ReIDDataset):
    """MSMT17: train 1,041 ids / 30,248 images (32,621 with merge_val); query 3,060 / 11,659;
    gallery 3,060 / 82,161; 15 cameras.

    Accepted: ROOT/msmt17/MSMT17_V2/ (mask_train_v2/, mask_test_v2/), ROOT/msmt17/MSMT17_V1/
    (train/, test/), ROOT/MSMT17_V2/, ROOT/MSMT17_V1/, ROOT/msmt17/, or the version folder
    itself, next to list_{train,val,query,gallery}.txt (`<pid:04d>/<name>.jpg <pid>`). V2 is
    preferred when both are present. The query/gallery pids restart at 0 in the lists and are
    kept as written: they are not the train identities. Camids come from the third `_` field
    of the name (01..15), made 0-based, which also covers the `_ex` names.
    """

    TITLE = "MSMT17"
    OPTIONS = {
        "merge_val": Option(
            False, "add list_val.txt to the train split (DATASETS.MSMT17_MERGE_VAL)"
        ),
    }
    LAYOUT = """\
ROOT/msmt17/MSMT17_V2/    (or ROOT/msmt17/MSMT17_V1/ with train/ and test/)
    mask_train_v2/0000/0000_045_12_0303morning_0006_2.jpg ...
    mask_test_v2/0000/0000_000_01_0303morning_0015_0.jpg ...
    list_train.txt  list_val.txt  list_query.txt  list_gallery.txt
"""
    URL = "https://www.pkuvmc.com/dataset.html (MSMT17, request form)"

    def load(self) -> Splits:
        base, train_dir, test_dir = self._find()
        train = self._read_list("train", os.path.join(base, "list_train.txt"), train_dir)
        if self.options["merge_val"]:
            train += self._read_list("train", os.path.join(base, "list_val.txt"), train_dir)
        query = self._read_list("query", os.path.join(base, "list_query.txt"), test_dir)
        gallery = self._read_list("gallery", os.path.join(base, "list_gallery.txt"), test_dir)
        return train, query, gallery

    def _find(self) -> tuple[str, str, str]:
        tried = [self.root]
        for parent in ("msmt17", "", "MSMT17"):
            tried += [os.path.join(self.root, parent, version) for version, _, _ in _VERSIONS]
        tried += [os.path.join(self.root, "msmt17"), os.path.join(self.root, "MSMT17")]
        for folder in tried:
            for _, train_name, test_name in _VERSIONS:
                train_dir = os.path.join(folder, train_name)
                test_dir = os.path.join(folder, test_name)
                if os.path.isdir(train_dir) and os.path.isdir(test_dir):
                    self.dataset_dir = folder
                    return folder, train_dir, test_dir
        raise self.not_found(
            tried,
            ("mask_train_v2", "mask_test_v2"),
            what="mask_train_v2/ + mask_test_v2/ (V2) or train/ + test/ (V1)",
        )

    def _read_list(self, split: str, list_file: str, image_dir: str) -> list[ImageRecord]:
        if not os.path.isfile(list_file):
            raise DatasetError(
                f"MSMT17: {list_file} is missing. The dataset folder {self.dataset_dir} must hold "
                "list_train.txt, list_val.txt, list_query.txt and list_gallery.txt as shipped."
            )
        self.sources[split] = list_file
        records: list[ImageRecord] = []
        lines: list[int] = []
        for number, fields in read_list_lines(list_file):
            try:
                rel_path, pid = fields[0], int(fields[1])
            except (IndexError, ValueError):
                raise DatasetError(
                    f"MSMT17: {list_file} line {number}: expected '<folder>/<name>.jpg <pid>', "
                    f"got {' '.join(fields)!r}."
                ) from None
            cam = parse_msmt_camera(rel_path)
            if cam is None or not 1 <= cam <= _NUM_CAMERAS:
                raise DatasetError(
                    f"MSMT17: {list_file} line {number}: cannot read a camera 01..15 from the "
                    f"third '_' field of {rel_path!r} "
                    "(expected e.g. 0000_045_12_0303morning_0006_2.jpg)."
                )
            records.append(ImageRecord(os.path.join(image_dir, rel_path), pid, cam - 1))
            lines.append(number)
        return self.keep_existing(records, lines, list_file)
