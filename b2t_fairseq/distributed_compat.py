"""fairseq 0.12 under ``torchrun`` on machines without a GPU.

When torchrun (or torch.distributed.launch) starts the workers, fairseq reads WORLD_SIZE and RANK from the
environment and takes the worker's device as ``rank % torch.cuda.device_count()``: on a CPU-only node that is a
division by zero before training starts. A worker that has no GPU uses no device index, so the plugin lets fairseq
do everything else it does for torchrun and only answers device 0 there. On machines with GPUs fairseq's own code
runs unchanged. (The recipes' multi-node launch scripts use torchrun; tests run them as two CPU "nodes".)
"""
import os

import torch
from fairseq.distributed import utils as distributed_utils


def install():
    original = distributed_utils._infer_torch_distributed_launch_init
    if getattr(original, "_b2t_cpu_safe", False):
        return

    def infer_torch_distributed_launch_init(cfg):
        if torch.cuda.device_count() > 0:
            return original(cfg)
        # what fairseq sets for a torchrun worker, with device 0 (never used by a CPU worker) for rank % 0
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = 0
        cfg.distributed_no_spawn = True

    infer_torch_distributed_launch_init._b2t_cpu_safe = True
    distributed_utils._infer_torch_distributed_launch_init = infer_torch_distributed_launch_init
