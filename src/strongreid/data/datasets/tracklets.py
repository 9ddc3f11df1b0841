"""The training set `strongreid tracklets` cuts from footage: identities are tracklets.

Train-only, as DG-Market: pid = the tracklet id (one person in one camera, never across
cameras), camid = the camera. Evaluate on another dataset with DATASETS.TEST_NAME.
"""

from __future__ import annotations

import json
import os

from strongreid.data.datasets.base import DATASETS, Splits
from strongreid.data.datasets.market import MarketStyleDataset
from strongreid.data.tracklets import FORMAT, MANIFEST_NAME, TRAIN_FOLDER
from strongreid.errors import DatasetError


@DATASETS.register("tracklets")
class FootageTracklets(MarketStyleDataset):
    """ROOT (or ROOT/tracklets) as `strongreid tracklets --out` wrote it; only finished runs."""

    TITLE = "tracklets"
    FOLDER_NAMES = ("tracklets",)
    NAME_EXAMPLE = "000001_c1s1_000012_00.jpg"
    LAYOUT = """\
ROOT/ (or ROOT/tracklets/)   what `strongreid tracklets --out ROOT` writes
    bounding_box_train/   <tracklet>_c<camera>s1_<frame>_00.jpg, e.g. 000001_c1s1_000012_00.jpg
    tracklets.csv
    manifest.json
"""
    URL = "made locally: strongreid tracklets --footage FOOTAGE --out ROOT"

    def load(self) -> Splits:
        base = self.locate(self.FOLDER_NAMES, (TRAIN_FOLDER, MANIFEST_NAME))
        path = os.path.join(base, MANIFEST_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{self.TITLE}: cannot read {path} ({exc}); cut the footage "
                               "again with strongreid tracklets --overwrite") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DatasetError(f"{self.TITLE}: {path} was not written by strongreid tracklets")
        if not manifest.get("complete"):
            raise DatasetError(
                f"{self.TITLE}: {base} is unfinished ({manifest.get('counts', {}).get('cameras', 0)}"
                f" of {len(manifest.get('sequences', []))} cameras cut); run the same "
                "strongreid tracklets command again to finish it")
        self.omitted.update({"query", "gallery"})
        return self.read_folder("train", os.path.join(base, TRAIN_FOLDER)), [], []
