"""Word dropout as the authors' deep recipes use it (Takase & Kiyono, NAACL 2021, "WDrop").

During training each input token's embedding is zeroed with probability ``p`` before fairseq scales it by
sqrt(d) and adds positions. There is no 1/(1-p) rescaling, and on the decoder side position 0 (the
start-of-sentence token) is never dropped. In eval mode it is the identity.
"""
from contextlib import contextmanager

import torch


def word_dropout(embeddings, tokens, p, keep_first=False):
    """Zero whole token vectors of ``embeddings`` (B x T x C) with probability ``p``; ``tokens`` is B x T."""
    if p <= 0:
        return embeddings
    keep = torch.rand(tokens.shape, device=embeddings.device) >= p
    if keep_first:
        keep[:, 0] = True
    return embeddings * keep.unsqueeze(-1).to(embeddings.dtype)


@contextmanager
def dropping_words(embed_tokens, p, keep_first):
    """Apply :func:`word_dropout` to every call of ``embed_tokens`` inside the block.

    fairseq's decoder looks up its token embeddings inline, so a temporary forward hook is the least
    invasive place to intervene. The output projection reads ``embed_tokens.weight`` directly (shared
    embeddings) and is therefore not affected.
    """
    if p <= 0:
        yield
        return

    def hook(module, inputs, output):
        return word_dropout(output, inputs[0], p, keep_first=keep_first)

    handle = embed_tokens.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
