"""Let torch >= 2.6 load fairseq checkpoints with its default ``weights_only=True``.

fairseq stores its config as plain containers, except the legacy models' options, which stay an
``argparse.Namespace``; torch's safe unpickler refuses that one class. Rather than switch
``weights_only`` off (which would let a checkpoint run arbitrary code, and is what the usual
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 workaround does) we allow exactly that class.
"""
import argparse

import torch

FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoints():
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no allow-list and loads everything anyway
        add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)


def load_checkpoint(path):
    """Load a fairseq checkpoint onto the CPU with the safe unpickler."""
    allow_fairseq_checkpoints()
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)
