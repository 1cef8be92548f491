"""The state of one batch job: `.<output>.partial/` beside the output, held under an
exclusive lock for the whole run.

It holds `job.json` (the model, the options and what the input is) and, per finished
chunk, a part file and its record (`part-NNNNNN.json`: rows, SHA-256 of the part, counts).
A record is written after its part, atomically, so a record names a part that was
complete; on `--resume` every part is checked against its record and the job continues
at the first part that is missing, damaged or unrecorded. Two jobs never share a state:
the second one is refused, naming the first one's PID.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from export.atomic import atomic_path
from export.errors import InputError
from export.records import load_json

HEAD_TAIL = 1 << 20  # bytes of a file's head and tail hashed into its identity
log = logging.getLogger(__name__)


def no_images(path: Path) -> InputError:
    """The one line for an image input that holds no image."""
    return InputError(f"{path}: no PNG or JPEG images found")


def name_under(path: Path, root: Path) -> str:
    """A file's name in a job's listing and outputs: its path under `root`, else whole."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: Path) -> dict:
    """Size, modification time and a hash of the first and last MiB: a changed file is
    caught without reading all of it."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(HEAD_TAIL))
        if st.st_size > HEAD_TAIL:
            f.seek(max(HEAD_TAIL, st.st_size - HEAD_TAIL))
            h.update(f.read(HEAD_TAIL))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


def input_identity(path: Path, image_files: list[Path] | None) -> dict:
    """What the input is: for a file its identity; for images (a folder or a .txt list),
    every image's path, size and modification time."""
    ident = {"path": str(path.resolve())}
    if path.is_file():
        ident["file"] = file_identity(path)
    if image_files is not None:
        root = path if path.is_dir() else path.parent
        ident["images"] = [[name_under(f, root), *_size_mtime(f)] for f in image_files]
    return ident


def tables_identity(path: Path) -> dict:
    """What a folder of tables is: each table's path under it and its identity."""
    from export.tables import table_files

    base, files, _ = table_files(str(path), "--input")
    return {"path": str(path.resolve()),
            "tables": [[name_under(f, base), file_identity(f)] for f in files]}


def write_listing(path: Path, files: Iterable[Path], out: Path,
                  class_names: list[str]) -> dict:
    """What an image input is, streamed: each image's path, size and modification time as
    a line of `out` (tab-separated), and their count and SHA-256 as the identity; with
    `labelled`, whether every image's folder names a class. Nothing per image is held, so a
    job over ten million images needs no more memory than one over ten thousand."""
    root = path if path.is_dir() else path.parent
    h, count, labelled = hashlib.sha256(), 0, True
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for image in files:
            name = name_under(image, root)
            # The name as a JSON string: a tab, a newline or an undecodable byte in a file
            # name cannot break its line (json escapes them, surrogates included).
            line = "\t".join([json.dumps(name), *map(str, _size_mtime(image))]) + "\n"
            f.write(line)
            h.update(line.encode())
            count += 1
            labelled = labelled and image.parent.name in class_names
    if not count:
        raise no_images(path)
    return {"count": count, "sha256": h.hexdigest(), "labelled": labelled}


def read_listing(path: Path, listing: Path) -> Iterator[Path]:
    """The images a listing names, in its order (the job reads what its identity says)."""
    root = path if path.is_dir() else path.parent
    with open(listing, encoding="utf-8", newline="\n") as f:
        for line in f:
            yield root / json.loads(line.rstrip("\n").rsplit("\t", 2)[0])


def _entries(listing: Path) -> Iterator[tuple[list[str], str]]:
    with open(listing, encoding="utf-8", newline="\n") as f:
        for line in f:
            name, size, mtime = line.rstrip("\n").rsplit("\t", 2)
            yield json.loads(name).split(os.sep), f"{size} {mtime}"


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def describe_listing_change(old: Path, new: Path) -> str:
    """Images added, removed and modified between two listings of a folder, both in path
    order, compared by walking them side by side (nothing held per image)."""
    counts, example, last = {"added": 0, "removed": 0, "modified": 0}, None, ([], [])
    a, b = _entries(old), _entries(new)
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if (x and x[0] < last[0]) or (y and y[0] < last[1]):  # a .txt list in its own order
            return f"the image list changed ({_lines(new):,} images, was {_lines(old):,})"
        last = (x[0] if x else last[0], y[0] if y else last[1])
        if y is None or (x is not None and x[0] < y[0]):
            what, name, x = "removed", x[0], next(a, None)
        elif x is None or y[0] < x[0]:
            what, name, y = "added", y[0], next(b, None)
        else:
            what, name = ("modified" if x[1] != y[1] else None), x[0]
            x, y = next(a, None), next(b, None)
        if what:
            counts[what] += 1
            example = example or os.sep.join(name)
    return (f"{counts['added']} images added, {counts['removed']} removed, "
            f"{counts['modified']} modified" + (f" (e.g. {example})" if example else ""))


def _size_mtime(f: Path) -> list[int]:
    try:
        st = f.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]  # unreadable now: `--on-error` decides when it is read


def describe_change(old: dict, new: dict) -> str:
    """One phrase saying how the input changed between two identities."""
    if old.get("path") != new.get("path"):
        return f"the input is now {new.get('path')}, it was {old.get('path')}"
    if isinstance(old.get("images"), dict) and isinstance(new.get("images"), dict):
        return (f"its images changed: {old['images'].get('count')} listed when its output "
                f"was written, {new['images'].get('count')} now, with other names, sizes or "
                f"modification times")
    for kind in ("images", "tables"):  # lists of [name, what identifies it...]
        if kind in old and kind in new:
            before = {e[0]: e[1:] for e in old[kind]}
            after = {e[0]: e[1:] for e in new[kind]}
            added, removed = after.keys() - before.keys(), before.keys() - after.keys()
            changed = [p for p in after.keys() & before.keys() if after[p] != before[p]]
            parts = [f"{len(added)} {kind} added", f"{len(removed)} removed",
                     f"{len(changed)} modified"]
            example = sorted(added or removed or changed)
            return ", ".join(parts) + (f" (e.g. {example[0]})" if example else "")
    a, b = old.get("file", {}), new.get("file", {})
    if a.get("size") != b.get("size"):
        return f"its size changed from {a.get('size')} to {b.get('size')} bytes"
    return "its content or modification time changed"


class JobState:
    def __init__(self, output: Path):
        self.output = output
        self.folder = output.parent / f".{output.name}.partial"
        # An image input's listing (write_listing): the job's, and a new job's until start
        self.listing, self.new_listing = self.folder / "images.tsv", self.folder / "images.new"
        self._lock_fd: int | None = None

    # -- the lock ----------------------------------------------------------------------
    def lock(self) -> None:
        """Hold `lock` inside the state folder exclusively until `close()`; refuse if another
        live process holds it. flock dies with its process, so a killed job leaves no lock."""
        path = self.folder / "lock"
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise InputError(f"{self.output}: another trainer predict job (PID {pid}) is "
                                 f"writing this output; wait for it or choose another --output")
            try:  # the folder may have been removed by the job we waited for: lock anew
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self, remove: bool) -> None:
        """Release the lock; with `remove`, delete the state first (the job is finished or
        failed for good)."""
        if remove:
            for item in self.folder.iterdir():
                if item.name != "lock":
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
            (self.folder / "lock").unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if remove:
            try:
                self.folder.rmdir()
            except OSError:  # a new job already took the folder
                pass

    # -- the job ---------------------------------------------------------------------
    def start(self, job: dict, resume: bool, fmt: str) -> int:
        """Begin (or, with `resume`, continue) `job`; return how many parts are complete."""
        meta = self.folder / "job.json"
        if resume and meta.is_file():
            try:
                saved = load_json(meta.read_text())
            except (OSError, ValueError):
                saved = None
            if isinstance(saved, dict):
                try:
                    self._check_same(saved, job)
                except BaseException:  # the job's own listing stays
                    self.new_listing.unlink(missing_ok=True)
                    raise
                if self.new_listing.exists():  # the job's listing's very lines (its identity
                    os.replace(self.new_listing, self.listing)  # is their SHA-256), undamaged
                done = self._complete_parts(fmt)
                self._remove_parts_from(done)
                log.info("%s: resuming after %d verified parts", self.folder, done)
                return done
        self._remove_parts_from(0)
        if self.new_listing.exists():
            os.replace(self.new_listing, self.listing)
        with atomic_path(meta) as tmp:
            tmp.write_text(json.dumps(job))
        return 0

    def _check_same(self, saved: dict, job: dict) -> None:
        old, new = saved.get("input", {}), job["input"]
        if old != new:
            listed = isinstance(new.get("images"), dict) and isinstance(old.get("images"), dict)
            try:
                change = describe_listing_change(self.listing, self.new_listing) if listed and \
                    self.listing.is_file() else describe_change(old, new)
            except ValueError:  # the job's listing was damaged: its identity says what it was
                change = describe_change(old, new)
            raise InputError(f"{self.output}: cannot --resume: the input changed since the "
                             f"interrupted job: {change}; run it again without --resume")
        for key in sorted(job):
            if saved.get(key) != job[key]:
                what = "model" if key == "model" else f"option {key}"
                raise InputError(f"{self.output}: cannot --resume: the interrupted job used "
                                 f"another {what} ({saved.get(key)!r}, now {job[key]!r}); run "
                                 f"it again without --resume")

    def part(self, i: int, fmt: str) -> Path:
        return self.folder / f"part-{i:06d}{fmt}"

    def record_path(self, i: int) -> Path:
        return self.folder / f"part-{i:06d}.json"

    def write_record(self, i: int, fmt: str, record: dict) -> dict:
        """Mark part `i` complete: its rows and SHA-256 with the job's counts."""
        record = {**record, "sha256": sha256_file(self.part(i, fmt))}
        with atomic_path(self.record_path(i)) as tmp:
            tmp.write_text(json.dumps(record))
        return record

    def read_record(self, i: int, fmt: str) -> dict | None:
        """Part `i`'s record if the part exists and matches it, else None."""
        try:
            record = load_json(self.record_path(i).read_text())
            if isinstance(record, dict) and record.get("sha256") == sha256_file(self.part(i, fmt)):
                return record
        except (OSError, ValueError):
            pass
        return None

    def _complete_parts(self, fmt: str) -> int:
        done = 0
        while self.read_record(done, fmt) is not None:
            done += 1
        return done

    def _remove_parts_from(self, first: int) -> None:
        """Delete parts and records numbered `first` and up (and stray temporary files)."""
        for item in self.folder.iterdir():
            name = item.name
            if name.startswith(".") or (name.startswith("part-") and name[5:11].isdigit()
                                        and int(name[5:11]) >= first):
                item.unlink(missing_ok=True)
