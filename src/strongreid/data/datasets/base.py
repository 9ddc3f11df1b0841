"""Records, the loader base class, the dataset registry and the helpers loaders share.

A loader only finds its folder and reads file names or list files; it never opens an image,
so statistics and split checks stay fast even for MSMT17's 126k files.
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from strongreid.errors import DatasetError
from strongreid.registry import Registry

logger = logging.getLogger("strongreid")

SPLITS = ("train", "query", "gallery")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class ImageRecord(NamedTuple):
    path: str
    pid: int
    camid: int


Splits = tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]


@dataclass(frozen=True)
class Option:
    """A loader option: its default, a one-line description and, for strings, the legal values."""

    default: Any
    help: str
    choices: tuple[str, ...] = ()


_TRUE_WORDS = {"1", "true", "yes", "on", "y"}
_FALSE_WORDS = {"0", "false", "no", "off", "n"}

# The original searched this over the whole path, so a parent folder such as
# "run_2_c3/" could supply the identity; we only ever apply it to the file name.
_PID_CAM = re.compile(r"^(-?\d+)_c(\d+)")


def parse_pid_cam(filename: str) -> tuple[int, int] | None:
    """(pid, camera as written, 1-based) of a Market-style name `<pid>_c<cam>...`, else None."""
    match = _PID_CAM.match(os.path.basename(filename))
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def relabel(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Map pids to 0..N-1 in ascending pid order, so labels never depend on listing order."""
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, mapping[r.pid], r.camid) for r in records]


def list_image_names(folder: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted image file names of a folder (glob order depends on the filesystem)."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.lower().endswith(extensions) and e.is_file()]
    names.sort()
    return names


def read_list_lines(path: str, num_fields: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of a list file: comma- or whitespace-separated, '#' comments.

    With `num_fields` the line is split from the right, so the first field (a path) may itself
    contain spaces or commas.
    """
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read list file {path!r}: {exc.strerror}") from None
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                splits = -1 if num_fields is None else num_fields - 1
                if "," in line:
                    fields = [f.strip() for f in line.rsplit(",", splits)]
                else:
                    fields = line.rsplit(None, splits)
                yield number, fields
        except UnicodeDecodeError:
            raise DatasetError(
                f"list file {path!r} is not UTF-8 text; expected lines 'path pid camid'"
            ) from None


class FileIndex:
    """Answers "does this file exist?" with one directory listing per folder instead of one
    stat per file, which matters for list files naming 100k images."""

    def __init__(self) -> None:
        self._folders: dict[str, frozenset[str] | None] = {}

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._folders:
            try:
                self._folders[folder] = frozenset(os.listdir(folder or "."))
            except OSError:
                self._folders[folder] = None
        names = self._folders[folder]
        return names is not None and name in names


def parse_bool(value: Any) -> bool | None:
    """Truth of a bool, 0/1 or a yes/no word; None when it is none of them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE_WORDS:
        return True
    if text in _FALSE_WORDS:
        return False
    return None


DATASETS: Registry[type[ReIDDataset]] = Registry("dataset")


class ReIDDataset(ABC):
    """A dataset as three lists of ImageRecord; subclasses implement `load`.

    `load` returns the pids as written in the dataset; the base class relabels the train
    split to 0..N-1 and refuses empty splits, so a user's own loader only has to read names.
    After loading, `dataset_dir` is the folder actually used and `num_missing` counts images
    skipped with skip_corrupt.
    """

    TITLE: ClassVar[str] = "dataset"
    # The expected folder layout and where the dataset is published: both are printed when
    # the dataset cannot be found.
    LAYOUT: ClassVar[str] = ""
    URL: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Option]] = {}
    COMMON_OPTIONS: ClassVar[dict[str, Option]] = {
        "skip_corrupt": Option(
            False,
            "skip images a list names but that are missing (warned and counted) instead of failing",
        ),
    }

    def __init__(self, root: str | os.PathLike[str], **options: Any) -> None:
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.options = self._read_options(options)
        self.skip_corrupt: bool = self.options["skip_corrupt"]
        self.dataset_dir = self.root
        # Where each split came from (folder or list file), for error messages.
        self.sources: dict[str, str] = {}
        self.num_missing = 0
        # Splits the loader left out on purpose (the `list` loader without that list).
        self.omitted: set[str] = set()
        # Optional extra splits a loader may fill in `load` (dataset's own pids): a validation
        # split of training identities (layumi's val/) and multi-query images (Market gt_bbox/).
        self.val: list[ImageRecord] = []
        self.multi_query: list[ImageRecord] = []
        # A user's loader may return plain (path, pid, camid) tuples.
        train, query, gallery = (
            [r if isinstance(r, ImageRecord) else ImageRecord(*r) for r in split]
            for split in self.load()
        )
        for split, records in zip(SPLITS, (train, query, gallery), strict=True):
            if not records and split not in self.omitted:
                where = self.sources.get(split, self.dataset_dir)
                raise DatasetError(
                    f"{self.TITLE}: the {split} split is empty ({where} yields no images). "
                    "Check that the download or extraction is complete."
                )
        self.train = relabel(train)
        self.val = self._relabel_like_train(train, self.val)
        self.query = query
        self.gallery = gallery

    def _relabel_like_train(
        self, train: Sequence[ImageRecord], records: Sequence[ImageRecord]
    ) -> list[ImageRecord]:
        """`records` with the labels `relabel` gave the train split; other identities are dropped
        (a validation image needs a class the classifier knows)."""
        if not records:
            return []
        mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in train}))}
        kept = [ImageRecord(r.path, mapping[r.pid], r.camid) for r in records if r.pid in mapping]
        if len(kept) < len(records):
            logger.warning(
                "%s: %d validation image(s) of identities absent from the train split were dropped",
                self.TITLE, len(records) - len(kept),
            )
        return kept

    @abstractmethod
    def load(self) -> Splits:
        """Read (train, query, gallery) with the dataset's own pids and 0-based camids."""

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, train={len(self.train)}, "
            f"query={len(self.query)}, gallery={len(self.gallery)})"
        )

    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        return {**cls.COMMON_OPTIONS, **cls.OPTIONS}

    def _read_options(self, given: dict[str, Any]) -> dict[str, Any]:
        specs = self.option_specs()
        unknown = sorted(set(given) - set(specs))
        if unknown:
            known = "; ".join(f"{k} ({spec.help})" for k, spec in specs.items())
            raise DatasetError(
                f"{self.TITLE} has no option {', '.join(map(repr, unknown))}. Its options: {known}."
            )
        values: dict[str, Any] = {}
        for key, spec in specs.items():
            value = given.get(key, spec.default)
            if isinstance(spec.default, bool):
                parsed = parse_bool(value)
                if parsed is None:
                    raise DatasetError(
                        f"{self.TITLE} option {key}={value!r} is not a boolean; use true or false."
                    )
                value = parsed
            elif isinstance(spec.default, str):
                value = "" if value is None else str(value)
                if spec.choices and value not in spec.choices:
                    raise DatasetError(
                        f"{self.TITLE} option {key}={value!r} is not one of "
                        f"{', '.join(spec.choices)}."
                    )
            values[key] = value
        return values

    # -- helpers for subclasses ----------------------------------------------------------------

    def locate(self, candidates: Sequence[str], required: Sequence[str]) -> str:
        """The first of ROOT itself and ROOT/<candidate> that holds every `required` entry.

        Sets `dataset_dir`; otherwise raises one error with the expected layout and the URL.
        """
        tried = [self.root] + [os.path.join(self.root, c) for c in candidates]
        for folder in tried:
            if all(os.path.exists(os.path.join(folder, r)) for r in required):
                self.dataset_dir = folder
                return folder
        raise self.not_found(tried, required)

    def not_found(
        self, tried: Sequence[str], required: Sequence[str], what: str | None = None
    ) -> DatasetError:
        """The missing-dataset error: what was looked at, the layout expected, where to get it.

        `what` describes the needed entries when they are alternatives (MSMT17 V1 or V2);
        otherwise each existing folder tried is reported with the entries it lacks.
        """
        if not os.path.isdir(self.root):
            problem = f"the root folder {self.root!r} does not exist."
        else:
            notes = []
            for folder in dict.fromkeys(tried):
                if not os.path.isdir(folder):
                    continue
                if what is None:
                    lacking = [r for r in required if not os.path.exists(os.path.join(folder, r))]
                    notes.append(f"{folder} lacks {', '.join(lacking)}")
                else:
                    notes.append(f"{folder} does not")
            problem = (
                f"no folder under {self.root!r} holds {what or ', '.join(required)} "
                f"({'; '.join(notes)})."
            )
        return DatasetError(
            f"{self.TITLE} not found: {problem}\n"
            f"Expected layout (ROOT = DATASETS.ROOT_DIR or --root; the dataset folder itself "
            f"is accepted too):\n{self.LAYOUT.rstrip()}\n"
            f"Published at: {self.URL}"
        )

    def keep_existing(
        self, records: list[ImageRecord], lines: list[int], list_file: str, unit: str = "line"
    ) -> list[ImageRecord]:
        """Check that every image a list file names exists; with skip_corrupt drop the missing."""
        index = FileIndex()
        kept: list[ImageRecord] = []
        missing: list[tuple[int, str]] = []
        for record, line in zip(records, lines, strict=True):
            if index.exists(record.path):
                kept.append(record)
            else:
                missing.append((line, record.path))
        if missing and not self.skip_corrupt:
            line, path = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(
                f"{self.TITLE}: {list_file} {unit} {line} names {path}, "
                f"which does not exist{more}. "
                "Restore the file, or set DATALOADER.SKIP_CORRUPT True (--option "
                "skip_corrupt=true) to skip missing images."
            )
        if missing:
            self.num_missing += len(missing)
            logger.warning(
                "%s: skipped %d missing image(s) named by %s, e.g. %s",
                self.TITLE, len(missing), list_file, missing[0][1],
            )
        return kept


def build_dataset(name: str, root: str | os.PathLike[str], **options: Any) -> ReIDDataset:
    """The registered dataset `name` loaded from `root` with loader options."""
    return DATASETS.get(name)(root, **options)
