"""VeRi-776 vehicle re-identification."""

from __future__ import annotations

from strongreid.data.datasets.base import DATASETS
from strongreid.data.datasets.market import MarketStyleDataset


@DATASETS.register("veri")
class VeRi776(MarketStyleDataset):
    """VeRi-776: train 576 ids / 37,778 images / 20 cams; query 200 / 1,678; gallery 200 / 11,579.

    Accepted: ROOT/veri/ (the original's path), ROOT/VeRi/, ROOT/VeRi-776/, ROOT/veri776/, or
    the dataset folder itself, holding image_train/, image_query/ and image_test/. Names are
    `VVVV_cCCC_FFFFFFFF_K.jpg` with 3-digit cameras c001..c020. Every query image is also in
    image_test: evaluation drops same-id same-camera gallery entries, as VeRi's junk lists do.
    """

    TITLE = "VeRi-776"
    FOLDER_NAMES = ("veri", "VeRi", "VeRi-776", "veri776", "VeRi776")
    SPLIT_FOLDERS = ("image_train", "image_query", "image_test")
    MAX_PID = 776
    MAX_CAM = 20
    NAME_EXAMPLE = "0001_c001_00016450_0.jpg"
    LAYOUT = """\
ROOT/veri/                (or ROOT/VeRi/)
    image_train/   0001_c001_00016450_0.jpg ...   37,778 images
    image_query/   0002_c002_00030600_0.jpg ...    1,678 images
    image_test/    0002_c002_00030600_0.jpg ...   11,579 images
"""
    URL = (
        "https://github.com/VehicleReId/VeRidataset (VeRi-776; request access from the "
        "authors as its README describes)"
    )
