"""What our models add to fairseq's decoding: the fast paths applied when a loaded model is prepared for inference,
and cross-attention shared by the beams of a sentence."""
import logging

import torch
from fairseq.modules import MultiheadAttention

from b2t_fairseq.fast_paths.int8 import quantize_for_cpu_decoding
from b2t_fairseq.fast_paths.kv_cache import fast_incremental_attention
from b2t_fairseq.fast_paths.packed_linear import pack_linears

logger = logging.getLogger(__name__)


class FastDecoding:
    """Mixin of our models. ``prepare_for_inference_`` (fairseq-generate, -interactive, -eval-lm, the hub): after
    fairseq's own preparation, apply ``--int8-decoding``, pack the Linear layers left in float32 for the CPU
    (packed_linear.py) and give the decoder's attention modules their incremental paths (kv_cache.py).
    ``set_beam_size``: see there."""

    b2t_beam_shared = True  # --no-beamable-mm turns it off (prepare_for_inference_)

    def prepare_for_inference_(self, cfg):
        super().prepare_for_inference_(cfg)
        self.b2t_beam_shared = not getattr(getattr(cfg, "generation", None), "no_beamable_mm", False)
        quantize_for_cpu_decoding(self, getattr(self, "b2t_int8_decoding", "none"))
        packed = pack_linears(self)
        if packed:
            logger.info(f"{packed} float32 Linear layers packed for oneDNN (used on the CPU; B2T_PACKED_LINEARS=off "
                        "switches it off)")
        fast_incremental_attention(self)
        self.decoder.__dict__.pop("_b2t_reordering", None)  # the decoder finds its reordering modules anew

    def set_beam_size(self, beam_size):
        """fairseq's SequenceGenerator calls this before a search when a model has it (fairseq's BART does): the
        decoder's cross-attention then computes the encoder's keys and values once per source sentence instead of
        once per beam, keeps one copy in the incremental state (so reordering the beams never copies it) and
        attends with one product per sentence and head (fairseq's own ``MultiheadAttention.beam_size`` path).
        The same numbers as without it, in less work; ``--no-beamable-mm`` switches it off."""
        beam = beam_size if self.b2t_beam_shared else 1
        for module in self.modules():
            if isinstance(module, MultiheadAttention) and module.encoder_decoder_attention:
                module.b2t_search_beam = beam
                if not hasattr(module, "b2t_beam_hook"):
                    module.b2t_beam_hook = module.register_forward_pre_hook(_beam_of_the_call, with_kwargs=True)


_FORWARD_ARGS = ("query", "key", "value", "key_padding_mask", "incremental_state")


def _beam_of_the_call(attention, args, kwargs):
    """fairseq's attention applies ``beam_size`` to every call, but only a search's incremental calls hold beam
    copies of each sentence. The first step of an incremental decode (no keys saved yet) shares the keys only
    where the encoder output's rows really are ``b2t_search_beam`` copies of each sentence (so a later
    incremental decode of another batch is not mistaken for a search); the steps after it keep that choice; any
    other call (scoring, a training step) gets 1."""
    given = dict(zip(_FORWARD_ARGS, args), **kwargs)
    state = given.get("incremental_state")
    if state is None:
        attention.beam_size = 1
    elif "prev_key" not in (attention._get_input_buffer(state) or {}):
        beam, key, mask = attention.b2t_search_beam, given.get("key"), given.get("key_padding_mask")
        attention.beam_size = beam if beam > 1 and _beam_copies(key, beam) and _beam_copies(mask, beam, dim=0) else 1


def _beam_copies(x, beam, dim=1):
    """Whether ``x`` (None counts) holds each of its rows along ``dim`` ``beam`` times in a row."""
    if x is None:
        return True
    if x.size(dim) % beam:
        return False
    groups = x.unflatten(dim, (-1, beam))
    return torch.equal(groups, groups.narrow(dim + 1, 0, 1).expand_as(groups))
