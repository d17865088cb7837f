"""Where images come from: a plain folder, an MVTec-style root, or a manifest CSV.

Sources are enumerated lazily (generators, one directory listing at a time) so a dump of millions
of files never sits in memory as one list. Paths come out absolute so a worker on another host
with the same mount sees the same file.

A plain folder may hold masks beside its images (MTD's MT_Free/Imgs: 952 JPEGs and their 952 PNG
masks): `<image stem>_mask.<ext>`, and a PNG with the stem of an image in another format (masks
are PNGs nearly everywhere). A walk given a `Masks` counts them, and leaves them out for training,
where a mask learnt as "normal" spoils the model unseen. Scoring keeps them: a name is only a
guess, and a night's dump gives every file its row (a.jpg and a.png may well be two shots).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from adqueue.core.errors import SourceError
from adqueue.data.paths import to_os, to_text

SPLITS = ("train", "test")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
# What the image beside a mask may be stored as: the formats adqueue decodes (data/io.py).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pbm", ".pgm",
                              ".ppm", ".pnm", ".jp2", ".j2k"})


_MASK_NAMES = "<image>_mask.*, or a PNG named like an image in another format"


@dataclass
class Masks:
    """Masks beside their images that a plain folder's walk met: counted as it goes, and left out
    of the items when `leave_out` (training)."""

    leave_out: bool
    count: int = 0

    def describe(self) -> str:
        if self.leave_out:
            beside = "masks beside their images" if self.count != 1 else "mask beside its image"
            return f"{self.count} {beside} left out of training ({_MASK_NAMES})"
        files = "files look like masks" if self.count != 1 else "file looks like a mask"
        return (f"{self.count} {files} beside images ({_MASK_NAMES}): scored like every file (an MVTec root or a "
                "manifest tells masks apart)")


@dataclass(frozen=True)
class Item:
    path: str
    label: int | None = None  # 0 normal, 1 defective, None unknown
    defect: str | None = None
    mask: str | None = None

    def to_row(self) -> list[object]:
        return [self.path, self.label, self.defect, self.mask]

    @classmethod
    def from_row(cls, row: list[Any]) -> Item:
        path, label, defect, mask = row
        return cls(str(path), None if label is None else int(label), defect, mask)


@dataclass(frozen=True)
class Source:
    """A parsed source spec. `items()` can be called again for a second pass."""

    kind: str  # folder | mvtec | manifest
    root: Path
    split: str | None
    labeled: bool
    allowed_roots: tuple[Path, ...] = ()  # where a manifest may point besides its own folder

    def items(self, masks: Masks | None = None) -> Iterator[Item]:
        """Every item, in a fixed order; a plain folder's masks beside images are counted in `masks`
        (and left out if it says so)."""
        if self.kind == "folder":
            return _folder_items(self.root, masks)
        if self.kind == "mvtec":
            return _mvtec_items(self.root, self.split)
        return _manifest_items(self.root, self.split, self.allowed_roots)

    def items_after(self, written: int, last_path: str | None, keep: Callable[[Item], bool] | None = None,
                    masks: Masks | None = None) -> Iterator[Item]:
        """The items (those `keep` accepts) a second enumeration gives after the first `written`,
        the last of which was `last_path`: for continuing an interrupted submission. A folder is
        matched by position in its walk order, so files added or removed meanwhile are handled; a
        manifest or MVTec root must list the same items as before."""
        items = self.items(masks) if keep is None else filter(keep, self.items(masks))
        if not written or last_path is None:
            return items
        if self.kind == "folder":
            mark = walk_order(self.root, to_os(last_path))
            return (item for item in items if walk_order(self.root, to_os(item.path)) > mark)
        return _skip_exactly(items, written, last_path, self.describe())

    def describe(self) -> str:
        split = f" (split {self.split})" if self.split else ""
        return f"{self.kind} {self.root}{split}"


def open_source(spec: str | Path, *, split: str | None = None, allowed_roots: tuple[Path, ...] = ()) -> Source:
    """Recognize what `spec` (an OS path) is. `split` selects train/test rows of labeled layouts.

    A manifest is checked whole here, before any job exists: its paths must stay inside its own
    folder or `allowed_roots`, and none may be listed twice."""
    if split is not None and split not in SPLITS:
        raise SourceError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"no such file or folder: {to_text(str(spec))}")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise SourceError(f"{to_text(str(spec))} is a file but not a manifest CSV (path,split,label,defect,mask)")
        source = Source("manifest", path, split, labeled=True, allowed_roots=allowed_roots)
        _check_manifest(source)
        return source
    if not is_plain_folder(path):
        return Source("mvtec", path, split, labeled=True)
    if split is not None:
        raise SourceError(f"{to_text(str(spec))} is a plain folder: --split needs an MVTec root or a manifest CSV")
    return Source("folder", path, None, labeled=False)


def is_plain_folder(spec: str | Path) -> bool:
    """A folder that is not an MVTec-style root (train/ and test/ in it): images without labels."""
    path = Path(spec).expanduser()
    return path.is_dir() and not ((path / "train").is_dir() and (path / "test").is_dir())


def walk_order(root: Path, path: str) -> tuple[tuple[int, str], ...]:
    """A sort key that orders paths exactly as _folder_items yields them: a folder's files (by
    name) before its subfolders (by name), depth first."""
    parts = Path(path).relative_to(root).parts
    return (*tuple((1, part) for part in parts[:-1]), (0, parts[-1]))


def _skip_exactly(items: Iterator[Item], count: int, last_path: str, what: str) -> Iterator[Item]:
    last = None
    for last in islice(items, count):  # noqa: B007 - only the last one skipped is wanted
        pass
    if last is None or last.path != last_path:
        raise SourceError(f"{what} changed since its submission started: submit it again as a new job")
    return items


def _folder_items(root: Path, masks: Masks | None) -> Iterator[Item]:
    # Every non-hidden entry that is not a folder is an item: a file that is not an image (or a
    # FIFO, a socket, a broken link) must come back as a result row with an error, not vanish.
    # Masks beside their images, for training, are the one exception (module docstring).
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        names = sorted(name for name in files if not name.startswith("."))
        found = masks_beside_images(names) if masks is not None else set()
        if masks is not None:
            masks.count += len(found)
        for name in names:
            if not (masks is not None and masks.leave_out and name in found):
                yield Item(to_text(os.path.join(directory, name)))


def masks_beside_images(names: list[str]) -> set[str]:
    """The names in one folder's listing that are masks of an image beside them."""
    formats: dict[str, set[str]] = {}  # stem -> the image extensions it exists in
    for name in names:
        stem, extension = os.path.splitext(name)
        if extension.lower() in IMAGE_EXTENSIONS:
            formats.setdefault(stem, set()).add(extension.lower())
    masks = set()
    for name in names:
        stem, extension = os.path.splitext(name)
        extension = extension.lower()
        if extension not in MASK_EXTENSIONS:
            continue
        if (stem.endswith("_mask") and stem[: -len("_mask")] in formats) or (
                extension == ".png" and formats.get(stem, set()) - {".png"}):
            masks.add(name)
    return masks


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
        if not entry.is_dir() and not entry.name.startswith("."):
            yield to_text(entry.path)


def _mask_index(folder: Path) -> dict[str, str]:
    """Mask files by stem. Masks without an image (real datasets have them) are simply unused."""
    return {
        Path(path).stem: path
        for path in _sorted_files(folder)
        if Path(path).suffix.lower() in MASK_EXTENSIONS
    }


_MANIFEST_COLUMNS = ("path", "split", "label", "defect", "mask")
_MAX_REPORTED = 5


def _manifest_rows(csv_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row); a byte-order mark (a spreadsheet's UTF-8 default) is accepted."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in ("path", "split", "label") if c not in (reader.fieldnames or [])]
            if missing:
                raise SourceError(
                    f"{csv_path} is not a manifest: missing column(s) {', '.join(missing)} "
                    f"(expected {','.join(_MANIFEST_COLUMNS)})"
                )
            yield from enumerate(reader, start=2)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{csv_path} is not a readable CSV manifest: {exc}") from None


def _selected(row: dict[str, str], split: str | None) -> bool:
    return split is None or (row.get("split") or "").strip() == split


def _check_manifest(source: Source) -> None:
    """One pass over the whole manifest; every problem found is counted, the first few named."""
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for line, row in _manifest_rows(source.root):
        if not _selected(row, source.split):
            continue
        try:
            item = _manifest_item(source, row, line)
        except SourceError as exc:
            problems.append(str(exc))
            continue
        seen = first_line.setdefault(item.path, line)
        if seen != line:
            problems.append(f"{source.root}:{line}: {item.path} is listed twice (lines {seen} and {line})")
    if problems:
        more = f" (and {len(problems) - _MAX_REPORTED} more)" if len(problems) > _MAX_REPORTED else ""
        raise SourceError("; ".join(problems[:_MAX_REPORTED]) + more)


def _manifest_items(csv_path: Path, split: str | None, allowed_roots: tuple[Path, ...] = ()) -> Iterator[Item]:
    source = Source("manifest", csv_path, split, labeled=True, allowed_roots=allowed_roots)
    for line, row in _manifest_rows(csv_path):
        if _selected(row, split):
            yield _manifest_item(source, row, line)


def _manifest_item(source: Source, row: dict[str, str], line: int) -> Item:
    where = f"{source.root}:{line}"
    raw_path = (row.get("path") or "").strip()
    if not raw_path:
        raise SourceError(f"{where}: empty path")
    label_text = (row.get("label") or "").strip()
    try:
        label = int(label_text) if label_text else None
    except ValueError:
        raise SourceError(f"{where}: label must be 0 or 1, not {label_text!r}") from None
    if label not in (None, 0, 1):
        raise SourceError(f"{where}: label must be 0 or 1, not {label_text!r}")
    mask = (row.get("mask") or "").strip()
    defect = (row.get("defect") or "").strip() or None
    return Item(
        path=_inside(source, raw_path, where),
        label=label,
        defect=defect,
        mask=_inside(source, mask, where) if mask else None,
    )


def _inside(source: Source, listed: str, where: str) -> str:
    """A manifest path relative to the manifest's folder, refused if it leaves that folder (an
    absolute path, `../`) for anywhere not in the allowed roots."""
    base = source.root.parent
    path = Path(os.path.normpath(base / listed))  # lexical: a symlink inside the folder is the folder's own
    if not any(path.is_relative_to(root) for root in (base, *source.allowed_roots)):
        raise SourceError(f"{where}: {listed} is outside the manifest's folder {base}: list its folder in "
                          "ADQUEUE_ALLOWED_ROOTS to allow it")
    return to_text(str(path))
