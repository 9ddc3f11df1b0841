"""Loaders for a user's own data: a Market-style folder, or list files."""

from __future__ import annotations

import logging
import os

from strongreid.data.datasets.base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    SPLITS,
    FileIndex,
    ImageRecord,
    Option,
    ReIDDataset,
    Splits,
    read_list_lines,
)
from strongreid.data.datasets.market import MarketStyleDataset
from strongreid.errors import DatasetError

logger = logging.getLogger("strongreid")


@DATASETS.register("folder")
class FolderDataset(MarketStyleDataset):
    """Your own images in the Market-1501 layout.

    ROOT holds one folder per split (options train/query/gallery, or DATASETS.LIST_TRAIN /
    LIST_QUERY / LIST_GALLERY; default bounding_box_train, query, bounding_box_test; relative
    to ROOT or absolute). File names start with `<pid>_c<camera>` (camera numbered from 1);
    pid -1 marks junk and is dropped; .jpg, .jpeg, .png and .bmp files are read.
    """

    TITLE = "folder dataset"
    OPTIONS = {
        "train": Option("bounding_box_train", "train image folder, relative to ROOT"),
        "query": Option("query", "query image folder, relative to ROOT"),
        "gallery": Option("bounding_box_test", "gallery image folder, relative to ROOT"),
    }
    EXTENSIONS = IMAGE_EXTENSIONS
    NAME_EXAMPLE = "0001_c1_anything.jpg"
    LAYOUT = """\
ROOT/
    bounding_box_train/   0001_c1_anything.jpg  (<pid>_c<camera>..., cameras from 1)
    query/
    bounding_box_test/
(other folder names: --option train=DIR query=DIR gallery=DIR or DATASETS.LIST_*)
"""
    URL = "your own data"

    def split_folders(self) -> tuple[str, str, str]:
        return self.options["train"], self.options["query"], self.options["gallery"]


@DATASETS.register("list")
class ListDataset(ReIDDataset):
    """Your own images named by list files, one per split.

    Options train/query/gallery (or DATASETS.LIST_TRAIN / LIST_QUERY / LIST_GALLERY) name the
    list files, relative to ROOT or absolute; a split without a list is left empty (e.g. a
    test-only dataset). Each line is `path pid camid`, comma- or whitespace-separated; blank
    lines, `#` comments and one header line are skipped. A path is looked up relative to its
    list file's folder first, then relative to ROOT. pid -1 marks junk and is dropped; pids
    and camids are kept as written (camids must be >= 0).
    """

    TITLE = "list dataset"
    OPTIONS = {
        "train": Option("", "train list file (path pid camid per line)"),
        "query": Option("", "query list file"),
        "gallery": Option("", "gallery list file"),
    }
    LAYOUT = """\
ROOT/train.txt     one line per image:  images/0001_a.jpg 1 0   (path pid camid; csv works too)
ROOT/query.txt     paths relative to the list file's folder or to ROOT
ROOT/gallery.txt   (name the lists with --option train=FILE ... or DATASETS.LIST_TRAIN ...)
"""
    URL = "your own data"

    def load(self) -> Splits:
        if not any(self.options[split] for split in SPLITS):
            raise DatasetError(
                "the 'list' dataset needs at least one list file: set DATASETS.LIST_TRAIN, "
                "LIST_QUERY, LIST_GALLERY (or --option train=FILE query=FILE gallery=FILE)."
            )
        self.dataset_dir = self.root
        index = FileIndex()
        train, query, gallery = (self._read(split, index) for split in SPLITS)
        return train, query, gallery

    def _find_list(self, split: str, given: str) -> str:
        given = os.path.expanduser(given)
        candidates = [given] if os.path.isabs(given) else [os.path.join(self.root, given), given]
        for candidate in candidates:
            if os.path.isfile(candidate):
                return os.path.abspath(candidate)
        raise DatasetError(
            f"list dataset: the {split} list {given!r} was not found (looked at "
            f"{' and '.join(map(repr, candidates))}). Paths are relative to ROOT "
            "(DATASETS.ROOT_DIR or --root)."
        )

    def _read(self, split: str, index: FileIndex) -> list[ImageRecord]:
        if not self.options[split]:
            self.omitted.add(split)
            return []
        list_file = self._find_list(split, self.options[split])
        self.sources[split] = list_file
        list_dir = os.path.dirname(list_file)
        records: list[ImageRecord] = []
        missing: list[str] = []
        first = True
        for number, fields in read_list_lines(list_file, num_fields=3):
            try:
                path, pid, camid = fields[0], int(fields[1]), int(fields[2])
            except (IndexError, ValueError):
                if first:  # a header such as "path,pid,camid"
                    first = False
                    continue
                raise DatasetError(
                    f"list dataset: {list_file} line {number}: expected 'path pid camid' with "
                    f"integer pid and camid, got {' '.join(fields)!r}."
                ) from None
            first = False
            if pid == -1:
                continue
            if pid < 0 or camid < 0:
                raise DatasetError(
                    f"list dataset: {list_file} line {number}: pid {pid} / camid {camid} must be "
                    ">= 0 (pid -1 marks junk)."
                )
            path = os.path.expanduser(path)
            tried = (
                [path] if os.path.isabs(path)
                else [os.path.join(list_dir, path), os.path.join(self.root, path)]
            )
            tried = [os.path.normpath(p) for p in tried]
            found = next((p for p in tried if index.exists(p)), None)
            if found is None:
                if not self.skip_corrupt:
                    raise DatasetError(
                        f"list dataset: {list_file} line {number} names {path!r}, which does not "
                        f"exist (looked at {' and '.join(dict.fromkeys(tried))}). Fix the list, "
                        "or set DATALOADER.SKIP_CORRUPT True (--option skip_corrupt=true) to "
                        "skip missing images."
                    )
                missing.append(path)
                continue
            records.append(ImageRecord(found, pid, camid))
        if missing:
            self.num_missing += len(missing)
            logger.warning(
                "list dataset: skipped %d missing image(s) named by %s, e.g. %s",
                len(missing), list_file, missing[0],
            )
        return records
