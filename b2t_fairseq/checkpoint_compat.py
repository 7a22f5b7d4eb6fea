"""Let torch >= 2.6 load fairseq checkpoints with its default ``weights_only=True``.

fairseq stores its config as plain containers, except the legacy models' options, which stay an
``argparse.Namespace``, and numpy arrays or scalars where a run kept some (``--eval-bleu``); torch's safe
unpickler refuses those classes. Rather than switch
``weights_only`` off (which would let a checkpoint run arbitrary code, and is what the usual
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 workaround does) we allow exactly that class.
"""
import argparse

import torch



def _numpy_array_globals():
    """What pickle needs to rebuild a numpy array or scalar: fairseq stores some (``--eval-bleu`` keeps its BLEU
    counts and best score as numpy values). Rebuilding an ndarray of a dtype runs no other code."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [multiarray.multiarray._reconstruct, multiarray.multiarray.scalar, np.ndarray, np.dtype,
            *(getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", object)) if name.endswith("DType"))]


FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, *_numpy_array_globals()]


def allow_fairseq_checkpoints():
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no allow-list and loads everything anyway
        add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)


def load_checkpoint(path):
    """Load a fairseq checkpoint onto the CPU with the safe unpickler."""
    allow_fairseq_checkpoints()
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)
