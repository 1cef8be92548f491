"""Input readers of the batch job, all streaming fixed-size chunks with bounded memory.

Each reader yields `Chunk`s of at most `rows` inputs: ids, the model input array, labels
when the input carries them, and extra columns to pass through. numpy + pillow; CSV and
Parquet need pyarrow. The IDX reader is shared with the training side.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.card import InputSpec
from export.errors import InputError, require_file
from export.jobstate import name_under, no_images
from export.listing import BLOCK, SortedNames
from export.names import shown
from export.timing import available_memory

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Chunk:
    ids: list[str]
    x: np.ndarray
    y: np.ndarray | None = None  # class indices, or regression targets
    extra: dict[str, list] = field(default_factory=dict)  # passed-through columns
    skipped: list[str] = field(default_factory=list)  # unreadable files (--on-error skip)


def read_idx(path: Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file with a uint8 payload, checking its magic number and length. The
    payload is read up to the size its dimensions give (and one byte more, to find a longer
    file), once that size fits in the memory available: a .gz of a few MB can inflate to
    gigabytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            magic = int.from_bytes(head, "big")
            if len(head) == 4 and ((expected_magic is not None and magic != expected_magic)
                                   or magic >> 8 != 0x08):
                want = expected_magic if expected_magic is not None else "0x08NN (uint8 payload)"
                raise InputError(f"{path}: IDX magic number is {magic}, expected {want}")
            head += f.read(4 * (magic & 0xFF))
            if len(head) < 4 + 4 * (magic & 0xFF) or len(head) < 8:
                raise InputError(f"{path}: IDX file is truncated ({len(head)} bytes)")
            dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big")
                    for i in range(magic & 0xFF)]
            size = math.prod(dims)  # exact: huge declared sizes cannot wrap around
            check_fits(path, f"its data ({' x '.join(map(str, dims))})", size,
                       "an IDX file is read whole")
            data = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as exc:  # zlib's: a damaged .gz
        raise InputError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < size:
        raise InputError(f"{path}: IDX file has {len(head) + len(data)} bytes, expected "
                         f"{len(head) + size} for dimensions {dims}")
    if len(data) > size:
        raise InputError(f"{path}: IDX file holds more than the {len(head) + size} bytes of "
                         f"its dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def labels_to_index(y: np.ndarray, class_names: list[str], source: str,
                    by_name: bool = False) -> np.ndarray:
    """Labels may be class indices or class names (`by_name`: always names, as in a table
    whose integer labels are names); return indices. Without classes (regression) they are
    target values."""
    if not class_names:
        return y.astype(np.float32)
    if y.dtype.kind in "iu" and not by_name:
        bad = (y < 0) | (y >= len(class_names))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{source}: label {int(y[row])} at row {row} is outside the "
                             f"{len(class_names)} classes")
        return y.astype(np.int64)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [str(v) for v in y if str(v) not in index]
    if unknown:
        listed = ", ".join(map(shown, class_names[:10])) + (
            f", ... ({len(class_names)} in all)" if len(class_names) > 10 else "")
        raise InputError(f"{source}: label {shown(unknown[0])} is not one of the classes "
                         f"({listed})")
    return np.array([index[str(v)] for v in y], dtype=np.int64)


def _array_chunks(path: Path, x, y, class_names, rows: int, first: int) -> Iterator[Chunk]:
    if y is not None and len(y) != len(x):
        raise InputError(f"{path}: 'x' has {len(x)} rows but 'y' has {len(y)}")
    y = None if y is None else labels_to_index(np.asarray(y), class_names, f"{path}:y")
    for start in range(first * rows, len(x), rows):
        stop = min(start + rows, len(x))
        yield Chunk([str(i) for i in range(start, stop)], np.asarray(x[start:stop]),
                    None if y is None else y[start:stop])


@contextlib.contextmanager
def _reading_arrays(path: Path) -> Iterator[None]:
    """np.load's errors on `path` (zipfile's and the format's, pickled objects refused) as one
    InputError naming it."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy and zipfile raise a dozen kinds
        raise InputError(f"{path}: cannot read arrays ({type(exc).__name__}: "
                         f"{short_reason(exc)})") from None


def read_npz(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `names` of an .npz that holds them (`x` at least), read whole; a damaged
    or foreign file (not a zip, cut short, a bad CRC, an .npy) is one InputError naming it.
    Nothing is ever unpickled."""
    with _reading_arrays(path):  # (mmap_mode: an .npy named .npz is refused unread)
        npz = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: an .npy file named .npz; expected an .npz of arrays x "
                             "(and y)")
    with _reading_arrays(path), npz:
        if "x" not in npz.files:
            raise InputError(f"{path}: missing array 'x' (found {sorted(npz.files)})")
        names = tuple(name for name in names if name in npz.files)
        # a zip member cannot be memory-mapped, and 3 MB of zip can hold gigabytes of zeros
        check_fits(path, f"array{'s' * (len(names) > 1)} {', '.join(map(repr, names))}",
                   sum(_member_bytes(npz, name) for name in names),
                   "an .npz is read whole (trainer predict reads an .npy memory-mapped)")
        return {name: npz[name] for name in names}


def _member_bytes(npz, name: str) -> int:
    """The bytes array `name` of an .npz takes once read, from its .npy header alone."""
    fmt = np.lib.format
    if f"{name}.npy" not in npz.zip.namelist():  # numpy would hand the member over as bytes
        raise InputError(f"{npz.zip.filename}: {name!r} is not a NumPy array (its zip member "
                         "is not an .npy)")
    with npz.zip.open(f"{name}.npy") as f:
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else \
            fmt.read_array_header_2_0  # (2, 0) and (3, 0): the header's size in 4 bytes
        shape, _, dtype = read(f)
    return math.prod(shape) * dtype.itemsize


def check_fits(path: Path, what: str, size: int, why: str) -> None:
    """`what` of `path`, `size` bytes once read, must fit in the memory available: read
    whole (`why`), more would swap or get the process killed, with no line."""
    avail = available_memory()
    if avail is not None and size > avail:
        raise InputError(f"{path}: {what} is {size / 2**20:,.0f} MiB once read, more "
                         f"than the {avail / 2**20:,.0f} MiB of memory available; {why}")


def read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """`x` (and `y`) of an .npz, or an .npy (memory-mapped, so it may exceed RAM). Nothing
    is ever unpickled."""
    if path.suffix == ".npy":
        with _reading_arrays(path):
            x, y = np.load(path, mmap_mode="r", allow_pickle=False), None
    else:
        arrays = read_npz(path, ("x", "y"))
        x, y = arrays["x"], arrays.get("y")
    for name, arr in (("x", x), ("y", y)):
        if arr is not None and arr.ndim == 0:
            raise InputError(f"{path}: array {name!r} is a single value; expected one row "
                             f"per input")
    if y is not None and y.ndim != 1:  # a label a row (compare and export score them)
        raise InputError(f"{path}: array 'y' has shape {y.shape}; expected one label a row")
    return x, y


def _idx_chunks(path: Path, class_names, rows: int, first: int) -> Iterator[Chunk]:
    x = read_idx(path, 2051)[:, None]  # (N, 1, H, W)
    labels = Path(str(path).replace("images", "labels").replace("idx3", "idx1"))
    y = read_idx(labels, 2049) if labels != path and labels.is_file() else None
    return _array_chunks(path, x, y, class_names, rows, first)


def is_image_input(path: Path) -> bool:
    """A folder of images, a .txt list of them or one image file (the other inputs are
    files of rows, or a folder of tables: export/tables.py)."""
    from export.tables import holds_tables

    if path.is_dir():
        return not holds_tables(path)
    return path.suffix.lower() in (".txt", *IMAGE_SUFFIXES)


def iter_image_files(path: Path) -> Iterator[Path]:
    """The images of a folder (recursively, in sorted path order, holding the entries of the
    folders on the way down only; a link back to a folder above is not followed again) or
    of a .txt list (one path per line, read line by line): a job over millions of images
    keeps no list of them. The walk keeps its own stack, not Python's: a folder tree
    thousands of levels deep was a RecursionError."""
    if not path.is_dir():
        yield from [path] if path.suffix.lower() in IMAGE_SUFFIXES else _listed_images(path)
        return
    st = path.stat()
    walk = [(path, _entries(path), frozenset({(st.st_dev, st.st_ino)}))]
    try:
        while walk:
            folder, entries, above = walk[-1]
            name, is_dir = next(entries, (None, False))
            if name is None:
                walk.pop()
            elif is_dir:
                sub = (folder / name).stat()
                if (sub.st_dev, sub.st_ino) not in above:
                    walk.append((folder / name, _entries(folder / name),
                                 above | {(sub.st_dev, sub.st_ino)}))
            elif os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield folder / name
    finally:
        for _, entries, _ in walk:
            entries.close()


def _listed_images(path: Path) -> Iterator[Path]:
    base = path.parent
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: image list is not UTF-8 text (line {n}, byte "
                                 f"{exc.start})") from None
            if "\0" in line:
                raise InputError(f"{path}: line {n} holds a NUL character; expected one image "
                                 "path a line")
            if line:
                yield base / line


def _entries(path: Path) -> Iterator[tuple[str, bool]]:
    """(name, is a folder) of each entry of `path`, by name: the order of sorted(Path) (by
    parts). No str per entry while listing (a folder may hold millions), sorted in runs on
    disk past RUN: each name ends in NUL and whether it is a folder. A name has no NUL, so
    the mark keeps the names' order (a name that is a prefix of another still sorts
    first)."""
    names, batch = SortedNames(), []
    try:
        with os.scandir(path) as it:
            for e in it:
                batch.append(os.fsencode(e.name) + (b"\0d" if e.is_dir() else b"\0f"))
                if len(batch) == BLOCK:
                    names.add(b"", batch)
                    batch = []
        names.add(b"", batch)
        for entry in names:
            yield os.fsdecode(entry[:-2]), entry[-1:] == b"d"
    finally:
        names.close()


def image_files(path: Path) -> list[Path]:
    """A folder (searched recursively) or a .txt list of image paths, as a list."""
    files = list(iter_image_files(path))
    if not files:
        raise no_images(path)
    return files


def decode_image(path: Path, spec: InputSpec) -> np.ndarray:
    """One image file as the card says (export/imaging.py, shared with training)."""
    from export.imaging import decode

    require_file(path, "an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    return decode(data, spec, str(path))


def _image_id(path: Path, root: Path) -> str:
    """An image's id in the outputs: its path under the input, with any byte that is not
    UTF-8 written as \\xNN (every output format is UTF-8; such a name crashed the writer)."""
    return name_under(path, root).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _image_chunks(path: Path, spec: InputSpec, class_names, rows: int, first: int, on_error: str,
                  pool: ThreadPoolExecutor, files: Iterable[Path] | None,
                  labelled: bool | None) -> Iterator[Chunk]:
    """`files` (a list, or a stream with `labelled` known) or the input's own listing."""
    if files is None:
        files = image_files(path)
    if labelled is None:
        files = list(files)
        labelled = all(f.parent.name in class_names for f in files)
    files = iter(files)
    root = path if path.is_dir() else path.parent

    def load(f: Path):
        try:
            return decode_image(f, spec)
        except InputError as exc:
            if on_error == "fail":
                raise
            return exc

    for _ in itertools.islice(files, first * rows):  # the parts a resumed job has
        pass
    while batch := list(itertools.islice(files, rows)):
        images = list(pool.map(load, batch))  # PIL decodes with the GIL released
        ok = [i for i, im in enumerate(images) if not isinstance(im, InputError)]
        x = np.stack([images[i] for i in ok]) if ok else np.zeros((0, *spec.shape), np.uint8)
        y = np.array([class_names.index(batch[i].parent.name) for i in ok]) if labelled else None
        yield Chunk([_image_id(batch[i], root) for i in ok], x, y,
                    skipped=[str(im) for im in images if isinstance(im, InputError)])


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The first line of a library's error, cut short: pyarrow quotes whole input lines. The
    file pyarrow names first is the one the message names already: left out, so the cut keeps
    what is wrong ("Could not open CSV input source '/a/long/path': Invalid: In CSV column
    #1: ...", after "Could not read schema from '/a/long/path'" where it made a dataset)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^(Error creating dataset\. Could not read schema from '[^']*'\. Is this a "
                  r"'\w+' file\?: )?(Could not open \w+ input source '[^']*': )?(Invalid: )?",
                  "", text)
    return text if len(text) <= limit else text[:limit] + "..."


def iter_chunks(path: str | Path, spec: InputSpec, class_names: list[str], rows: int = 1024,
                on_error: str = "fail", target: str | None = None,
                start_chunk: int = 0, files: Iterable[Path] | None = None,
                labelled: bool | None = None, folder=None, flag: str = "--input") -> Iterator[Chunk]:
    """Chunks of exactly `rows` inputs (the last may be shorter) from any supported input,
    starting at chunk `start_chunk` (a resumed job skips what it has done). `files`: the
    images of an image input, when the caller has listed them already (a stream of them
    with `labelled`: whether every image's folder names a class). `folder`
    (tableschema.FolderSchema): a table file is one of that folder of tables, read as the folder
    is read (its columns, types and partition keys). `flag`: the option that gave `path`."""
    from export.tables import FORMATS, folder_chunks, is_table_glob, table_chunks

    if is_table_glob(path):  # data/*.parquet: the tables it names, as one
        yield from folder_chunks(Path(path), spec, class_names, rows, start_chunk, target,
                                 flag=flag)
        return
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: input not found")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix.lower()
    if is_image_input(path):
        with ThreadPoolExecutor() as pool:
            yield from _image_chunks(path, spec, class_names, rows, start_chunk, on_error, pool,
                                     files, labelled)
    elif suffix in (".npz", ".npy"):
        yield from _array_chunks(path, *read_arrays(path), class_names, rows, start_chunk)
    elif path.is_dir() or suffix in FORMATS and folder is not None:
        yield from folder_chunks(path, spec, class_names, rows, start_chunk, target, folder,
                                 flag)
    elif suffix in FORMATS:
        yield from table_chunks(path, spec, class_names, rows, start_chunk, target)
    elif "idx3-ubyte" in path.name:
        yield from _idx_chunks(path, class_names, rows, start_chunk)
    else:
        raise InputError(f"{path}: unsupported input; expected an image, a folder or .txt "
                         "list of images, .csv or .parquet (or a folder of them), .npz, .npy "
                         "or an IDX images file")
