"""Every recipe in configs/ parses, and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.lightning_cli import build_cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(c.name == "digits.yaml" for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config):
    cli = build_cli(["--config", str(config)], run=False, instantiate=False)
    assert cli.config["trainer"]["max_epochs"] >= 1
    assert cli.config["data"]["source"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_starts_with_its_command(config):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# trainer fit --config configs/" + config.name), first


def test_dotted_override_reaches_the_config():
    cli = build_cli(["--config", str(CONFIGS[0]), "--trainer.max_epochs", "3",
                     "--model.lr", "0.01"], run=False, instantiate=False)
    assert cli.config["trainer"]["max_epochs"] == 3
    assert cli.config["model"]["lr"] == 0.01


def _recipe_data(name: str, tmp_path: Path) -> list[str]:
    """Data overrides that let each CPU recipe run here; None where it cannot."""
    from tests.conftest import MNIST

    if name in ("mnist.yaml", "mnist_speedrun.yaml"):
        return ["--data.root", str(MNIST)] if MNIST.is_dir() else None
    if name == "image_folder.yaml":
        from PIL import Image

        for cls, value in (("cat", 60), ("dog", 190)):
            for i in range(12):
                (tmp_path / "images" / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20 + i, 24), (value, i * 9, 255 - value)).save(
                    tmp_path / "images" / cls / f"{i}.png")
        return ["--data.root", str(tmp_path / "images"), "--data.cache_dir", str(tmp_path / "c")]
    if name == "tabular.yaml":
        rows = ["a,b,target"] + [f"{i % 7},{i % 5},{'yes' if i % 3 else 'no'}" for i in range(90)]
        (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
        return ["--data.root", str(tmp_path / "t.csv")]
    return []


CPU_RECIPES = [c for c in CONFIGS if c.name not in ("cifar10.yaml", "ddp.yaml")]  # GPU / test_ddp


@pytest.mark.parametrize("config", [  # the full MNIST recipe takes ~30 s: CI runs it (--slow)
    pytest.param(c, marks=pytest.mark.slow) if c.name == "mnist.yaml" else c for c in CPU_RECIPES
], ids=lambda p: p.name)
def test_one_tiny_epoch_of_each_cpu_recipe(config, tmp_path):
    from tests.conftest import run_cli

    data = _recipe_data(config.name, tmp_path)
    if data is None:
        pytest.skip(f"{config.name} needs the real MNIST beside the checkout")
    proc = run_cli("fit", "--config", str(config), *data, "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                   "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                   "--export.allow_trivial", "true",  # two batches need not learn anything
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs").glob("*/version_0"))
    assert (run / "model.onnx").is_file() and (run / "metrics.json").is_file()
