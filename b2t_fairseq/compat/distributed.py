"""fairseq 0.12 with several workers: torchrun on machines without a GPU, and resuming under torch >= 2.6.

When torchrun (or torch.distributed.launch) starts the workers, fairseq reads WORLD_SIZE and RANK from the
environment and takes the worker's device as ``rank % torch.cuda.device_count()``: on a CPU-only node that is a
division by zero before training starts. A worker that has no GPU uses no device index, so the plugin lets fairseq
do everything else it does for torchrun and only answers device 0 there. On machines with GPUs fairseq's own code
runs unchanged. (The recipes' multi-node launch scripts use torchrun; tests run them as two CPU "nodes".)

When a run with several workers resumes, rank 0 reads the checkpoint and fairseq sends it to the other ranks
pickled (``broadcast_object``); the receivers unpickle it with torch's safe loader, which refuses the run's
config (an omegaconf ``DictConfig``), so every multi-worker resume died on rank 1. The receivers now allow the
few omegaconf classes (and the builtins they are rebuilt with) and fairseq's tensor placeholder for that one load; files on disk are still read
with the plain allow-list of compat/checkpoints.py.
"""
import collections
import os
import typing

import torch
from fairseq.distributed import utils as distributed_utils


def _omegaconf_globals():
    from omegaconf import AnyNode, DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata

    # fairseq sends the tensors separately and leaves a numbered placeholder in their place
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, dict, list, int,
            collections.defaultdict, distributed_utils._TensorPlaceholder]  # fmt: skip


def _receiving_configs(original):
    def _broadcast_object_slow(obj, src_rank, group, dist_device):
        with torch.serialization.safe_globals(_omegaconf_globals()):
            return original(obj, src_rank, group, dist_device)

    _broadcast_object_slow.__wrapped__ = original
    return _broadcast_object_slow


def install():
    if not hasattr(distributed_utils._broadcast_object_slow, "__wrapped__"):
        distributed_utils._broadcast_object_slow = _receiving_configs(distributed_utils._broadcast_object_slow)
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
