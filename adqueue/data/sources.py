"""Where images come from: a plain folder, an MVTec-style root, or a manifest CSV.

Sources are enumerated lazily (generators, one directory listing at a time) so a dump of millions
of files never sits in memory as one list. Paths come out absolute so a worker on another host
with the same mount sees the same file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from adqueue.errors import SourceError

SPLITS = ("train", "test")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Item:
    path: str
    label: int | None = None  # 0 normal, 1 defective, None unknown
    defect: str | None = None
    mask: str | None = None

    def to_row(self) -> list[object]:
        return [self.path, self.label, self.defect, self.mask]

    @classmethod
    def from_row(cls, row: list[object]) -> Item:
        path, label, defect, mask = row
        return cls(str(path), None if label is None else int(label), defect, mask)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Source:
    """A parsed source spec. `items()` can be called again for a second pass."""

    kind: str  # folder | mvtec | manifest
    root: Path
    split: str | None
    labeled: bool

    def items(self) -> Iterator[Item]:
        if self.kind == "folder":
            return _folder_items(self.root)
        if self.kind == "mvtec":
            return _mvtec_items(self.root, self.split)
        return _manifest_items(self.root, self.split)

    def items_after(self, written: int, last_path: str | None, keep: Callable[[Item], bool] | None = None,
                    ) -> Iterator[Item]:
        """The items (those `keep` accepts) a second enumeration gives after the first `written`,
        the last of which was `last_path`: for continuing an interrupted submission. A folder is
        matched by position in its walk order, so files added or removed meanwhile are handled; a
        manifest or MVTec root must list the same items as before."""
        items = self.items() if keep is None else filter(keep, self.items())
        if not written or last_path is None:
            return items
        if self.kind == "folder":
            mark = walk_order(self.root, last_path)
            return (item for item in items if walk_order(self.root, item.path) > mark)
        return _skip_exactly(items, written, last_path, self.describe())

    def describe(self) -> str:
        split = f" (split {self.split})" if self.split else ""
        return f"{self.kind} {self.root}{split}"


def open_source(spec: str | Path, *, split: str | None = None) -> Source:
    """Recognize what `spec` is. `split` selects train/test rows of labeled layouts."""
    if split is not None and split not in SPLITS:
        raise SourceError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"no such file or folder: {spec}")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise SourceError(f"{spec} is a file but not a manifest CSV (path,split,label,defect,mask)")
        _check_manifest_header(path)
        return Source("manifest", path, split, labeled=True)
    if (path / "train").is_dir() and (path / "test").is_dir():
        return Source("mvtec", path, split, labeled=True)
    if split is not None:
        raise SourceError(f"{spec} is a plain folder: --split needs an MVTec root or a manifest CSV")
    return Source("folder", path, None, labeled=False)


def walk_order(root: Path, path: str) -> tuple[tuple[int, str], ...]:
    """A sort key that orders paths exactly as _folder_items yields them: a folder's files (by
    name) before its subfolders (by name), depth first."""
    parts = Path(path).relative_to(root).parts
    return tuple((1, part) for part in parts[:-1]) + ((0, parts[-1]),)


def _skip_exactly(items: Iterator[Item], count: int, last_path: str, what: str) -> Iterator[Item]:
    last = None
    for last in islice(items, count):
        pass
    if last is None or last.path != last_path:
        raise SourceError(f"{what} changed since its submission started: submit it again as a new job")
    return items


def _folder_items(root: Path) -> Iterator[Item]:
    # Every regular, non-hidden file is an item: a file that is not an image must come back as
    # a result row with an error, not vanish silently.
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Item(os.path.join(directory, name))


def _mvtec_items(root: Path, split: str | None) -> Iterator[Item]:
    if split in (None, "train"):
        yield from (Item(path, 0, "good") for path in _sorted_files(root / "train" / "good"))
    if split in (None, "test"):
        test = root / "test"
        for defect in sorted(d.name for d in test.iterdir() if d.is_dir()):
            label = 0 if defect == "good" else 1
            masks = _mask_index(root / "ground_truth" / defect)
            for path in _sorted_files(test / defect):
                stem = Path(path).stem
                mask = masks.get(f"{stem}_mask") or masks.get(stem) if label else None
                yield Item(path, label, defect, mask)


def _sorted_files(folder: Path) -> Iterator[str]:
    if not folder.is_dir():
        return
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith("."):
            yield entry.path


def _mask_index(folder: Path) -> dict[str, str]:
    """Mask files by stem. Masks without an image (real datasets have them) are simply unused."""
    return {
        Path(path).stem: path
        for path in _sorted_files(folder)
        if Path(path).suffix.lower() in MASK_EXTENSIONS
    }


_MANIFEST_COLUMNS = ("path", "split", "label", "defect", "mask")


def _check_manifest_header(path: Path) -> None:
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    missing = [c for c in ("path", "split", "label") if c not in header]
    if missing:
        raise SourceError(
            f"{path} is not a manifest: missing column(s) {', '.join(missing)} "
            f"(expected {','.join(_MANIFEST_COLUMNS)})"
        )


def _manifest_items(csv_path: Path, split: str | None) -> Iterator[Item]:
    base = csv_path.parent
    with csv_path.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            if split is not None and (row.get("split") or "").strip() != split:
                continue
            yield _manifest_item(base, row, csv_path, line)


def _manifest_item(base: Path, row: dict[str, str], csv_path: Path, line: int) -> Item:
    raw_path = (row.get("path") or "").strip()
    if not raw_path:
        raise SourceError(f"{csv_path}:{line}: empty path")
    label_text = (row.get("label") or "").strip()
    try:
        label = int(label_text) if label_text else None
    except ValueError:
        raise SourceError(f"{csv_path}:{line}: label must be 0 or 1, not {label_text!r}") from None
    if label not in (None, 0, 1):
        raise SourceError(f"{csv_path}:{line}: label must be 0 or 1, not {label_text!r}")
    mask = (row.get("mask") or "").strip()
    defect = (row.get("defect") or "").strip() or None
    return Item(
        path=str((base / raw_path).resolve()),
        label=label,
        defect=defect,
        mask=str((base / mask).resolve()) if mask else None,
    )
