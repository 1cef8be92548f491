"""FixedDataset: what every source yields, and its content fingerprint."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from export.card import InputSpec
from export.errors import InputError
from export.imaging import PREPROCESSING
from export.names import check_class_names
from trainer.data.bucketsort import bucket_sorted
from trainer.data.records import READ_ROWS, Records, places
from trainer.data.split import Picked

CHUNK_BYTES = 32 << 20  # rows per step of every pass over a whole split: ~32 MiB of x
# and of what reading them makes a row: a chunk's positions, its row numbers and labels'
# (int64 on the way), the span of rows read around them, masks (traced: ~110 bytes a row,
# where a table's 3 features are 12; chunks of x alone held ~7x CHUNK_BYTES)
GATHER_BYTES = 128


@dataclass(frozen=True)
class Split:
    """Samples of a dataset. `x` is the storage, possibly a read-only np.memmap larger than
    RAM; `y` holds one label per sample; `rows` (when given) maps each sample to its row of
    `x`, so a subset or a cache shared by duplicate files costs no copy of `x`. A fit's
    train/val/test read both through the split's notes (`pick`, split.Picked): a byte a
    row for all three, where arrays of their own took 5."""

    x: np.ndarray  # (R, C, H, W) uint8 images, or (R, F) float32 features (or a RowFile)
    y: np.ndarray  # (N,) class indices (label_dtype), or float regression targets
    rows: np.ndarray | None = None  # (N,) rows of x (int32 or int64); None = the first N rows

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        row = self.x[0].nbytes if len(self.x) else 0
        return len(self) * (row + self.y.itemsize)

    @property
    def chunk_rows(self) -> int:
        """Samples per step of a chunked pass (~CHUNK_BYTES of x and of reading it)."""
        return max(1, CHUNK_BYTES // (self.x[:1].nbytes + GATHER_BYTES))

    def subset(self, samples: np.ndarray) -> Split:
        rows = samples if self.rows is None else self.rows[samples]
        return replace(self, y=self.y[samples], rows=rows)

    def pick(self, notes: np.ndarray, code: int) -> Split:
        """The samples whose note is `code` (split.split_notes), read through the notes:
        no array of their rows or labels is made (split.Picked)."""
        picked = Picked(notes, code)
        return replace(self, y=picked.through(self.y),
                       rows=picked if self.rows is None else picked.through(self.rows))

    def arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The samples as in-memory arrays (the first `limit` of them), class labels as
        int64: copies, never views of a memory map whose file may change."""
        if self.rows is None:  # x[:n] of a RowFile reads n rows: the limit goes first
            end = len(self.y) if limit is None else min(limit, len(self.y))
            return np.array(self.x[:end]), wide(np.array(self.y[:end]))
        rows = self.rows[:limit]
        if len(rows) and np.all(rows[1:] == rows[:-1] + 1):  # contiguous: one sequential read
            return np.array(self.x[rows[0]:rows[-1] + 1]), wide(np.asarray(self.y[:limit]))
        return np.asarray(self.x[rows]), wide(np.asarray(self.y[:limit]))

    def chunks(self, limit: int | None = None, rows: int | None = None):
        """(x, y) in consecutive pieces of `rows` samples (default ~CHUNK_BYTES): a pass
        over the split in bounded memory."""
        n, step = len(self) if limit is None else min(limit, len(self)), rows or self.chunk_rows
        for start in range(0, n, step):
            yield self.subset(np.arange(start, min(n, start + step))).arrays()


def label_dtype(num_classes: int) -> np.dtype:
    """The narrowest signed integer that holds `num_classes` class indices. A dataset keeps
    one label a row, and each split a copy of its own: 10 million rows hold 20 MB as int8
    where int64 held 160. Labels are widened to int64 (`wide`) where they leave the data:
    a batch, an array of samples, the gates' held-out rows."""
    for kind in (np.int8, np.int16, np.int32):
        if num_classes <= int(np.iinfo(kind).max) + 1:
            return np.dtype(kind)
    return np.dtype(np.int64)


def wide(y: np.ndarray) -> np.ndarray:
    """Class labels as int64 (what torch's losses and the metrics take); targets as they are."""
    y = np.asarray(y)  # (a split's labels may be read through its notes: split.Picked)
    return y.astype(np.int64) if y.dtype.kind in "iu" and y.dtype != np.int64 else y


class SplitRows:
    """A split's inputs as a sliceable sequence: `rows[a:b]` reads those samples (from a
    memory map when the split is one). What the export's gates iterate batch by batch, so
    a validation split larger than RAM is never held at once."""

    def __init__(self, split: Split):
        self.split = split
        self.shape = (len(split), *split.x.shape[1:])
        self.dtype, self.ndim = split.x.dtype, split.x.ndim

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("SplitRows takes slices")
        return self.split.subset(np.arange(*key.indices(len(self)))).arrays()[0]


@dataclass(frozen=True)
class SourceOptions:
    """Options some sources need; each source reads only its own."""

    image_size: tuple[int, int] | None = None  # image_folder: (H, W); None = first image's
    color_mode: str | None = None  # image_folder: "L" or "RGB"; None = first image's
    target: str = "target"  # tabular: the target column
    task: str = "auto"  # tabular: classification, regression or auto
    exclude_columns: tuple[str, ...] = ()  # tabular: columns that are not features
    cache_dir: str | None = None  # image_folder, tabular: the decoded-row cache
    verify_cache: bool = False  # re-hash every file instead of trusting size, mtime, inode


@dataclass(frozen=True)
class FixedDataset:
    """A whole dataset decoded once into compact arrays.

    `train` is split further into train/val by the DataModule unless the source has its own
    `val`; `test` is the source's own test split when it has one.
    """

    name: str
    train: Split
    val: Split | None
    test: Split | None
    class_names: list[str]  # empty for regression
    # How deployment inputs look: name, kind, dtype, layout, per-sample shape, value range.
    input_spec: InputSpec
    task: str = "classification"
    fingerprint: str = field(default="")
    # Where the source keeps snapshots of its files per fingerprint (trainer/data/lineage.py)
    history: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def image_spec(channels: int, height: int, width: int) -> InputSpec:
    """Input spec of a uint8 image model: the graph takes raw 0..255 pixels, NCHW."""
    return InputSpec(
        name="image", kind="image", dtype="uint8", layout="NCHW",
        shape=(channels, height, width), value_range=(0, 255),
        color_mode="L" if channels == 1 else "RGB", resize=(height, width),
        # How files become these pixels (export/imaging.py), for any runtime to reproduce.
        preprocessing=PREPROCESSING)


def value_range(split: Split) -> tuple[float, float]:
    """(min, max) of a split's values, read in chunks."""
    lo, hi = np.inf, -np.inf
    for x, _ in split.chunks():
        if x.size:
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return lo, hi


def feature_spec(columns: list[str], value_range: tuple[float, float]) -> InputSpec:
    """Input spec of a tabular model: float32 features in the training column order."""
    return InputSpec(name="features", kind="tabular", dtype="float32", layout="NF",
                     shape=(len(columns),), columns=tuple(columns),
                     value_range=(float(value_range[0]), float(value_range[1])))


def require_root(root: str | None, source: str, what: str, file: bool = False) -> Path:
    if not root:
        raise InputError(f"data.root: the {source} source needs {what}")
    path = Path(root)
    if file and not path.is_file():
        raise InputError(f"{path}: file not found (data.root)")
    if not file and not path.is_dir():
        raise InputError(f"{path}: folder not found (data.root)")
    return path


def fingerprint(class_names: list[str], splits: list[Split | None]) -> str:
    """SHA-256 over content only (arrays, dtypes, shapes, class names): stable across
    machines, folder and file names, and timestamps. Read in chunks."""
    h = hashlib.sha256()
    h.update("\x00".join(class_names).encode())
    for split in splits:
        if split is None:
            h.update(b"<none>")
            continue
        y_type = wide(split.y[:0]).dtype.str  # labels hashed as int64 whatever they are kept as
        h.update(f"{split.x.dtype.str}{split.x.shape[1:]}{len(split)}{y_type}".encode())
        for x, y in split.chunks():
            h.update(memoryview(np.ascontiguousarray(x)).cast("B"))
            h.update(memoryview(np.ascontiguousarray(y)).cast("B"))
    return h.hexdigest()


def files_fingerprint(settings: str, class_names: list[str], split_names: list[str],
                      splits: np.ndarray, labels: np.ndarray, records: Records,
                      scratch_folder: Path | None = None) -> str:
    """SHA-256 of a dataset read from files, composed from the files' own SHA-256 digests:
    (split, label or -1, digest) per file, sorted, so it depends on content only (not on
    names, order or timestamps), costs nothing to update when a few files change, and
    equals what a fresh ingest of the same files computes. `settings` are the decode
    settings (size, colour mode, decoder version); `splits` (the index of each file's split
    in `split_names`) and `labels` (int) have one element per file of `records`, the files
    of one (split, label) next to each other, as the sources list them (a split's classes
    in turn). Each such group's digests are sorted on their own, a bucket of them at a time
    (bucketsort, its scratch file in `scratch_folder`), and hashed in blocks of
    FINGERPRINT_BLOCK files: memory holds a block and a bucket, where a sort of a group
    held 40 bytes a file of it (a class of 10 million images: 400 MB)."""
    h = hashlib.sha256(settings.encode())
    h.update("\x00".join(class_names).encode())
    names = sorted(split_names)  # files are sorted by split name, then label, then digest
    code = np.array([names.index(n) for n in split_names], np.int8)
    firsts = _group_starts(splits, labels)
    groups = sorted(zip(code[splits[firsts]].tolist(), labels[firsts].tolist(), firsts,
                        [*firsts[1:], len(records)]))
    if len({(c, label) for c, label, _, _ in groups}) < len(groups):
        raise ValueError("files_fingerprint: the files of a split and label must be listed together")
    for c, label, a, b in groups:
        prefix = np.frombuffer(f"{names[c]}|{label}|".encode(), np.uint8)

        def digests(x: int, y: int, a: int = a) -> np.ndarray:
            return records.block("digest", a + x, a + y)

        try:
            for part in bucket_sorted(b - a, digests, digests, lambda d: d, scratch_folder):
                raw = part.view(np.uint8).reshape(-1, 32)
                for d in range(0, len(raw), FINGERPRINT_BLOCK):
                    rows = raw[d:d + FINGERPRINT_BLOCK]
                    block = np.empty((len(rows), len(prefix) + 32), np.uint8)
                    block[:, :len(prefix)], block[:, len(prefix):] = prefix, rows
                    h.update(memoryview(block).cast("B"))  # the bytes of one update per file
        except OSError as exc:  # the scratch file of a large group: a full disk
            raise InputError(f"{scratch_folder or tempfile.gettempdir()}: cannot sort the "
                             f"files' digests ({exc.strerror})") from None
    return h.hexdigest()


FINGERPRINT_BLOCK = 8192


def in_file_order(records: Records, stored: int) -> bool:
    """Whether the cache's `stored` rows are the files' rows, file after file in the
    records' order, from the first (what a first ingest writes): then a dataset needs no
    map of its rows. Read a block of records at a time."""
    at = 0
    for a in range(0, len(records), READ_ROWS):
        start = records.block("start", a, a + READ_ROWS)
        count = records.block("count", a, a + READ_ROWS)
        ends = at + np.cumsum(count)
        if np.any((start != ends - count) & (count > 0)):
            return False
        at = int(ends[-1])
    return at == stored


def file_rows(records: Records, stored: int) -> np.ndarray | None:
    """Each file's row in the cache (a source of one row a file), or None when the cache's
    `stored` rows are the files' own in order (a first ingest): read a block at a time into
    the narrowest places, 4 bytes a file below 2**31 rows (the records' whole int64 column,
    kept by them, held 8)."""
    if in_file_order(records, stored):
        return None
    out = np.empty(len(records), places(stored))
    for a in range(0, len(records), READ_ROWS):
        out[a:a + READ_ROWS] = records.block("start", a, a + READ_ROWS)
    return out


def _group_starts(splits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Where each run of files with the same split and label starts, found a block of
    files at a time (whole differences of the columns held ~25 bytes a file)."""
    starts = [np.zeros(min(1, len(labels)), np.int64)]
    for a in range(1, len(labels), FINGERPRINT_BLOCK * 8):
        b = min(a + FINGERPRINT_BLOCK * 8, len(labels))
        change = (splits[a:b] != splits[a - 1:b - 1]) | (labels[a:b] != labels[a - 1:b - 1])
        starts.append(a + np.flatnonzero(change))
    return np.concatenate(starts)


def _first_bad(y: np.ndarray, bad) -> int | None:
    """The first row of `y` that `bad` (of a block of values) marks, a block at a time: no
    masks of every row (3 bytes a row at once)."""
    for a in range(0, len(y), READ_ROWS * 16):
        marked = np.flatnonzero(bad(y[a:a + READ_ROWS * 16]))
        if len(marked):
            return a + int(marked[0])
    return None


def _check_split(name: str, split_name: str, split: Split, num_classes: int,
                 checked: bool) -> None:
    if len(split) == 0:
        raise InputError(f"{name}: the {split_name} split is empty")
    if split.rows is None and len(split.x) != len(split.y):
        raise InputError(f"{name}: {split_name} split has {len(split.x)} samples "
                         f"but {len(split.y)} labels")
    if num_classes:
        row = _first_bad(split.y, lambda y: (y < 0) | (y >= num_classes))
        if row is not None:
            raise InputError(f"{name}: {split_name} label {split.y[row]} at row {row} is "
                             f"outside the {num_classes} classes")
    elif (row := _first_bad(split.y, lambda y: ~np.isfinite(y))) is not None:
        raise InputError(f"{name}: {split_name} target at row {row} is NaN or infinite")
    if split.x.dtype.kind == "f" and not checked:
        for start, (x, _) in zip(range(0, len(split), split.chunk_rows), split.chunks()):
            finite = np.isfinite(x).reshape(len(x), -1)
            if not finite.all():
                row = int(np.flatnonzero(~finite.all(1))[0])
                col = int(np.flatnonzero(~finite[row])[0])
                raise InputError(f"{name}: {split_name} row {start + row}, feature {col} is "
                                 "NaN or infinite")


def make_dataset(name: str, train: Split, test: Split | None, class_names: list[str],
                 input_spec: InputSpec, val: Split | None = None, task: str = "classification",
                 origin: str | Path | None = None, fp: str | None = None,
                 history: Path | None = None, checked: bool = False) -> FixedDataset:
    """Build a FixedDataset, checking labels and values, and stamp its fingerprint (`fp`
    when the source composed it from its files' digests). `origin` (the file or folder
    read) is what error messages name. `checked`: the source checked every value when it
    decoded it (into its row cache), so no pass over the rows repeats that."""
    check_class_names(class_names, origin or name)
    for split_name, split in (("train", train), ("val", val), ("test", test)):
        if split is not None:
            _check_split(str(origin or name), split_name, split, len(class_names), checked)
    fp = fp or fingerprint(class_names, [train, val, test])
    narrow = label_dtype(len(class_names))
    if class_names:  # the labels are in range: they fit the narrow type
        train, val, test = (s if s is None or s.y.dtype == narrow else replace(
            s, y=np.asarray(s.y).astype(narrow)) for s in (train, val, test))
    return FixedDataset(name, train, val, test, class_names, input_spec, task, fp, history)
