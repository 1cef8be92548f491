"""Listing huge folders: names packed and sorted as bytes (export/listing.py), in the order
Python's sort of their strings gives, without one Python object per file."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest

from export.listing import PackedNames
from export.readers import iter_image_files
from trainer.data.image_folder import _images_under as _RELIST
from trainer.data.image_folder import _layout


def _packed(names: list[str]) -> PackedNames:
    out = PackedNames()
    for name in names:
        out.append(name.encode("utf-8", "surrogateescape"))
    return out


def test_names_are_put_in_the_order_of_their_strings():
    """Byte order of UTF-8 is the order of code points: names that share prefixes across
    the 8-byte windows of the radix sort, end inside or at the end of a window, hold
    characters below "/" or outside ASCII, sort as `sorted` sorts their strings."""
    rng = random.Random(0)
    alphabet = ["a", "b", "/", "-", ".", " ", "0", "9", "Z", "é", "日", "\U0001f600"]
    prefixes = ["", "n01440764_", "abcdefg", "abcdefgh", "abcdefghabcdefgh", "日本"]
    for _ in range(300):
        names = list({rng.choice(prefixes) + "".join(
            rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
            for _ in range(rng.randint(1, 300))})
        rng.shuffle(names)
        packed = _packed(names)
        assert [names[i] for i in packed.order()] == sorted(names)
        assert [packed[i] for i in packed.in_order()] == sorted(n.encode() for n in names)
        copy = PackedNames()  # gathered by numpy, blocks of names at a time
        copy.append(b"first")
        copy.extend(packed, packed.order())
        assert [copy[i] for i in range(len(copy))] == [b"first", *sorted(n.encode() for n in names)]
        assert len(packed.blob) == sum(len(n.encode()) for n in names)  # the padding is gone
    many = [f"{rng.choice(prefixes)}{rng.randrange(10**6)}.png" for _ in range(10000)]
    packed, copy = _packed(many), PackedNames()
    copy.extend(packed, packed.order())  # more than one block of names
    assert [copy[i] for i in range(len(copy))] == sorted(n.encode() for n in many)
    assert PackedNames().order().tolist() == []
    same = _packed(["b", "a", "b", "a"])
    assert same.order().tolist() == [1, 3, 0, 2]  # stable: equal names keep their order


def test_a_folder_is_listed_in_the_order_it_always_was(tmp_path):
    """Training lists a class folder in the order of its files' whole paths (a subfolder
    "a-b" before "a/"), a batch job folder by folder (by the parts of the paths, "a/"
    before "a-b"); both as they did with a sort of str objects, non-UTF-8 names included."""
    names = ["a/x.png", "a-b/y.png", "a.png", "ab.png", "B.png", "é.png", "日/1.png",
             "a/b/c.png", "n01440764_10026.JPEG", "n01440764_1002.JPEG", "zz.jpg",
             os.fsdecode(b"bad\xff.png")]
    for split in ("c0", "c1"):
        for name in names:
            path = tmp_path / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    listing, layout = _layout(tmp_path)
    assert layout == {"train": {"c0": len(names), "c1": len(names)}}
    want = sorted(str(tmp_path / "c0" / n) for n in names) + \
        sorted(str(tmp_path / "c1" / n) for n in names)
    assert list(listing) == want
    by_parts = sorted((tmp_path / c / n for c in ("c0", "c1") for n in names),
                      key=lambda p: p.relative_to(tmp_path).parts)
    assert list(iter_image_files(tmp_path)) == by_parts


def test_a_folder_tree_deeper_than_pythons_recursion_is_walked(tmp_path):
    """The batch job's walk recursed two frames a level: 600 levels were a RecursionError
    (not deeper here: pytest's own clean-up of old temporary folders recurses a level)."""
    deep = tmp_path
    for _ in range(600):
        deep = deep / "a"
        deep.mkdir()  # one level at a time: os.makedirs itself recurses
    (deep / "x.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    assert list(iter_image_files(tmp_path)) == [deep / "x.png", tmp_path / "b.png"]


def _listing_peak(folder: Path, n: int, train: bool, spill: Path | None = None) -> int:
    """Traced peak memory (bytes) of listing a class folder of n empty image files: the
    lower of two listings (an unrelated allocation of the test process, seen once in a full
    run of this file, then counts in one of them only)."""
    cls = folder / "c0"
    cls.mkdir(parents=True)
    for i in range(n):
        os.close(os.open(cls / f"n01440764_{i:07d}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    peaks = []
    for _ in range(2):
        tracemalloc.start()
        try:
            if train:
                listing, _ = _layout(folder, spill)
                assert len(listing) == n
                del listing
            else:
                assert sum(1 for _ in iter_image_files(folder)) == n
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return min(peaks)


@pytest.mark.parametrize("train", [True, False], ids=["training", "batch job"])
def test_listing_a_huge_folder_holds_no_object_per_file(tmp_path, train):
    """A class folder of millions of images is listed for its names' bytes and a few
    numpy columns while they are sorted: traced, 101 bytes a file for training and 99 for
    a batch job (25-byte names), where sorting str objects took 326 and 134 (peak RSS
    over 1,000,000 files: 280 and 195 MiB before, 103 and 101 now). Measured as the
    growth of the traced peak from 5,000 to 25,000 files."""
    small = _listing_peak(tmp_path / "s", 5000, train)
    large = _listing_peak(tmp_path / "l", 25000, train)
    per_file = (large - small) / 20000
    assert per_file < 120, f"{per_file:.0f} bytes per file ({small=}, {large=})"


def test_a_link_back_to_a_folder_above_is_not_walked_again(tmp_path):
    """A symbolic link inside a class folder that leads back to a folder above it (the
    class folder, its split, the root) is skipped by training's walk as by the batch job's:
    it was walked until the OS refused the path ("Too many levels of symbolic links"). A
    link to a folder beside it is still followed."""
    for name in ("c0/a.png", "c1/b.png", "c1/sub/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c0" / "self").symlink_to(".")
    (tmp_path / "c0" / "root").symlink_to("..")
    (tmp_path / "c1" / "sub" / "up").symlink_to("../..")
    (tmp_path / "c0" / "beside").symlink_to("../c1/sub")
    listing, layout = _layout(tmp_path)
    want = ["c0/a.png", "c0/beside/c.png", "c1/b.png", "c1/sub/c.png"]
    assert list(listing) == [str(tmp_path / name) for name in want]
    assert layout == {"train": {"c0": 2, "c1": 2}}
    assert sorted(map(str, iter_image_files(tmp_path))) == [str(tmp_path / n) for n in want]


def test_a_spilled_listing_reads_back_every_name_in_order(tmp_path, monkeypatch):
    """A listing given a spill folder keeps its names in files there, a buffer at a time:
    read back across the buffers' edges, after more names were added to one already read
    (an update's listing), and from a forked worker (the ingest's decoders read their paths
    so), every path is the one an in-memory listing gives."""
    import multiprocessing

    from trainer.data.paths import PathList

    monkeypatch.setattr(PathList, "BUFFER", 100)  # a spill every few names
    rng = random.Random(1)
    names = [f"c{rng.randrange(3)}/{rng.randrange(10 ** rng.randrange(1, 9))}.png"
             for _ in range(500)] + [os.fsdecode(b"c9/\xff\xfe.png"), "c9/\u00e9t\u00e9.png"]
    spilled, held = PathList("/data", spill=tmp_path), PathList("/data")
    for listing in (spilled, held):
        listing.extend(names[:300])
        listing.extend_packed(_packed(names[300:450]).sorted())
    assert list(spilled) == list(held) and len(spilled) == 450
    assert list(tmp_path.iterdir()) == []  # unlinked files: nothing left behind
    for a, b in ((0, 1), (3, 97), (299, 301), (0, 450), (449, 450), (10, 10)):
        assert spilled.block(a, b) == held.block(a, b)
    for listing in (spilled, held):
        listing.extend(names[450:])
    assert list(spilled) == list(held) and spilled.rel(501) == "c9/\u00e9t\u00e9.png"
    for places in ([], [0], [5, 6, 7], [2, 99, 300, 301, 500, 501], list(range(502))):
        # the paths an update hands its workers, read as one span of the listing
        assert spilled.at(places) == held.at(places) == [held[i] for i in places]
    global _FORKED
    _FORKED = spilled  # inherited by the fork, as the ingest's _JOB is
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.map(_forked_path, [0, 250, 500]) == [held[0], held[250], held[500]]
    finally:
        _FORKED = None


_FORKED = None


def _forked_path(i: int) -> str:
    return _FORKED[i]


def test_a_spilled_listing_holds_no_memory_per_file(tmp_path, monkeypatch):
    """An image folder listed for training with a spill folder (as the ingest lists it, in
    the cache's folder) holds one class's names while they are sorted, never every name:
    the traced peak grows by ~0 bytes a file from 3 to 15 class folders of 1,000 images
    (measured: 0.4; held in memory, the same listing grows by 36)."""
    from trainer.data.paths import PathList

    monkeypatch.setattr(PathList, "BUFFER", 4096)  # its 1 MiB would hold this whole test
    peaks = {}
    for classes in (3, 15):
        folder = tmp_path / f"f{classes}"
        for c in range(classes):
            (folder / f"c{c:02d}").mkdir(parents=True)
            for i in range(1000):
                os.close(os.open(folder / f"c{c:02d}" / f"n01440764_{i:07d}.JPEG",
                                 os.O_CREAT | os.O_WRONLY, 0o644))
        for spill in (tmp_path / "spill", None):
            tracemalloc.start()
            try:
                listing, _ = _layout(folder, spill)
                assert len(listing) == classes * 1000
                peaks[classes, spill is None] = tracemalloc.get_traced_memory()[1]
                del listing
            finally:
                tracemalloc.stop()
    spilled = (peaks[15, False] - peaks[3, False]) / 12000
    held = (peaks[15, True] - peaks[3, True]) / 12000
    assert held > 30, f"the in-memory listing: {held:.0f} bytes a file"  # the test can tell
    assert spilled < 2, f"{spilled:.1f} bytes per file ({peaks})"


def test_names_past_a_run_are_sorted_on_disk_and_merged_in_order(tmp_path, monkeypatch):
    """More than RUN names are sorted in runs written to unnamed files and merged as they
    are read back, BLOCK at a time: the order of `sorted` whatever the run and block sizes,
    the runs' files gone after close; a folder that cannot take a run is one line."""
    import export.listing as listing_module
    from export.errors import InputError
    from export.listing import SortedNames

    rng = random.Random(1)
    names = [f"{rng.choice(['', 'n0144_', 'abcdefgh', '日'])}{rng.randrange(10**5)}.png"
             for _ in range(3000)]
    for run, block in ((7, 3), (100, 64), (5000, 4096)):
        monkeypatch.setattr(listing_module, "RUN", run)
        monkeypatch.setattr(listing_module, "BLOCK", block)
        out = SortedNames(str(tmp_path))
        for a in range(0, len(names), 50):
            out.add(b"p/", [n.encode() for n in names[a:a + 50]])
        assert len(out) == len(names) and bool(out.runs) == (run < len(names))
        assert all(len(b) <= max(block, len(names) * (run >= len(names)))
                   for b in out.blocks())
        assert list(out) == sorted(f"p/{n}".encode() for n in names)
        out.close()
    assert os.listdir(tmp_path) == []  # unnamed files: nothing left behind
    monkeypatch.setattr(listing_module, "RUN", 10)
    gone = SortedNames(str(tmp_path / "gone"))
    with pytest.raises(InputError, match=r"gone: cannot write the sorted names of a large "
                                         r"folder \(No such file or directory\)"):
        gone.add(b"", [b"%d" % i for i in range(20)])


@pytest.mark.parametrize("train", [True, False], ids=["training", "batch job"])
def test_a_folder_larger_than_a_run_is_listed_in_bounded_memory(tmp_path, monkeypatch, train):
    """A class folder of more than RUN images is listed in the same order, and the memory
    of listing it no longer grows with it but for a read buffer per run (RUN_READ names): with
    RUN = 2,000 and RUN_READ = 256, the traced peak grows by under 12 bytes a file from 5,000
    to 25,000 files (~100 with the folder sorted in memory, the test above). The training
    listing here spills its paths, as the ingest's does."""
    import export.listing as listing_module
    from trainer.data import image_folder

    monkeypatch.setattr(listing_module, "RUN", 2000)
    monkeypatch.setattr(image_folder, "RUN", 2000)
    monkeypatch.setattr(listing_module, "RUN_READ", 256)  # names read from each run at a time
    small = _listing_peak(tmp_path / "s", 5000, train, spill=tmp_path / "spill")
    large = _listing_peak(tmp_path / "l", 25000, train, spill=tmp_path / "spill")
    per_file = (large - small) / 20000
    assert per_file < 12, f"{per_file:.0f} bytes per file ({small=}, {large=})"
    listing, _ = _layout(tmp_path / "l", tmp_path / "spill")
    want = sorted(f"{tmp_path}/l/c0/n01440764_{i:07d}.JPEG" for i in range(25000))
    assert list(listing) == want
    assert list(map(str, iter_image_files(tmp_path / "l"))) == want


def test_a_class_too_large_for_a_forked_lister_is_listed_again_here(tmp_path, monkeypatch):
    """Classes listed in forked processes come back through a pipe, so only those of at most
    RUN names do: a lister that finds more gives up, and the class is listed again in the
    ingest's process, its runs on disk there. The listing is the one a single process makes."""
    import export.listing as listing_module
    from trainer.data import image_folder
    from trainer.data import scan

    for c, n in (("a", 30), ("b", 5), ("c", 40), ("d", 12)):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "f" / c / f"{(i * 7919) % 1000:04d}.png").write_bytes(b"")
    alone, layout = _layout(tmp_path / "f")
    monkeypatch.setattr(listing_module, "RUN", 10)
    monkeypatch.setattr(image_folder, "RUN", 10)
    monkeypatch.setattr(scan, "FORK_FILES", 1)
    monkeypatch.setattr(scan, "usable_cores", lambda: 2)
    monkeypatch.setattr(image_folder, "_images_under", _recording)
    _recording.calls = []
    forked, again = _layout(tmp_path / "f", tmp_path / "spill")
    assert list(forked) == list(alone) and again == layout
    # those listed in this process (the forked listers' calls are theirs): the first class
    # and the two that were too large for a lister
    assert sorted(_recording.calls) == [str(tmp_path / "f" / c) for c in ("a", "c", "d")]


def _recording(*args, **kwargs):
    """`_images_under`, noting the folders listed in this process (a forked lister's notes
    stay in its own)."""
    _recording.calls.append(args[0])
    return _RELIST(*args, **kwargs)
