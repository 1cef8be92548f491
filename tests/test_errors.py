"""Bad input: a one-line error naming the problem, a non-zero exit, nothing written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, assert_one_line_error, cli_in_process, run_cli


def test_missing_config(tmp_path):
    proc = run_cli("fit", "--config", str(tmp_path / "nope.yaml"))
    assert_one_line_error(proc, "nope.yaml", "config file not found")



def test_a_config_that_is_not_text_is_named(tmp_path, capfd):
    """jsonargparse decodes a config file as UTF-8: a binary file was a UnicodeDecodeError
    traceback, whether given as --config or as a group's file (--model F)."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\x9d\x01model: [")
    digits = str(ROOT / "configs" / "digits.yaml")
    for argv in (["fit", "--config", str(bad)], ["fit", "--config", digits, "--model", str(bad)]):
        rc, err = cli_in_process(argv, tmp_path, capfd)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{bad}: not UTF-8 text (invalid start byte at byte 0); expected a YAML" in err
    assert not (tmp_path / "runs").exists()


def test_a_config_group_given_a_plain_value_is_one_line(tmp_path, capfd):
    """`trainer: 5` in a config file reached the option checks as 5: an AttributeError."""
    digits = str(ROOT / "configs" / "digits.yaml")
    for group in ("trainer", "model", "data", "export"):
        (tmp_path / "g.yaml").write_text(f"{group}: 5\n")
        for command in (["fit"], ["data", "--out", "o.npz"]) if group == "data" else (["fit"],):
            rc, err = cli_in_process([command[0], "--config", digits, "--config",
                                      str(tmp_path / "g.yaml"), *command[1:]], tmp_path, capfd)
            assert rc == 2 and len(err.strip().splitlines()) == 1, err
            assert f"{group}: 5 in a config; expected a mapping of its options" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o.npz").exists()


def test_trainer_data_names_a_bad_option_in_one_line(tmp_path, capfd):
    """`trainer data` parses with no subcommand: its option errors were an AttributeError
    (the CLI looked up the subcommand's parser) instead of the option's one line."""
    digits = str(ROOT / "configs" / "digits.yaml")
    for flag, value, needle in (("--data.batch_size", "x", "--data.batch_size (from the command "
                                                          "line): expected int"),
                                ("--data.batchsize", "3", "did you mean --data.batch_size")):
        rc, err = cli_in_process(["data", "--config", digits, flag, value, "--out", "o.npz"],
                                 tmp_path, capfd)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o.npz").exists()
    (tmp_path / "list.txt").write_text("mine\n")
    for out in ("list.txt", "o.npy", "o"):  # an .npz by another name (predict read x.txt
        rc, err = cli_in_process(["data", "--config", digits, "--out", out], tmp_path, capfd)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err  # as a list of images)
        assert f"--out {out}: expected a file name ending in .npz" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt"]
    assert (tmp_path / "list.txt").read_text() == "mine\n"


def test_lightnings_own_option_checks_are_one_line(tmp_path, capfd):
    """Lightning's Trainer refuses these itself (MisconfigurationException, ValueError,
    TypeError): they were tracebacks. The precision and layout choice is logged before them."""
    digits = str(ROOT / "configs" / "digits.yaml")
    for flag, value, needle in (("--trainer.max_steps", "-2", "`max_steps` must be a non-"),
                                ("--trainer.strategy", "nope", "invalid strategy name"),
                                ("--trainer.devices", "-2", "`devices` selected with")):
        rc, err = cli_in_process(["fit", "--config", digits, flag, value], tmp_path, capfd)
        assert rc == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("trainer fit: error: --trainer: ") and \
            needle in err.strip().splitlines()[-1], err
    assert not (tmp_path / "runs").exists()

def test_a_validation_interval_past_the_epochs_batches_is_one_line(tmp_path):
    """Lightning checks an integer val_check_interval against the epoch's batches only once
    the data is loaded (a ValueError traceback from the LR schedule's step count). In a
    fresh process: Lightning logs to the stderr it found at import, by then another test's."""
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.val_check_interval", "100000", cwd=tmp_path)
    assert_one_line_error(proc, "--trainer.val_check_interval: `val_check_interval` (100000) "
                                "must be less than or equal to the number of the training",
                          after_run_log=True)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("*.onnx"))


def test_missing_checkpoint_for_export(tmp_path):
    out = tmp_path / "m.onnx"
    proc = run_cli("export", "--ckpt", str(tmp_path / "gone.ckpt"), "--out", str(out))
    assert_one_line_error(proc, "gone.ckpt: not found (expected a checkpoint)")
    assert not out.exists()


def test_missing_checkpoint_for_validate(tmp_path):
    proc = run_cli("validate", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--ckpt_path", str(tmp_path / "gone.ckpt"))
    assert_one_line_error(proc, "gone.ckpt", "checkpoint not found")


def test_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"definitely not a checkpoint")
    proc = run_cli("export", "--ckpt", str(bogus), "--out", str(tmp_path / "m.onnx"))
    assert_one_line_error(proc, "bogus.ckpt", "not a loadable checkpoint")


def test_non_onnx_model_file(tmp_path, digits_test_npz):
    bogus = tmp_path / "model.onnx"
    bogus.write_text("this is not a protobuf")
    out = tmp_path / "preds.csv"
    proc = run_cli("predict", "--model", str(bogus), "--input", str(digits_test_npz),
                   "--output", str(out))
    assert_one_line_error(proc, "model.onnx", "not a loadable ONNX model")
    assert not out.exists()
    proc = run_cli("inspect", str(bogus))
    assert_one_line_error(proc, "model.onnx", "not an ONNX model")


def test_onnx_file_without_a_card(tmp_path, digits_test_npz):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    # IR 8, opset 18: loadable by every onnxruntime the project admits (1.18 and later)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8),
              str(path))
    proc = run_cli("predict", "--model", str(path), "--input", str(digits_test_npz),
                   "--output", str(tmp_path / "p.csv"))
    assert_one_line_error(proc, "plain.onnx", "no 'frozenfit.card' model card")


def test_input_of_the_wrong_shape(tmp_path, digits_run):
    bad = tmp_path / "flat.npz"
    np.savez(bad, x=np.zeros((5, 64), np.uint8))
    out = tmp_path / "preds.csv"
    proc = run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input", str(bad),
                   "--output", str(out))
    assert_one_line_error(proc, "flat.npz", "the model takes images and this input is a table "
                          "(5 rows x 64 numeric columns)", "shape (N, 1, 8, 8)", "got shape (5, 64)")
    assert not out.exists()


def test_input_of_the_wrong_dtype(tmp_path, digits_run):
    bad = tmp_path / "floats.npy"
    np.save(bad, np.zeros((5, 1, 8, 8), np.float64))
    proc = run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input", str(bad),
                   "--output", str(tmp_path / "p.csv"))
    assert_one_line_error(proc, "floats.npy", "uint8", "got dtype float64")


def test_failed_predict_keeps_the_previous_output(tmp_path, digits_run):
    out = tmp_path / "preds.csv"
    out.write_text("previous results\n")
    bad = tmp_path / "flat.npz"
    np.savez(bad, x=np.zeros((5, 64), np.uint8))
    run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input", str(bad),
            "--output", str(out))
    assert out.read_text() == "previous results\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unknown_data_source():
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--data.source", "imagenet")
    assert_one_line_error(proc, "data.source", "imagenet")


def test_unknown_command():
    assert_one_line_error(run_cli("train"), "unknown command 'train'")


def _one_line(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert ": error: " in lines[-1] and all(n in lines[-1] for n in needles), err


def test_option_typos_are_one_line_naming_where_and_the_closest_names(tmp_path, capfd):
    """A misspelt option, on the command line or in a YAML file, and a value of the wrong
    type: one line with exit 2, naming the source and suggesting the valid name; an
    abbreviated option is refused, never silently taken for the long one."""
    digits = str(ROOT / "configs" / "digits.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 3\n")
    for argv, needles in (
            (["--data.batchsize", "32"], ["unknown option --data.batchsize (on the command "
                                          "line)", "did you mean --data.batch_size"]),
            (["--trainer.max_epoch", "3"], ["--trainer.max_epoch",  # an abbreviation
                                            "did you mean --trainer.max_epochs"]),
            (["--config", str(typo)], [f"'trainer.max_epoch' (in {typo})",
                                       "did you mean --trainer.max_epochs"]),
            (["--trainer.max_epochs", "abc"], ["--trainer.max_epochs (from the command line): "
                                               "expected int", "got 'abc'"])):
        rc, err = cli_in_process(["fit", "--config", digits, *argv], tmp_path, capfd)
        assert len(err.strip().splitlines()) == 1, err
        _one_line(rc, err, *needles)


def test_training_options_out_of_range_are_one_line_before_any_data(tmp_path, capfd):
    digits = str(ROOT / "configs" / "digits.yaml")
    for flag, value, needle in (("--model.width", "0", "--model.width must be >= 1, got 0"),
                                ("--model.lr", "-0.1", "--model.lr must be > 0"),
                                # a traceback from torch's float32 lr, once the fit began
                                ("--model.lr", "1e308", "--model.lr must be > 0 and a finite"),
                                ("--model.weight_decay", ".inf", "must be >= 0, finite"),
                                # the parity gate refused them after the whole fit
                                ("--export.atol", ".nan", "--export.atol must be > 0"),
                                ("--export.atol", "-1", "--export.atol must be > 0"),
                                ("--export.opset", "5", "--export.opset 5: expected 13 to"),
                                ("--trainer.accumulate_grad_batches", "0",
                                 "--trainer.accumulate_grad_batches must be >= 1, got 0"),
                                ("--trainer.check_val_every_n_epoch", "0",
                                 "--trainer.check_val_every_n_epoch must be >= 1, got 0"),
                                ("--trainer.val_check_interval", "0",
                                 "--trainer.val_check_interval must be > 0"),
                                # a RuntimeError mid-fit: bf16 weights, float32 input
                                ("--trainer.precision", "bf16-true", "bf16-mixed or auto"),
                                ("--trainer.gradient_clip_val", ".nan",
                                 "--trainer.gradient_clip_val must be >= 0, got nan"),
                                # the fit trained nothing, then the gate refused the model
                                ("--trainer.max_epochs", "0", "--trainer.max_epochs must be >= 1"),
                                ("--trainer.limit_train_batches", "0",
                                 "--trainer.limit_train_batches must be > 0"),
                                # 100 processes of torch on a machine of a few cores
                                ("--trainer.devices", "100", "--trainer.devices must be at most"),
                                ("--model.dropout", "1", "--model.dropout must be in [0, 1)"),
                                ("--data.batch_size", "0", "--data.batch_size must be >= 1"),
                                ("--data.seed", "-1", "--data.seed must be in [0, 2**63), got -1"),
                                ("--data.seed", str(2 ** 70), "--data.seed must be in [0, 2**63)"),
                                ("--data.num_workers", "100000",
                                 "--data.num_workers must be 0 to "),
                                # a decoded cache of 30 GB an image: killed for memory
                                ("--data.image_size", "[100000, 100000]",
                                 ("--data.image_size must be two sizes >= 1 of at most "
                                  "64,000,000 pixels"))):
        rc, err = cli_in_process(["fit", "--config", digits, flag, value], tmp_path, capfd)
        assert len(err.strip().splitlines()) == 1, err
        _one_line(rc, err, needle)
    assert not (tmp_path / "runs").exists()
    for opset in ("7", "99"):
        rc, err = cli_in_process(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out",
                                  str(tmp_path / "m.onnx"), "--opset", opset], tmp_path, capfd)
        _one_line(rc, err, f"--opset {opset}: expected 13 to")
    for flag in ("--atol", "--max-accuracy-drop"):
        rc, err = cli_in_process(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out",
                                  str(tmp_path / "m.onnx"), flag, "nan"], tmp_path, capfd)
        _one_line(rc, err, f"{flag} must be")


def test_a_run_without_an_end_is_refused_by_a_schedule_that_needs_its_length(tmp_path, capfd):
    """max_epochs -1 (and max_steps -1) is Lightning's run until max_time or a stop: an
    OverflowError traceback where the onecycle schedule took its length."""
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.max_epochs", "-1", cwd=tmp_path)  # (it fails once the fit began)
    assert_one_line_error(proc, "--trainer.max_epochs -1: a run without an end has no length "
                                "for the onecycle schedule to plan", after_run_log=True)


@pytest.mark.slow  # a fit of a few seconds
def test_a_run_without_an_end_trains_until_its_time_with_a_constant_schedule(tmp_path):
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                   "--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:00:04",
                   "--model.schedule", "constant", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "runs").glob("*/version_0/model.onnx")), proc.stderr[-3000:]


def test_run_folders_inside_the_data_folder_are_refused_before_any_data(tmp_path, capfd):
    """`cd photos && trainer fit --data.root .` wrote runs/ into the image folder: the next
    fit took runs/ for a class and the run's plots for its images."""
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    rc, err = cli_in_process(["fit", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                              "--data.root", ".", "--data.cache_dir",
                              str(tmp_path.parent / f"{tmp_path.name}-cache")], tmp_path, capfd)
    _one_line(rc, err, "--data.root .: the run folders (runs) would be written inside it",
              "set --trainer.logger.save_dir outside it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat", "dog"]


def test_run_folders_a_recursive_glob_of_tables_would_read_are_refused(tmp_path, capfd):
    """`--data.root 'data/**/*.csv'` with the runs under data/: the next fit read the run's
    metrics.csv as a part of the table. A glob that does not recurse reads no run folder."""
    for part in ("p1", "p2", "."):
        (tmp_path / "data" / part).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / part / "t.csv").write_text(
            "a,target\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    fit = ["fit", "--config", str(ROOT / "configs" / "tabular.yaml"), "--trainer.logger.save_dir",
           "data/runs", "--trainer.max_epochs", "1", "--export.enabled", "false"]
    rc, err = cli_in_process([*fit, "--data.root", "data/**/*.csv"], tmp_path, capfd)
    _one_line(rc, err, "--data.root data/**/*.csv: the run folders (data/runs) would be "
              "written inside it", "set --trainer.logger.save_dir outside it")
    assert not (tmp_path / "data" / "runs").exists()
    rc, err = cli_in_process([*fit, "--data.root", "data/*.csv"], tmp_path, capfd)
    assert rc == 0, err[-2000:]
    assert (tmp_path / "data" / "runs" / "tabular" / "version_0" / "metrics.csv").is_file()


def test_a_fit_never_writes_into_an_existing_runs_folder(digits_run, tmp_path, capfd):
    """`--trainer.logger.version 0` of a run that exists wrote the new fit's checkpoints,
    config.yaml and model.onnx over that run's: the deployed model was lost."""
    import shutil

    shutil.copytree(digits_run, tmp_path / "runs" / "digits" / "version_0")
    before = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    for version in ("0", "version_0"):
        rc, err = cli_in_process(["fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                                  "--trainer.logger.version", version], tmp_path, capfd)
        _one_line(rc, err, f"--trainer.logger.version {version}: runs/digits/version_0 holds "
                  "a run already", "--ckpt_path runs/digits/version_0/checkpoints/last.ckpt")
    assert {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()} == before


def test_a_single_class_folder_cannot_train_a_classifier(tmp_path, capfd):
    from PIL import Image

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
    rc, err = cli_in_process(["fit", "--config", str(ROOT / "configs" / "image_folder.yaml"),
                              "--data.root", str(tmp_path / "imgs"), "--data.cache_dir",
                              str(tmp_path / "cache")], tmp_path, capfd)
    _one_line(rc, err, "imgs: one class (cat); a classifier needs at least two")


def test_a_crop_padding_as_large_as_the_images_is_one_line_before_training(tmp_path, capfd):
    """Digits are 8x8: a translation by 8 pixels can crop only padding (a fit of blank crops
    that only the export's baseline gate refused, after training), and a padding of 10**6
    pads each batch to 2,000,008 pixels a side."""
    for padding in ("8", "1000000"):
        rc, err = cli_in_process(["fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                                  "--data.crop_padding", padding], tmp_path, capfd)
        _one_line(rc, err, f"data.crop_padding {padding}: the images are 8x8")
    assert not (tmp_path / "runs").exists()  # refused before a run was made


def test_an_output_that_cannot_be_replaced_is_named_not_its_temporary_file(tmp_path):
    import pytest

    from export.atomic import atomic_path

    (tmp_path / "out.csv").mkdir()  # os.replace of a file over it fails (EISDIR)
    (tmp_path / "out.csv" / "keep").write_text("a user's file")
    with pytest.raises(OSError) as err:
        with atomic_path(tmp_path / "out.csv") as tmp:
            tmp.write_text("new")
    assert err.value.filename == str(tmp_path / "out.csv")
    assert (tmp_path / "out.csv" / "keep").read_text() == "a user's file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temporary file left


def test_debug_shows_the_cause_behind_the_one_line(tmp_path):
    """`raise ... from None` keeps the user's view to one line; --debug and FROZENFIT_DEBUG=1
    show the traceback with the hidden cause, and the same line last."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    args = ("inspect", str(bad))
    plain = run_cli(*args)
    assert_one_line_error(plain, "bad.onnx", "not an ONNX model")
    for proc in (run_cli(*args, "--debug"), run_cli(*args, env={"FROZENFIT_DEBUG": "1"})):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1] == plain.stderr.strip()
        assert "Traceback" in proc.stderr and "During handling" in proc.stderr, proc.stderr


def test_debug_logs_what_the_deploy_side_decided(digits_run, digits_test_npz, tmp_path):
    proc = run_cli("predict", "--model", str(digits_run / "model.onnx"), "--input",
                   str(digits_test_npz), "--output", str(tmp_path / "p.csv"), "--debug")
    assert proc.returncode == 0, proc.stderr
    assert "export.batch: " in proc.stderr and " on CPUExecutionProvider, threads " in proc.stderr
    assert "export.batch: part 0: 269 rows, 0 skipped" in proc.stderr


def test_the_process_exit_skips_only_the_teardown(tmp_path):
    """`trainer` ends a torch process without Python's teardown, but still waits for
    non-daemon threads, runs the atexit handlers and flushes what was printed."""
    marker, late = tmp_path / "atexit", tmp_path / "thread"
    code = (
        "import atexit, threading, time, sys, torch\n"
        "from trainer.cli import exit_process\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        f"threading.Thread(target=lambda: (time.sleep(0.3), open({str(late)!r}, 'w').write('done'))).start()\n"
        "print('buffered', end=''); sys.stderr.write('err')\n"
        "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "buffered" and proc.stderr == "err"
    assert marker.read_text() == "ran" and late.read_text() == "done"


@pytest.mark.parametrize("target, needle", [
    ([f"id{i}" for i in range(300)], ("300 rows in 300 classes (data.val_fraction/"
                                      "test_fraction): ~1.0 rows a class, and each class gives "
                                      "its fraction of them; is the target a class?")),
    ([0.5, 1.5, 2.5], "the dataset has 3 rows (data.val_fraction/test_fraction)"),
])
def test_an_empty_drawn_split_says_why(tmp_path, target, needle):
    """A target column of identifiers was "the val split is empty; the dataset has 300 rows":
    the stratified split takes each class's fraction, rounded, of ~1 row."""
    from export.errors import InputError
    from trainer.data.datamodule import FixedDataModule

    rows = "".join(f"{i},{t}\n" for i, t in enumerate(target))
    (tmp_path / "t.csv").write_text("a,target\n" + rows)
    data = FixedDataModule(source="tabular", root=str(tmp_path / "t.csv"),
                           cache_dir=str(tmp_path / "c"))
    with pytest.raises(InputError, match=r"t: the val split is empty; ") as err:
        _ = data.splits
    assert needle in str(err.value) and "\n" not in str(err.value)
