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


# The authors' fork (takase/b2t_connection, fairseq 0.9) saves keys that fairseq 0.12 names otherwise or no longer has
# (tests/test_cli.py lists every key it saves, with the line of their code that makes it):
# - their decoder's position embeddings are ``embed_positions_original`` (their fairseq/models/transformer.py:699,
#   named apart from length-control encodings their fork adds); fairseq 0.12's module is ``embed_positions``;
# - SinusoidalPositionalEmbedding's ``_float_tensor`` buffer (their sinusoidal_positional_embedding.py:29) holds no
#   weight, only a device and dtype to follow; fairseq 0.12 keeps its table in a non-persistent buffer instead, so
#   it is dropped (fairseq drops it under ``embed_positions``, not under their decoder's name).
_AUTHORS_RENAMED = {"decoder.embed_positions_original.": "decoder.embed_positions."}
_AUTHORS_UNUSED_BUFFERS = ("._float_tensor",)
# their options that change what a trained model computes, which this plugin does not implement
_AUTHORS_NOT_OFFERED = {
    "represent_length_by_lrpe": "--represent-length-by-lrpe",
    "represent_length_by_ldpe": "--represent-length-by-ldpe",
    "no_layer_norm": "--no-layer-norm",
    "one_emb": "--one-emb",
    "layer_wise_attention": "--layer-wise-attention",
}


def _adopt_authors_weights(weights):
    """Their state dict keys as fairseq 0.12's (in place: the dict may carry attributes of the loader)."""
    for key in list(weights):
        if key.endswith(_AUTHORS_UNUSED_BUFFERS):
            del weights[key]
            continue
        for old, new in _AUTHORS_RENAMED.items():
            if key.startswith(old):
                weights[new + key[len(old):]] = weights.pop(key)


def adopt_authors_checkpoint(state, path):
    """The authors' released checkpoints (their fairseq 0.9 fork, e.g. ``b2t_layer18_ave10.pt``) name a stock
    architecture (``transformer_wmt_en_de``) with ``--residual-bottom-to-top``; stock fairseq would build a plain
    Post-LN model from them and translate wrongly without a word. Loaded with the plugin, such a checkpoint's
    config is turned into ours: the same architecture's ``transformer_b2t`` mirror, ``--connection b2t``, no init
    rule (the weights are trained), and their weights' names fairseq 0.12's (see _AUTHORS_RENAMED). Returns True
    when it adopted one."""
    import logging

    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.utils import safe_getattr

    cfg = state.get("cfg") if isinstance(state, dict) else None
    model = cfg.get("model") if cfg is not None else None
    if model is None or not safe_getattr(model, "residual_bottom_to_top", False):
        return False
    arch = str(safe_getattr(model, "arch", "") or "")
    if arch.startswith("transformer_b2t") or arch.startswith("transformer_lm_b2t"):
        return False
    ours = "transformer_b2t" + arch[len("transformer"):] if arch.startswith("transformer") else None
    from b2t_fairseq.safety.errors import B2TConfigError

    if ours not in ARCH_MODEL_REGISTRY:
        raise B2TConfigError(
            f"{path} is a B2T checkpoint of architecture {arch!r}, which has no transformer_b2t mirror here; "
            "load it with --arch transformer_b2t and its dimensions"
        )
    used = [flag for name, flag in _AUTHORS_NOT_OFFERED.items() if safe_getattr(model, name, None)]
    if used:
        raise B2TConfigError(
            f"{path} is a B2T checkpoint of the authors' fork trained with {', '.join(used)}, which changes what "
            "the model computes and which b2t_fairseq does not implement; decode it with their fork"
        )
    from omegaconf import DictConfig, open_dict

    settings = {"arch": ours, "connection": "b2t", "init_scaling": "none"}
    if safe_getattr(model, "_name", None) is not None:
        settings["_name"] = ours
    if isinstance(model, DictConfig):
        with open_dict(model):
            for key, value in settings.items():
                model[key] = value
    else:
        for key, value in settings.items():
            setattr(model, key, value)
    if state.get("args") is not None:  # fairseq builds from the legacy args when a checkpoint still has them
        for key, value in settings.items():
            setattr(state["args"], key, value)
    if isinstance(state.get("model"), dict):
        _adopt_authors_weights(state["model"])
    logging.getLogger(__name__).info(
        f"{path}: the authors' B2T checkpoint (--arch {arch} --residual-bottom-to-top), loaded as --arch {ours} "
        "--connection b2t"
    )
    return True
