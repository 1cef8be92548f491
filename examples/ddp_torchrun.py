"""Multi-GPU from a training script: launched by torchrun, trained with DDP, exported once.

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py [OUT_DIR]          # 2 GPUs (NCCL)
    torchrun --nproc_per_node 2 examples/ddp_torchrun.py OUT_DIR --cpu      # 2 CPU processes (gloo)

Lightning reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE): each process
trains on its own disjoint share of every epoch, gradients are all-reduced, and ExportOnnx
exports on rank 0 only, from the checkpoint the run saved. Across nodes, the same command
with torchrun's --nnodes/--node_rank/--rdzv_endpoint, and num_nodes below.
"""

import os
import sys

import lightning as L
import torch

from trainer.callbacks import ExportOnnx
from trainer.data.datamodule import FixedDataModule
from trainer.hardware import choose
from trainer.module import ClassifierModule

args = [a for a in sys.argv[1:] if a != "--cpu"]
out = args[0] if args else "ddp_torchrun_out"
accelerator = "gpu" if torch.cuda.is_available() and "--cpu" not in sys.argv else "cpu"
L.seed_everything(0)
data = FixedDataModule(source="digits", batch_size=32)
model = ClassifierModule(arch="mlp", width=64)
export = ExportOnnx()
trainer = L.Trainer(
    accelerator=accelerator, strategy="ddp",
    devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    num_nodes=int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    precision=choose(accelerator).precision,  # the product's choice for this hardware
    # FixedDataModule gives each rank its own disjoint share of every epoch itself; a
    # DistributedSampler on top would split it again.
    use_distributed_sampler=False,
    max_epochs=4, default_root_dir=out, callbacks=[export], enable_progress_bar=False,
    logger=False)
trainer.fit(model, data)
if trainer.is_global_zero:
    print(f"rank 0 of {trainer.world_size}: exported {export.path}")
if torch.distributed.is_initialized():
    # Lightning keeps the process group for a later fit; left to the interpreter's exit,
    # gloo's threads can abort a rank ("terminate called without an active exception")
    torch.distributed.destroy_process_group()
