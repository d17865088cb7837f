"""Data sources: folders, MVTec layouts, manifest CSVs, and the shared datasets' real quirks."""

from pathlib import Path

import pytest

from adqueue.core.errors import SourceError
from adqueue.data.sources import Item, Masks, open_source
from tests.helpers.datasets import datasets_or_skip


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_is_recursive_sorted_and_keeps_non_images(tmp_path: Path) -> None:
    _touch(tmp_path / "b" / "2.png")
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "b" / "1.jpg")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden.png")
    _touch(tmp_path / ".cache" / "x.png")
    source = open_source(tmp_path)
    assert source.kind == "folder" and not source.labeled
    names = [Path(item.path).relative_to(tmp_path).as_posix() for item in source.items()]
    assert names == ["a.png", "notes.txt", "b/1.jpg", "b/2.png"]
    assert all(Path(item.path).is_absolute() and item.label is None for item in source.items())


def test_masks_beside_their_images_are_counted_and_left_out_for_training(tmp_path: Path) -> None:
    for name in ("a.jpg", "a.png",  # MTD: a JPEG and its PNG mask
                 "b.png", "b_mask.png",  # MVTec's naming, in one folder
                 "c.bmp", "c.png", "c_mask.bmp",  # one image, two masks
                 "d_mask.png",  # no image d beside it: an item like any other
                 "e.png", "e.PNG",  # both PNG: two images, nothing to tell a mask by
                 "f.tif", "f.txt",  # a text file is no image to be a mask of, nor a mask
                 "sub/g.jpeg", "sub/g.png", "sub/h.png", "notes.txt"):
        _touch(tmp_path / name)
    masks = Masks(leave_out=True)
    names = [Path(item.path).relative_to(tmp_path).as_posix() for item in open_source(tmp_path).items(masks)]
    assert names == ["a.jpg", "b.png", "c.bmp", "d_mask.png", "e.PNG", "e.png", "f.tif", "f.txt", "notes.txt",
                     "sub/g.jpeg", "sub/h.png"]
    assert masks.count == 5
    assert masks.describe().startswith("5 masks beside their images left out of training (")
    # scoring keeps every file, and counts them for its note; without a Masks nothing is looked at
    kept = Masks(leave_out=False)
    assert len(list(open_source(tmp_path).items(kept))) == 16 == len(list(open_source(tmp_path).items()))
    assert kept.count == 5 and kept.describe().startswith("5 files look like masks beside images (")
    again = Masks(leave_out=True)  # a training submission's walk continued after its 4th item
    assert len(list(open_source(tmp_path).items_after(4, str(tmp_path / "d_mask.png"), masks=again))) == 7
    assert again.count == 5


def test_mtd_free_images_without_their_masks() -> None:
    """MT_Free/Imgs as a plain folder: 952 JPEGs and their 952 PNG masks; only the JPEGs are items."""
    folder = datasets_or_skip("mtd") / "MT_Free" / "Imgs"
    masks = Masks(leave_out=True)
    items = list(open_source(folder).items(masks))
    assert len(items) == 952 and all(item.path.endswith(".jpg") for item in items)
    assert masks.count == 952
    assert masks.describe().startswith("952 masks beside their images left out of training")


def test_folder_enumeration_is_lazy(tmp_path: Path) -> None:
    for i in range(5):
        _touch(tmp_path / f"{i}.png")
    items = open_source(tmp_path).items()
    assert next(items).path.endswith("0.png")  # a generator, not a list built up front


def test_mvtec_layout_with_both_mask_namings_and_orphan_masks(tmp_path: Path) -> None:
    _touch(tmp_path / "train" / "good" / "t0.png")
    _touch(tmp_path / "test" / "good" / "g0.png")
    _touch(tmp_path / "test" / "crack" / "c0.png")
    _touch(tmp_path / "test" / "crack" / "c1.png")
    _touch(tmp_path / "test" / "hole" / "h0.png")
    _touch(tmp_path / "ground_truth" / "crack" / "c0_mask.png")
    _touch(tmp_path / "ground_truth" / "crack" / "c1.png")  # named exactly like its image
    _touch(tmp_path / "ground_truth" / "crack" / "zz_orphan.png")  # a mask without an image
    train = list(open_source(tmp_path, split="train").items())
    assert [(Path(i.path).name, i.label) for i in train] == [("t0.png", 0)]
    test = {Path(i.path).name: i for i in open_source(tmp_path, split="test").items()}
    assert set(test) == {"g0.png", "c0.png", "c1.png", "h0.png"}
    assert test["g0.png"].label == 0 and test["g0.png"].mask is None
    assert test["c0.png"].label == 1 and Path(test["c0.png"].mask).name == "c0_mask.png"
    assert Path(test["c1.png"].mask).name == "c1.png"
    assert test["h0.png"].label == 1 and test["h0.png"].mask is None and test["h0.png"].defect == "hole"


def test_manifest_split_paths_and_errors(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,split,label,defect,mask\nimgs/a.png,train,0,good,\nimgs/b.png,test,1,crack,masks/b.png\n")
    items = list(open_source(csv, split="test").items())
    assert items == [Item(str(tmp_path / "imgs/b.png"), 1, "crack", str(tmp_path / "masks/b.png"))]
    assert len(list(open_source(csv).items())) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("path,split,label\nx.png,train,2\n")
    with pytest.raises(SourceError, match="label must be 0 or 1"):
        list(open_source(bad).items())
    with pytest.raises(SourceError, match="missing column"):
        (tmp_path / "nohead.csv").write_text("a,b\n1,2\n")
        open_source(tmp_path / "nohead.csv")


def test_source_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing")
    with pytest.raises(SourceError, match="plain folder"):
        open_source(tmp_path, split="train")
    with pytest.raises(SourceError, match="unknown split"):
        open_source(tmp_path, split="validation")
    with pytest.raises(SourceError, match="not a manifest"):
        open_source(_touch(tmp_path / "x.png"))


def test_mtd_manifest_has_the_papers_split() -> None:
    root = datasets_or_skip("mtd")
    train = list(open_source(root / "manifest.csv", split="train").items())
    test = list(open_source(root / "manifest.csv", split="test").items())
    assert len(train) == 762 and all(i.label == 0 for i in train)
    assert sum(i.label == 0 for i in test) == 190 and sum(i.label == 1 for i in test) == 392
    assert all(i.mask and Path(i.mask).is_file() for i in test if i.label == 1)
    assert all(Path(i.path).is_file() for i in train[:20] + test[:20])


def test_battery_weld_ignores_orphan_masks() -> None:
    root = datasets_or_skip("battery_weld")
    source = open_source(root, split="test")
    assert source.kind == "mvtec"
    test = list(source.items())
    assert sum(i.label == 0 for i in test) == 35 and sum(i.label == 1 for i in test) == 93
    assert all(i.mask and Path(i.mask).is_file() for i in test if i.label == 1)
    assert len(list(open_source(root, split="train").items())) == 37
