"""CUHK03 under the new 767/700 protocol (CUHK03-NP), labeled or detected boxes."""

from __future__ import annotations

import os

from strongreid.data.datasets.base import (
    DATASETS,
    SPLITS,
    ImageRecord,
    Option,
    Splits,
)
from strongreid.data.datasets.market import MarketStyleDataset
from strongreid.errors import DatasetError

_SPLIT_FILE = "cuhk03_new_protocol_config_{kind}.mat"
_MAT_FIELDS = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")


@DATASETS.register("cuhk03")
class CUHK03(MarketStyleDataset):
    """CUHK03-NP: train 767 ids (7,368 labeled / 7,365 detected images); query 700 / 1,400;
    gallery 700 / 5,328 labeled, 5,332 detected; 2 cameras per identity.

    Two accepted layouts, tried in this order (option kind = 'labeled' | 'detected'):
      1. the official split file ROOT/cuhk03/cuhk03_new_protocol_config_<kind>.mat with the
         images it names (filelist, e.g. 1_001_1_01.png) in ROOT/cuhk03/images_<kind>/, as
         torchreid extracts them from cuhk-03.mat; ROOT may also be the cuhk03 folder itself.
         pid = `labels`, camid = `camId` - 1, splits = the 1-based train/query/gallery_idx.
      2. the Market-style CUHK03-NP download: ROOT/cuhk03-np/<kind>/ (also
         ROOT/cuhk03-np/CUHK03-NP/<kind>/, ROOT/CUHK03-NP/<kind>/, ROOT/<kind>/ or the kind
         folder itself) with bounding_box_train/, query/, bounding_box_test/ of
         `<pid:04d>_c<cam>_<n>.png` images.
    """

    TITLE = "CUHK03-NP"
    OPTIONS = {
        "kind": Option(
            "labeled",
            "'labeled' (hand-drawn) or 'detected' (DPM) boxes (DATASETS.CUHK03_KIND)",
            choices=("labeled", "detected"),
        ),
    }
    EXTENSIONS = (".png", ".jpg")
    MAX_PID = 1467
    MAX_CAM = 2
    NAME_EXAMPLE = "0001_c1_1.png"
    LAYOUT = """\
either the official split file with extracted images:
ROOT/cuhk03/
    cuhk03_new_protocol_config_labeled.mat   (and ..._detected.mat)
    images_labeled/1_001_1_01.png ...        (and images_detected/)
or the Market-style CUHK03-NP download:
ROOT/cuhk03-np/labeled/                      (and detected/)
    bounding_box_train/0001_c1_1.png ...  query/  bounding_box_test/
"""
    URL = (
        "https://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html (images); the new-protocol "
        "split files and the CUHK03-NP folders: "
        "https://github.com/zhunzhong07/person-re-ranking/tree/master/CUHK03-NP"
    )

    def load(self) -> Splits:
        kind = self.options["kind"]
        split_name = _SPLIT_FILE.format(kind=kind)
        image_folder = f"images_{kind}"
        split_files = []
        for folder in (self.root, os.path.join(self.root, "cuhk03")):
            split_file = os.path.join(folder, split_name)
            if os.path.isfile(split_file):
                split_files.append(split_file)
                image_dir = os.path.join(folder, image_folder)
                if os.path.isdir(image_dir):
                    self.dataset_dir = folder
                    return self._load_split_file(split_file, image_dir)

        market_dirs = [
            self.root,
            os.path.join(self.root, kind),
            os.path.join(self.root, "cuhk03-np", kind),
            os.path.join(self.root, "cuhk03-np", "CUHK03-NP", kind),
            os.path.join(self.root, "CUHK03-NP", kind),
            os.path.join(self.root, "cuhk03", kind),
        ]
        for folder in market_dirs:
            if all(os.path.isdir(os.path.join(folder, f)) for f in self.SPLIT_FOLDERS):
                self.dataset_dir = folder
                train, query, gallery = (
                    self.read_folder(split, os.path.join(folder, name))
                    for split, name in zip(SPLITS, self.SPLIT_FOLDERS, strict=True)
                )
                return train, query, gallery

        if split_files:
            raise DatasetError(
                f"CUHK03-NP: found {split_files[0]} but not the images it names in "
                f"{os.path.join(os.path.dirname(split_files[0]), image_folder)}/. Extract them "
                "from cuhk-03.mat as PNGs named like 1_001_1_01.png (<pair>_<id:03d>_<view>_"
                "<n:02d>.png), or use the Market-style CUHK03-NP download "
                f"(ROOT/cuhk03-np/{kind}/bounding_box_train/ ...)."
            )
        raise self.not_found(
            [os.path.join(self.root, "cuhk03")] + market_dirs,
            (split_name, image_folder),
            what=f"{split_name} + {image_folder}/, or {kind}/bounding_box_train/ + query/ + "
            "bounding_box_test/",
        )

    def _load_split_file(self, split_file: str, image_dir: str) -> Splits:
        """Read the official .mat: 1-based indices into filelist/labels/camId per split."""
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError

        try:
            mat = loadmat(split_file)
        except (MatReadError, OSError, ValueError, TypeError) as exc:
            raise DatasetError(
                f"CUHK03-NP: cannot read {split_file} ({exc}); download it again from {self.URL}."
            ) from None
        try:
            names = [str(cell.ravel()[0]) for cell in mat["filelist"].ravel()]
            labels = [int(v) for v in mat["labels"].ravel()]
            cams = [int(v) for v in mat["camId"].ravel()]
            indices = {s: [int(v) for v in mat[f"{s}_idx"].ravel()] for s in SPLITS}
        except (KeyError, IndexError, ValueError, TypeError, AttributeError):
            raise DatasetError(
                f"CUHK03-NP: {split_file} is not a new-protocol split file; it must hold "
                f"{', '.join(_MAT_FIELDS)}."
            ) from None
        if not len(names) == len(labels) == len(cams):
            raise DatasetError(
                f"CUHK03-NP: {split_file}: filelist, labels and camId differ in length "
                f"({len(names)}, {len(labels)}, {len(cams)})."
            )
        splits = []
        for split in SPLITS:
            records: list[ImageRecord] = []
            entries: list[int] = []
            for index in indices[split]:
                if not 1 <= index <= len(names):
                    raise DatasetError(
                        f"CUHK03-NP: {split_file}: {split}_idx holds {index}, outside "
                        f"1..{len(names)}."
                    )
                cam = cams[index - 1]
                if cam not in (1, 2):
                    raise DatasetError(
                        f"CUHK03-NP: {split_file}: camId {cam} of entry {index} is not 1 or 2."
                    )
                path = os.path.join(image_dir, names[index - 1])
                records.append(ImageRecord(path, labels[index - 1], cam - 1))
                entries.append(index)
            self.sources[split] = f"{split_file} ({split}_idx)"
            splits.append(self.keep_existing(records, entries, split_file, unit="filelist entry"))
        return splits[0], splits[1], splits[2]
