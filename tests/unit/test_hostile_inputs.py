"""Whatever is in a dump, reading it gives one truthful answer per file, quickly: odd names
survive as reversible text, special files are refused unopened, broken files become errors,
manifests cannot reach outside their folder, and no database URL is fooled by a folder's name."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adqueue.core.config import Settings
from adqueue.core.errors import ImageError, SourceError
from adqueue.data.io import decode_bytes, read_image
from adqueue.data.paths import to_os, to_text
from adqueue.data.sources import open_source
from adqueue.jobs.context import Context
from tests.helpers.hostile import ODD_NAMES, build_hostile_dump

MAX_MB = 1


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, textures) -> tuple[Path, dict[bytes, str | None]]:
    folder = tmp_path_factory.mktemp("hostile") / "dump"
    good = next(p for p in sorted(textures[1].glob("*.png")) if "corrupt" not in p.name)
    expected = build_hostile_dump(folder, good, max_file_mb=MAX_MB)
    return folder, {e.name: e.error for e in expected}


@pytest.mark.parametrize("what", list(ODD_NAMES))
def test_an_odd_name_survives_as_reversible_text(what: str) -> None:
    path = os.fsdecode(b"/dump/" + ODD_NAMES[what])
    text = to_text(path)
    text.encode("utf-8")  # fits any UTF-8 database, JSON document or hash
    assert not any(ord(c) < 32 for c in text)  # one line in a terminal
    assert to_os(text) == path and os.fsencode(to_os(text)) == b"/dump/" + ODD_NAMES[what]


def test_ordinary_names_are_stored_as_they_are() -> None:
    assert to_text("/data/line 3/ünïcødé_0001.png") == "/data/line 3/ünïcødé_0001.png"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=60))
def test_any_byte_name_round_trips(name: bytes) -> None:
    path = os.fsdecode(b"/d/" + name)
    assert to_os(to_text(path)) == path
    to_text(path).encode("utf-8")


def test_every_hostile_file_reads_or_says_why(hostile: tuple[Path, dict[bytes, str | None]]) -> None:
    folder, expected = hostile
    for name, error in expected.items():
        path = os.path.join(os.fsencode(folder), name)
        outcome: list[object] = []
        reader = threading.Thread(target=lambda p=path, out=outcome: out.append(_read(p)), daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), f"reading {name!r} blocked"  # a FIFO must not hang the reader
        (result,) = outcome
        if error is None:
            assert not isinstance(result, str), f"{name!r}: {result}"
        else:
            assert isinstance(result, str) and error in result, f"{name!r}: expected {error!r}, got {result!r}"


def _read(path: bytes) -> object:
    try:
        return read_image(os.fsdecode(path), channels=3, size=(32, 32), max_bytes=MAX_MB * 2**20)
    except ImageError as exc:
        return str(exc)


def test_enumeration_gives_one_item_per_entry_that_is_not_a_folder(hostile: tuple[Path, dict]) -> None:
    folder, expected = hostile
    items = [item.path for item in open_source(folder).items()]
    assert len(items) == len(set(items)) == len(expected)
    names = {os.path.relpath(os.fsencode(to_os(path)), os.fsencode(folder)) for path in items}
    assert names == set(expected)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_decoding_random_bytes_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ImageError):
        decode_bytes(data, channels=3)


_NAME = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b
                                                   and b not in (b".", b"..") and not b.startswith(b"."))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.sets(_NAME, min_size=1, max_size=12), payloads=st.lists(st.binary(max_size=64), min_size=12, max_size=12))
def test_random_names_and_bytes_give_one_answer_per_file(tmp_path_factory: pytest.TempPathFactory,
                                                         names: set[bytes], payloads: list[bytes]) -> None:
    folder = tmp_path_factory.mktemp("random")
    for name, data in zip(sorted(names), payloads, strict=False):
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(data)
    items = list(open_source(folder).items())
    assert sorted(os.fsencode(os.path.basename(to_os(i.path))) for i in items) == sorted(names)
    for item in items:
        with contextlib.suppress(ImageError):
            read_image(to_os(item.path), channels=1, size=(8, 8))


def _manifest(folder: Path, rows: list[str], *, bom: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(b"x")
    (folder / "b.png").write_bytes(b"x")
    path = folder / "manifest.csv"
    path.write_text(("\ufeff" if bom else "") + "path,split,label,defect,mask\n" + "".join(r + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_a_manifest_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, ["a.png,test,0,,", "b.png,test,1,crack,"], bom=True)
    items = list(open_source(manifest, split="test").items())
    assert [(Path(i.path).name, i.label) for i in items] == [("a.png", 0), ("b.png", 1)]


@pytest.mark.parametrize("listed", ["/etc/passwd", "../../etc/passwd", "sub/../../outside.png"])
def test_a_manifest_cannot_point_outside_its_folder(tmp_path: Path, listed: str) -> None:
    manifest = _manifest(tmp_path / "m", ["a.png,test,0,,", f"{listed},test,0,,"])
    with pytest.raises(SourceError, match=r"manifest.csv:3: .* is outside the manifest's folder"):
        open_source(manifest, split="test")


def test_allowed_roots_let_a_manifest_point_elsewhere(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "c.png").write_bytes(b"x")
    manifest = _manifest(tmp_path / "m", [f"{shared / 'c.png'},test,0,,"])
    with pytest.raises(SourceError, match="ADQUEUE_ALLOWED_ROOTS"):
        open_source(manifest, split="test")
    items = list(open_source(manifest, split="test", allowed_roots=(shared.resolve(),)).items())
    assert [Path(i.path).name for i in items] == ["c.png"]


def test_a_path_listed_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, ["a.png,test,0,,", "b.png,test,1,crack,", "./a.png,test,1,crack,"])
    with pytest.raises(SourceError, match=r"a.png is listed twice \(lines 2 and 4\)"):
        open_source(manifest, split="test")
    assert len(list(open_source(manifest, split="train").items())) == 0  # other splits are their own


@pytest.mark.parametrize("odd", ["a?b", "a%3Fb", "a#b"])
def test_a_data_dir_name_never_moves_the_database(tmp_path: Path, odd: str) -> None:
    plain, tricky = tmp_path / "a", tmp_path / odd
    for folder in (plain, tricky):
        Context(Settings.load(data_dir=folder, broker_url="")).store  # noqa: B018 - creates the file
    assert (tricky / "adqueue.db").is_file() and (plain / "adqueue.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a", odd])  # nothing created elsewhere
