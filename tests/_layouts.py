"""Build dataset trees with the real file names of the public datasets, for loader tests.

The names come from the reference lists in `/work/shared/reference/layouts/` (override with
STRONGREID_LAYOUTS). Every image is a hard link to one tiny file, so a 126k-image MSMT17 tree
costs directory entries only.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image


def _default_layouts() -> Path:
    # shared/ sits beside the checkout (also in CI's fresh clone); /work/shared is the session's.
    beside = Path(__file__).resolve().parents[2] / "shared" / "reference" / "layouts"
    return beside if beside.is_dir() else Path("/work/shared/reference/layouts")


LAYOUTS = Path(os.environ.get("STRONGREID_LAYOUTS") or _default_layouts())

MARKET_LISTS = ("bounding_box_train.txt", "query.txt", "bounding_box_test.txt")


def scratch_root(fallback: Path) -> tuple[Path, bool]:
    """Where to build the big trees: a fresh folder in /dev/shm when it is writable, else
    `fallback`. Returns (folder, whether it was made here and must be removed by the caller).

    Measured: creating then deleting MSMT17's 126k links takes ~1.5 s on tmpfs against ~15 s
    on the disk-backed /tmp under load, and pytest would otherwise delete old trees at exit.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="strongreid-layouts-", dir=shm)), True
    return fallback, False


def have_layouts() -> bool:
    return (LAYOUTS / "market1501" / "query.txt").is_file()


def write_tiny_images(folder: Path) -> tuple[LinkSource, LinkSource]:
    """One 8x16 JPEG and one PNG that every tree links to."""
    folder.mkdir(parents=True, exist_ok=True)
    jpg, png = folder / "tiny.jpg", folder / "tiny.png"
    image = Image.new("RGB", (8, 16), (90, 120, 200))
    image.save(jpg, quality=80)
    image.save(png)
    return LinkSource(str(jpg)), LinkSource(str(png))


def read_names(list_file: Path) -> list[str]:
    """First field of every non-blank line (the path; MSMT17/CUHK03 lists carry labels after)."""
    with open(list_file, encoding="utf-8") as handle:
        return [line.split()[0] for line in handle if line.strip()]


class LinkSource:
    """One tiny file to hard-link from; ext4 allows 65,000 links per inode, so when a copy is
    full another copy of the same bytes takes over."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.current = path
        self.copies = 0

    def link(self, target: str) -> None:
        try:
            os.link(self.current, target)
        except OSError as exc:
            if exc.errno != errno.EMLINK:
                raise
            self.copies += 1
            stem, ext = os.path.splitext(self.path)
            self.current = f"{stem}.{self.copies}{ext}"
            shutil.copyfile(self.path, self.current)
            os.link(self.current, target)


def link_all(source: LinkSource, base: Path, rel_paths: Iterable[str]) -> int:
    """Hard-link the source to base/<rel> for every relative path; returns the number linked."""
    base_str = str(base)
    made: set[str] = set()
    count = 0
    for rel in rel_paths:
        target = os.path.join(base_str, rel)
        parent = os.path.dirname(target)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        source.link(target)
        count += 1
    return count


def _market_style(root: Path, source: LinkSource, layout: str, dest: str) -> Path:
    base = root / dest
    for name in MARKET_LISTS:
        link_all(source, base, read_names(LAYOUTS / layout / name))
    return base


def build_market(root: Path, jpg: LinkSource) -> Path:
    """ROOT/market1501/{bounding_box_train,query,bounding_box_test}/ (36,036 names)."""
    return _market_style(root, jpg, "market1501", "market1501")


def build_duke(root: Path, jpg: LinkSource) -> Path:
    """ROOT/dukemtmc-reid/DukeMTMC-reID/..., the original's path."""
    return _market_style(root, jpg, "dukemtmc-reid", "dukemtmc-reid/DukeMTMC-reID")


def build_occluded_duke(root: Path, jpg: LinkSource) -> Path:
    """ROOT/Occluded_Duke/..., the official archive's folder name."""
    return _market_style(root, jpg, "occluded-duke", "Occluded_Duke")


def build_msmt17(root: Path, jpg: LinkSource, version: str) -> Path:
    """ROOT/msmt17/MSMT17_V1/{train,test}/ or MSMT17_V2/{mask_train_v2,mask_test_v2}/ + lists."""
    train_dir, test_dir = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    base = root / "msmt17" / f"MSMT17_{version}"
    for list_name, folder in (
        ("list_train.txt", train_dir),
        ("list_val.txt", train_dir),
        ("list_query.txt", test_dir),
        ("list_gallery.txt", test_dir),
    ):
        link_all(jpg, base / folder, read_names(LAYOUTS / "msmt17" / list_name))
        shutil.copyfile(LAYOUTS / "msmt17" / list_name, base / list_name)
    return base


def build_cuhk03_mat(root: Path, png: LinkSource) -> Path:
    """ROOT/cuhk03/ with both official .mat split files and images_{labeled,detected}/."""
    base = root / "cuhk03"
    base.mkdir(parents=True, exist_ok=True)
    for kind in ("labeled", "detected"):
        mat = f"cuhk03_new_protocol_config_{kind}.mat"
        shutil.copyfile(LAYOUTS / "cuhk03-np" / mat, base / mat)
        for split in ("train", "query", "gallery"):
            # Lines read `images_<kind>/<file> <pid> <cam>`.
            link_all(png, base, read_names(LAYOUTS / "cuhk03-np" / kind / f"{split}.txt"))
    return base


def build_cuhk03_np(root: Path, png: LinkSource) -> Path:
    """ROOT/cuhk03-np/{labeled,detected}/ in the Market-style CUHK03-NP naming."""
    base = root / "cuhk03-np"
    for kind in ("labeled", "detected"):
        for name in MARKET_LISTS:
            names = read_names(LAYOUTS / "cuhk03-np" / "derived_market_style" / kind / name)
            link_all(png, base / kind, names)
    return base


def build_veri(root: Path, jpg: LinkSource) -> Path:
    """ROOT/veri/{image_train,image_query,image_test}/ from the name_*.txt lists."""
    base = root / "veri"
    for list_name, folder in (
        ("name_train.txt", "image_train"),
        ("name_query.txt", "image_query"),
        ("name_test.txt", "image_test"),
    ):
        link_all(jpg, base / folder, read_names(LAYOUTS / "veri776" / list_name))
    return base


def write_market_tree(
    base: Path, splits: dict[str, Iterable[str]], content: bytes = b"not an image"
) -> Path:
    """A small Market-style tree of files with arbitrary bytes (loaders must not decode them)."""
    for folder, names in splits.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / folder / name).write_bytes(content)
    return base
