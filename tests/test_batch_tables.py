"""Tables through the batch job: pass-through columns, bad columns and values, and a
million-row CSV streamed in chunks with bounded memory."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from export.errors import InputError
from tests.conftest import assert_one_line_error, run_cli
from trainer.data.datamodule import FixedDataModule
from trainer.freeze import export_checkpoint, held_out
from trainer.module import ClassifierModule


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    label = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "up", "down")
    return pa.table({"key": [f"k{i}" for i in range(n)], "a": x[:, 0], "b": x[:, 1],
                     "c": x[:, 2], "label": label})


def _table_model(work):
    """A small MLP classifier fit on a 3-feature table, exported to work/m.onnx."""
    train = _table(2000, 0).drop(["key"])
    pacsv.write_csv(train, work / "train.csv")
    dm = FixedDataModule(source="tabular", root=str(work / "train.csv"), target="label")
    model = ClassifierModule(arch="mlp", width=16, lr=0.01, data_info=dm.info)
    trainer = L.Trainer(max_epochs=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(work / "m.ckpt")
    export_checkpoint(work / "m.ckpt", work / "m.onnx", data=held_out(dm))
    return work / "m.onnx"


@pytest.fixture(scope="module")
def table_model(tmp_path_factory):
    return _table_model(tmp_path_factory.mktemp("table"))


def test_million_row_csv_streams_with_bounded_memory(table_model, tmp_path):
    pacsv.write_csv(_table(1_000_000, 1), tmp_path / "big.csv")
    out = tmp_path / "p.csv"
    proc = run_cli("predict", "--model", str(table_model), "--input", str(tmp_path / "big.csv"),
                   "--output", str(out), "--chunk-rows", "100000", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["rows"] == 1_000_000 and summary["accuracy"] > 0.95
    assert summary["peak_memory_mb"] < 450, summary["peak_memory_mb"]  # ~290 MB measured
    with open(out) as f:
        header = f.readline().strip().split(",")
        count = sum(1 for _ in f)
    assert header == ["id", "key", "label", "confidence", "true_label"] and count == 1_000_000


@pytest.mark.parametrize("frame,needle", [
    (lambda t: t.rename_columns(["key", "A", "b", "c", "label"]), "missing feature column 'a'"),
    (lambda t: t.set_column(2, "b", pa.array([1.0, float("nan")] * 5)), "row 1, column 'b'"),
    (lambda t: t.set_column(3, "c", pa.array(["x"] * 10)), "feature column 'c' is string"),
])
def test_bad_tables(table_model, tmp_path, frame, needle):
    pacsv.write_csv(frame(_table(10, 2)), tmp_path / "in.csv")
    out = tmp_path / "p.csv"
    proc = run_cli("predict", "--model", str(table_model), "--input", str(tmp_path / "in.csv"),
                   "--output", str(out))
    assert_one_line_error(proc, "in.csv", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def _awkward(n: int) -> pa.Table:
    """Features plus pass-through columns a hand-written writer gets wrong: a name with a
    comma and quotes, text with commas, quotes, newlines and non-ASCII, dates, decimals, and
    a column that is all null in the first chunk."""
    import datetime
    import decimal

    base = _table(n, 3)
    text = [f'row {i}, "quoted"\nline two; ünïcødé ✓' if i % 3 else None for i in range(n)]
    later = [None] * 50 + [f"v{i}" for i in range(50, n)]
    return base.append_column('name, with "quotes"', pa.array(text)) \
        .append_column("when", pa.array([datetime.date(2024, 1, 1) + datetime.timedelta(days=i)
                                         for i in range(n)])) \
        .append_column("amount", pa.array([decimal.Decimal(f"{i}.10") for i in range(n)],
                                          pa.decimal128(12, 2))) \
        .append_column("later", pa.array(later, pa.string()))


@pytest.mark.parametrize("fmt", [".csv", ".jsonl", ".parquet"])
def test_awkward_pass_through_columns_survive_every_format(table_model, tmp_path, fmt):
    import csv

    import pyarrow.parquet as pq

    table = _awkward(130)
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / f"p{fmt}"
    proc = run_cli("predict", "--model", str(table_model), "--input", str(tmp_path / "in.parquet"),
                   "--output", str(out), "--chunk-rows", "50", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    want = table.to_pylist()
    if fmt == ".parquet":
        rows = pq.read_table(out).to_pylist()
        got = [{k: r[k] for k in ("key", 'name, with "quotes"', "when", "amount", "later")}
               for r in rows]
        assert got == [{k: w[k] for k in got[0]} for w in want]
        return
    if fmt == ".csv":
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        render = lambda v: "" if v is None else str(v)  # noqa: E731
    else:
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        render = lambda v: v.isoformat() if hasattr(v, "isoformat") else \
            (str(v) if v.__class__.__name__ == "Decimal" else v)  # noqa: E731
    assert len(rows) == len(want)
    assert list(rows[0])[:2] == ["id", "key"] and 'name, with "quotes"' in rows[0]
    for r, w in zip(rows, want):
        for k in ("key", 'name, with "quotes"', "when", "amount", "later"):
            assert r[k] == render(w[k]), (k, r[k], w[k])


@pytest.mark.parametrize("fmt", [".csv", pytest.param(".jsonl", marks=pytest.mark.slow),
                                 pytest.param(".parquet", marks=pytest.mark.slow)])
def test_a_huge_pass_through_cell_is_predicted_and_kept(table_model, tmp_path, fmt):
    """A 5 MB cell (past the csv module's 128 KB field limit) and a 10 MB one (past the
    first 4 MiB read block): predicted and passed through whole in every format."""
    import csv

    table = _table(6, 5).drop(["label"])
    docs = ["short", "x" * (5 << 20), "y" * (10 << 20), "", "z", "end"]
    pacsv.write_csv(table.append_column("doc", pa.array(docs)), tmp_path / "in.csv")
    out = tmp_path / f"p{fmt}"
    proc = run_cli("predict", "--model", str(table_model), "--input", str(tmp_path / "in.csv"),
                   "--output", str(out), "--chunk-rows", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    if fmt == ".csv":
        csv.field_size_limit(2**31 - 1)
        with open(out, newline="", encoding="utf-8") as f:
            got = [r["doc"] for r in csv.DictReader(f)]
    elif fmt == ".jsonl":
        got = [json.loads(line)["doc"] for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(out).column("doc").to_pylist()
    assert [len(d or "") for d in got] == [len(d) for d in docs]
    assert got[1] == docs[1] and got[2] == docs[2]


def test_a_row_past_the_largest_read_block_is_one_line(table_model, tmp_path, monkeypatch):
    """The blocks made small (in-process) so that a 100 KB row is past the largest."""
    from export import tables
    from export.batch import JobOptions, run_batch

    monkeypatch.setattr(tables, "CSV_BLOCKS", (16 << 10, 32 << 10))
    table = _table(3, 5).drop(["label"])
    docs = ["a", "b" * (20 << 10), "c" * (100 << 10)]  # the second needs the 32 KiB block
    pacsv.write_csv(table.append_column("doc", pa.array(docs)), tmp_path / "in.csv")
    with pytest.raises(InputError, match=r"in.csv: a row near chunk \d+ is longer than 0 MiB"):
        run_batch(table_model, tmp_path / "in.csv", tmp_path / "p.csv",
                  JobOptions(progress=False, chunk_rows=1))
    assert not (tmp_path / "p.csv").exists()


def test_the_python_api_refuses_an_output_that_is_an_input(table_model, tmp_path):
    """The engine checks its outputs itself, so a script calling run_batch is as safe as
    the command: no input is overwritten, the report files included."""
    from export.batch import JobOptions, run_batch

    pacsv.write_csv(_table(3, 5), tmp_path / "in.csv")
    before = (tmp_path / "in.csv").read_bytes()
    with pytest.raises(InputError, match=r"--output .*in\.csv: is the same file as --input"):
        run_batch(table_model, tmp_path / "in.csv", tmp_path / "in.csv", JobOptions(progress=False))
    (tmp_path / "in.summary.json").symlink_to(tmp_path / "in.csv")  # a report onto the input
    with pytest.raises(InputError, match=r"in\.summary\.json: is the same file as --input"):
        run_batch(table_model, tmp_path / "in.csv", tmp_path / "in.parquet",
                  JobOptions(progress=False))
    assert (tmp_path / "in.csv").read_bytes() == before and not (tmp_path / "in.parquet").exists()


def _partitioned(folder, fmt: str, sizes=(700, 0, 1301, 999)) -> list[pa.Table]:
    """Tables as they are kept: a hive-partitioned folder of files of different sizes (one
    empty), with Spark's marker files beside them."""
    import pyarrow.parquet as pq

    tables = []
    for i, n in enumerate(sizes):
        part = folder / f"day=2026-01-0{1 + i // 2}" / f"part-{i}.{fmt}"
        part.parent.mkdir(parents=True, exist_ok=True)
        tables.append(_table(max(n, 1), 10 + i).slice(0, n))  # an empty one keeps its types
        if fmt == "csv":
            pacsv.write_csv(tables[-1], part)
        else:
            pq.write_table(tables[-1], part)
    (folder / "_SUCCESS").write_text("")
    return tables


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_folder_of_tables_is_predicted_as_one_table_and_resumes(table_model, tmp_path, fmt,
                                                                  monkeypatch):
    """The local engine reads a (hive-partitioned) folder of tables as one table in chunks
    that span files; each row's id is its file and row, the partition a column (a glob of
    the same tables gives the same rows); a job
    stopped after some parts resumes from them (skipping whole files) to the same output;
    a file changed since makes --resume refuse, naming it. No input is touched."""
    import pyarrow.parquet as pq

    from export import batch
    from export.batch import JobOptions, run_batch

    folder = tmp_path / "tables"
    tables = _partitioned(folder, fmt)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    summary = run_batch(table_model, folder, tmp_path / "p.parquet",
                        JobOptions(progress=False, chunk_rows=500))
    got = pq.read_table(tmp_path / "p.parquet").to_pylist()
    want = [(f"day=2026-01-0{1 + i // 2}/part-{i}.{fmt}:{r}", k)
            for i, t in enumerate(tables) for r, k in enumerate(t.column("key").to_pylist())]
    assert [(g["id"], g["key"]) for g in got] == want and summary.rows == len(want) == 3000
    assert summary.metrics["accuracy"] > 0.9
    assert [g["day"] for g in got] == ["2026-01-01"] * 700 + ["2026-01-02"] * 2300
    glob = run_batch(table_model, folder / "*" / f"*.{fmt}", tmp_path / "g.parquet",
                     JobOptions(progress=False, chunk_rows=700))  # the same tables by a glob
    assert glob.rows == 3000 and pq.read_table(tmp_path / "g.parquet").to_pylist() == got

    write_part, written = batch.write_part, []

    def stop_after_three(path, columns):
        if len(written) == 3:  # parts 0-2: the third holds rows of the third and fourth files
            raise KeyboardInterrupt
        written.append(path)
        write_part(path, columns)

    monkeypatch.setattr(batch, "write_part", stop_after_three)
    out = tmp_path / "q.parquet"
    with pytest.raises(KeyboardInterrupt):
        run_batch(table_model, folder, out, JobOptions(progress=False, chunk_rows=500))
    monkeypatch.setattr(batch, "write_part", write_part)
    resumed = run_batch(table_model, folder, out,
                        JobOptions(progress=False, chunk_rows=500, resume=True))
    assert resumed.resumed_after_rows == 1500 and pq.read_table(out).to_pylist() == got
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before

    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(batch, "write_part", stop_after_three)
        run_batch(table_model, folder, tmp_path / "r.parquet",
                  JobOptions(progress=False, chunk_rows=500))
    changed = folder / "day=2026-01-02" / f"part-3.{fmt}"
    changed.write_bytes(changed.read_bytes() + b"\n" if fmt == "csv" else
                        (tmp_path / "q.parquet").read_bytes())
    with pytest.raises(InputError, match=r"cannot --resume: the input changed .*: 0 tables "
                                         r"added, 0 removed, 1 modified \(e.g. day=2026-01-02/"
                                         rf"part-3.{fmt}\)"):
        run_batch(table_model, folder, tmp_path / "r.parquet",
                  JobOptions(progress=False, chunk_rows=500, resume=True))


@pytest.mark.parametrize("bad,needle", [
    ("extra", "part-2.parquet: has column 'extra', which the first file lacks"),
    ("retyped", "part-2.parquet: column 'a' is string, expected float as in the first file"),
    ("no label", "part-2.parquet: missing column 'label'; expected the columns"),
    ("csv extra", "part-2.csv: has column 'extra', which the first file lacks"),
    ("csv renamed", "part-2.csv: has column 'bb', which the first file lacks"),
    ("csv no b", "part-2.csv: missing column 'b'; expected the columns"),
    ("csv retyped", "part-2.csv: cannot read table near row 0"),
    ("cut short", "part-2.parquet: cannot read table"),
    ("not a table", "notes.txt: expected .csv or .parquet files (--input)"),
    ("mixed", "mixes CSV and Parquet files; expected one format (--input)"),
    ("no match", "*.csv: the pattern matches no files (--input)"),
])
def test_a_bad_file_in_a_folder_of_tables_is_named(table_model, tmp_path, bad, needle):
    """One line naming the file and what was expected, exit 2, no output, nothing touched."""
    import pyarrow.parquet as pq

    folder = tmp_path / "tables"
    folder.mkdir()
    csv = bad.startswith("csv")  # a CSV file's columns are checked by name (their types
    write, suffix = (pacsv.write_csv, "csv") if csv else (pq.write_table, "parquet")
    for i in range(2):  # are inferred from its own rows): a file that differs is named
        write(_table(50, i), folder / f"part-{i}.{suffix}")
    t = _table(50, 2)
    if csv:
        t = {"csv extra": t.append_column("extra", pa.array([1] * 50)),
             "csv renamed": t.rename_columns(["key", "a", "bb", "c", "label"]),
             "csv no b": t.drop(["b"]),
             "csv retyped": t.set_column(1, "a", pa.array(["x"] * 50))}[bad]
        pacsv.write_csv(t, folder / "part-2.csv")
    elif bad == "no label":
        pq.write_table(t.drop(["label"]), folder / "part-2.parquet")
    elif bad == "extra":
        pq.write_table(t.append_column("extra", pa.array([1] * 50)), folder / "part-2.parquet")
    elif bad == "retyped":
        pq.write_table(t.set_column(1, "a", pa.array(["x"] * 50)), folder / "part-2.parquet")
    elif bad == "cut short":
        (folder / "part-2.parquet").write_bytes((folder / "part-1.parquet").read_bytes()[:300])
    elif bad in ("not a table", "no match"):
        (folder / "notes.txt").write_text("read me")
    else:
        pacsv.write_csv(t, folder / "part-2.csv")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    source = f"{folder}/*.csv" if bad == "no match" else str(folder)
    proc = run_cli("predict", "--model", str(table_model), "--input", source,
                   "--output", str(tmp_path / "p.csv"))
    assert_one_line_error(proc, needle)
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables"]


def test_a_header_naming_a_column_twice_is_named(table_model, tmp_path):
    """A table whose header names a column twice is one line saying which: a file alone (a
    CSV or a Parquet file) and a folder's first file, where pyarrow's own reason came cut
    short behind the paths it quotes ("Could not read schema from '...'")."""
    import pyarrow.parquet as pq

    (tmp_path / "f").mkdir()
    for path in (tmp_path / "one.csv", tmp_path / "f" / "part-0.csv"):
        path.write_text("key,a,b,b,label\nk0,1,2,3,up\n")
    pq.write_table(pa.Table.from_arrays([pa.array([1.0])] * 2, names=["a", "a"]),
                   tmp_path / "one.parquet")
    for source, needle in (
            ("one.csv", "one.csv: column name 'b' appears more than once in the header"),
            ("one.parquet", "one.parquet: column name 'a' appears more than once in the header"),
            ("f", "part-0.csv: cannot read table (CSV file contained multiple columns named b)")):
        proc = run_cli("predict", "--model", str(table_model), "--input", str(tmp_path / source),
                       "--output", str(tmp_path / "p.csv"))
        assert_one_line_error(proc, needle)
        assert not (tmp_path / "p.csv").exists()


def test_a_csv_folder_whose_first_file_has_no_rows_is_read(table_model, tmp_path):
    """A CSV file of a header and no rows (an empty partition) types its columns null; first
    in the folder, every value of the others failed to convert ("conversion error to null").
    Each column is typed by the next file that holds values in it."""
    import pyarrow.parquet as pq

    from export.batch import JobOptions, run_batch

    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "part-0.csv").write_text("key,a,b,c,label\n")
    pacsv.write_csv(_table(60, 1), folder / "part-1.csv")
    pacsv.write_csv(_table(40, 2), folder / "part-2.csv")
    run_batch(table_model, folder, tmp_path / "p.parquet", JobOptions(progress=False))
    run_batch(table_model, folder / "part-1.csv", tmp_path / "one.parquet",
              JobOptions(progress=False))
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert len(rows) == 100 and rows[0]["id"] == "part-1.csv:0"
    one = pq.read_table(tmp_path / "one.parquet").to_pylist()
    assert [r["label"] for r in rows[:60]] == [r["label"] for r in one]
    # a column left untyped by the next file too, and one the file after types otherwise
    (folder / "part-1.csv").write_text("key,a,b,c,label\nk0,1,,3,up\n")
    (folder / "part-2.csv").write_text("key,a,b,c,label\nk1,x,2,3,up\n")
    with pytest.raises(InputError, match=r"part-2.csv: cannot read table \(Unable to merge: "
                                         r"Field a has incompatible types: int64 vs string"):
        run_batch(table_model, folder, tmp_path / "q.parquet", JobOptions(progress=False))
    assert not (tmp_path / "q.parquet").exists()
    # whole numbers first, decimals after: why the column is integers, for predict and fit
    (folder / "part-1.csv").write_text("key,a,b,c,label\nk0,1,2,3,up\n")
    (folder / "part-2.csv").write_text("key,a,b,c,label\nk1,1.5,2,3,up\n")
    hint = (r"part-2.csv: cannot read table near row 0 \(.*CSV conversion.*\); a CSV "
            r"column's type is what its first rows hold \(the first file's")
    with pytest.raises(InputError, match=hint):
        run_batch(table_model, folder, tmp_path / "q.parquet", JobOptions(progress=False))
    from trainer.data.dataset import SourceOptions
    from trainer.data.sources import load_source

    with pytest.raises(InputError, match=hint):
        load_source("tabular", str(folder), SourceOptions(target="label", cache_dir=str(
            tmp_path / "cache"), exclude_columns=("key",)))


def test_a_parquet_folder_with_empty_files_of_untyped_columns_is_read(table_model, tmp_path):
    """A Parquet file written from an empty frame types its string columns null (pyarrow
    infers null from no values). First in the folder it was the folder's schema, and every
    other file was refused ("column 'label' is string, expected null"); elsewhere it was
    refused itself ("is null, expected string"). Now the untyped columns are typed by the
    next files, and an untyped column of a file reads as the folder's type."""
    import pyarrow.parquet as pq

    from export.batch import JobOptions, run_batch
    from trainer.data.dataset import SourceOptions
    from trainer.data.sources import load_source

    empty = pa.table({"key": [], **{c: pa.array([], pa.float32()) for c in "abc"}, "label": []})
    assert str(empty.schema.field("label").type) == "null"
    folder = tmp_path / "t"
    folder.mkdir()
    for name, table in (("part-0", empty), ("part-1", _table(60, 1)), ("part-2", empty),
                        ("part-3", _table(40, 2))):
        pq.write_table(table, folder / f"{name}.parquet")
    run_batch(table_model, folder, tmp_path / "p.parquet", JobOptions(progress=False))
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["id"] for r in rows] == [f"part-{f}.parquet:{i}" for f, n in ((1, 60), (3, 40))
                                       for i in range(n)]
    assert {type(r["label"]) for r in rows} == {str}
    ds = load_source("tabular", str(folder), SourceOptions(
        target="label", cache_dir=str(tmp_path / "c"), exclude_columns=("key",)))
    assert len(ds.train) == 100 and ds.class_names == ["down", "up"]


@pytest.mark.parametrize("seed", range(6))
def test_seeded_folders_read_from_any_chunk_give_the_rest_of_the_rows(tmp_path, seed):
    """A resumed job starts at a chunk: over folders drawn from a seed (1-6 files of 0-24
    rows, Parquet or CSV, hive-partitioned or not, given as the folder or a glob, chunks of
    1-64 rows), reading from chunk k gives exactly the whole read's rows from k * rows on,
    and every chunk but the last holds `rows`."""
    import random

    import pyarrow.parquet as pq

    from export.card import InputSpec
    from export.readers import iter_chunks

    rng = random.Random(seed)
    fmt, hive, rows = rng.choice(["parquet", "csv"]), rng.random() < 0.5, rng.choice([1, 3, 8, 64])
    for i in range(rng.randrange(1, 7)):
        n = rng.randrange(0 if fmt == "parquet" else 1, 25)
        (tmp_path / (f"k={i % 2}" if hive else "")).mkdir(exist_ok=True)
        (pq.write_table if fmt == "parquet" else pacsv.write_csv)(
            _table(n, i), tmp_path / (f"k={i % 2}" if hive else "") / f"p{i}.{fmt}")
    source = str(tmp_path if rng.random() < 0.5 else tmp_path / "**" / f"*.{fmt}")
    spec = InputSpec(name="x", kind="tabular", dtype="float32", shape=(3,),
                     value_range=(-9.0, 9.0), columns=("a", "b", "c"))

    def read(k: int) -> list[tuple[str, list[float]]]:
        return [(i, x.tolist()) for c in iter_chunks(source, spec, ["down", "up"], rows=rows,
                                                     target="label", start_chunk=k)
                for i, x in zip(c.ids, c.x)]

    chunks = list(iter_chunks(source, spec, ["down", "up"], rows=rows, target="label"))
    assert all(len(c.ids) == rows for c in chunks[:-1])
    whole = read(0)
    for k in range(len(chunks) + 1):
        assert read(k) == whole[k * rows:], k


def test_an_output_among_the_input_tables_is_refused(table_model, tmp_path):
    """An output (or its reports) where the folder or glob of tables would read it as a
    table next time is refused in one line before any work; beside them it is written."""
    import pyarrow.parquet as pq

    folder = tmp_path / "tables"
    folder.mkdir()
    pq.write_table(_table(40, 1), folder / "part-0.parquet")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for source, out in ((folder, folder / "preds.csv"), (folder, folder / "sub" / "p.jsonl"),
                        (f"{folder}/*.parquet", folder / "preds.parquet")):
        proc = run_cli("predict", "--model", str(table_model), "--input", str(source),
                       "--output", str(out))
        assert_one_line_error(proc, f"--output {out}: lies among the tables of --input "
                                    f"{source}, which would read it as one of them")
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    proc = run_cli("predict", "--model", str(table_model), "--input", f"{folder}/*.parquet",
                   "--output", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.csv").read_text().splitlines()[1].startswith("part-0.parquet:0,")


def test_which_folders_are_tables(tmp_path):
    """A folder is a table when it holds tables and no image (linked folders are not
    walked, as the table reader's rglob does not: a link back above is no loop); images
    anywhere in it make it an image folder, as before."""
    import pyarrow.parquet as pq

    from export.tables import holds_tables

    (tmp_path / "t" / "day=1").mkdir(parents=True)
    pq.write_table(_table(3, 0), tmp_path / "t" / "day=1" / "part-0.parquet")
    (tmp_path / "t" / "day=1" / "back").symlink_to(tmp_path / "t")
    (tmp_path / "t" / "_SUCCESS").write_text("")
    assert holds_tables(tmp_path / "t")
    (tmp_path / "t" / "day=1" / "cat.png").write_bytes(b"")
    assert not holds_tables(tmp_path / "t")
    (tmp_path / "empty").mkdir()
    assert not holds_tables(tmp_path / "empty")
