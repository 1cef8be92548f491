"""Every recipe in configs/ parses, and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.cli import build_cli

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
