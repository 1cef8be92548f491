"""Lightning DDP on CPU: two processes (gloo), each on a disjoint half of every epoch."""

from __future__ import annotations

import json

import numpy as np
import torch

from export.card import read_card
from tests.conftest import ROOT, run_cli
from trainer.data.datamodule import FixedDataModule


def test_two_process_ddp_on_cpu(tmp_path):
    n = 200  # train split 140 rows -> 70 per rank -> 7 batches of 10, nothing dropped
    x = np.stack([np.arange(n), np.random.default_rng(0).normal(size=n)], 1).astype(np.float32)
    np.savez(tmp_path / "rows.npz", x=x, y=(x[:, 1] > 0).astype(np.int64))  # learnable
    record = json.dumps({"class_path": "tests.helpers.RecordRows",
                         "init_args": {"out_dir": str(tmp_path / "rows")}})
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "ddp.yaml"),
                   "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                   "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
                   "--data.source", "arrays", "--data.root", str(tmp_path / "rows.npz"),
                   "--data.batch_size", "10", "--model.arch", "mlp", "--model.width", "8",
                   "--model.lr", "0.05",
                   f"--trainer.callbacks+={record}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    dm = FixedDataModule(source="arrays", root=str(tmp_path / "rows.npz"))
    train_rows = set(dm.splits["train"].arrays()[0][:, 0].astype(int).tolist())
    ranks = [json.loads((tmp_path / "rows" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients all-reduced: one model
    seen = [r["rows"] for r in ranks]
    assert set(seen[0]) == set(seen[1]) == {"0", "1"}
    for epoch in ("0", "1"):
        a, b = set(seen[0][epoch]), set(seen[1][epoch])
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 70
        assert not a & b and a | b == train_rows
    assert seen[0]["0"] != seen[0]["1"]  # each epoch its own permutation

    run = tmp_path / "runs" / "ddp" / "version_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 14  # 7 steps per epoch on each rank, in lockstep
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert last["metrics"]["val/acc"] >= 0.8  # it learned the sign of the second feature
    summary = json.loads((run / "metrics.json").read_text())  # written once, by rank 0
    assert summary["epochs"] == 2 and summary["test"]["test/acc"] >= 0.8
    card = read_card(run / "model.onnx")  # exported once, by rank 0, from the best checkpoint
    assert card.training.checkpoint.startswith("best-")
    assert card.dataset.fingerprint == dm.dataset.fingerprint
