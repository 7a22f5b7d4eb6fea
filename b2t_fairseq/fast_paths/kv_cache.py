"""Decoder attention for incremental decoding: self-attention that copies its saved keys and values once per step,
not twice, and cross-attention that attends to the saved encoder keys with two batched products and no Python
around them (see SharedCrossAttention).

fairseq's attention reorders the saved keys and values for the beams with ``index_select`` (a copy of every earlier
step) and then appends the new step's with ``torch.cat`` (a second copy). Here a beam reordering is only noted
(``reorder_incremental_state``) and applied at the next step by ``index_select`` straight into the new, one step
longer tensor, whose last position then takes the new key and value: one copy per step. The saved state keeps
fairseq's format (``prev_key``/``prev_value``: bsz x heads x steps x head_dim, contiguous) and attention runs
fairseq's matrix products on the same numbers, so the results are fairseq's. (Preallocated buffers with room
to grow were tried twice: their batched products over strided rows are slower, and a whole decode gained nothing.)

Installed by ``prepare_for_inference_`` (decoding.py) on the decoders' attention modules; the class of each
is swapped (parameters, names and state dicts unchanged). A call the fast path does not cover (training, full
sequences, padding or attention masks, attention weights asked for, several new tokens at once) goes to
fairseq's own forward, after any noted reordering is applied.
"""
from typing import Dict, Optional

import torch
from torch import Tensor

from b2t_fairseq.fast_paths.classes import swap_class

ORDER = "b2t_order"  # a beam order noted by reorder_incremental_state, not yet applied


class CachedSelfAttention:
    """Mixin put in front of a decoder self-attention's class (``MultiheadAttention`` or a method's subclass)."""

    def forward(self, query, key, value, key_padding_mask: Optional[Tensor] = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None, need_weights: bool = True,
                static_kv: bool = False, attn_mask: Optional[Tensor] = None, before_softmax: bool = False,
                need_head_weights: bool = False):  # fmt: skip
        saved = None if incremental_state is None else self._get_input_buffer(incremental_state)
        covered = (
            saved is not None and not self.training and query.size(0) == 1 and key_padding_mask is None
            and saved.get("prev_key_padding_mask") is None and attn_mask is None
            and not (need_weights or need_head_weights or before_softmax or static_kv)
            and self.bias_k is None and not self.add_zero_attn and not self.dropout_module.apply_during_inference
        )  # fmt: skip
        if not covered:
            if saved is not None and ORDER in saved:
                self._apply_order(incremental_state, saved)
            return super().forward(query, key, value, key_padding_mask, incremental_state, need_weights, static_kv,
                                   attn_mask, before_softmax, need_head_weights)  # fmt: skip
        bsz, embed_dim = query.size(1), query.size(2)
        heads, head_dim = self.num_heads, self.head_dim
        fused = self.__dict__.get("b2t_qkv")  # int8 projections as one product (int8.FusedProjections)
        if fused is not None:
            q, k, v = fused(query)
        else:
            q, k, v = self.q_proj(query), self.k_proj(query), self.v_proj(query)
        q = q * self.scaling
        order = saved.pop(ORDER, None)
        saved["prev_key"] = k = _one_step_longer(saved.get("prev_key"), order, k.view(bsz, heads, 1, head_dim))
        saved["prev_value"] = v = _one_step_longer(saved.get("prev_value"), order, v.view(bsz, heads, 1, head_dim))
        saved["prev_key_padding_mask"] = None
        self._set_input_buffer(incremental_state, saved)
        steps = k.size(2)
        k, v = k.view(bsz * heads, steps, head_dim), v.view(bsz * heads, steps, head_dim)
        weights = torch.bmm(q.view(bsz * heads, 1, head_dim), k.transpose(1, 2))
        weights = self.apply_sparse_mask(weights, 1, steps, bsz)
        probs = torch.softmax(weights, dim=-1, dtype=torch.float32).type_as(weights)
        attn = torch.bmm(probs, v)  # (bsz * heads, 1, head_dim): already fairseq's (1, bsz, embed_dim) order
        return self.out_proj(attn.view(1, bsz, embed_dim)), None

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        saved = self._get_input_buffer(incremental_state)
        if saved.get("prev_key") is None:
            return super().reorder_incremental_state(incremental_state, new_order)
        order = saved.get(ORDER)
        saved[ORDER] = new_order if order is None else order.index_select(0, new_order)
        return self._set_input_buffer(incremental_state, saved)

    def _apply_order(self, incremental_state, saved):
        order = saved.pop(ORDER)
        for name in ("prev_key", "prev_value", "prev_key_padding_mask"):
            if saved.get(name) is not None:
                saved[name] = saved[name].index_select(0, order)
        self._set_input_buffer(incremental_state, saved)


def _one_step_longer(saved: Optional[Tensor], order: Optional[Tensor], new: Tensor) -> Tensor:
    """``saved`` (bsz x heads x steps x head_dim) in beam ``order`` with ``new`` appended along the steps: fairseq's
    index_select and cat, in one copy."""
    if saved is None:
        return new.contiguous()
    rows, steps = new.size(0), saved.size(2)
    if order is not None and order.numel() != rows or order is None and saved.size(0) != rows:
        raise RuntimeError(f"cached self-attention: {saved.size(0)} rows saved, {rows} in this step")
    out = new.new_empty(rows, new.size(1), steps + 1, new.size(3))
    if order is None:
        out[:, :, :steps] = saved
    else:
        torch.index_select(saved, 0, order, out=out[:, :, :steps])
    out[:, :, steps:] = new
    return out


class SharedCrossAttention:
    """Mixin put in front of a decoder cross-attention's class: the steps after the first of an incremental decode
    attend to the saved encoder keys and values with two batched products per sentence and head: for beams that
    share them (decoding.py, ``set_beam_size``) as fairseq's einsum path does, without einsum's parsing and
    planning at every call; with one copy per row (beam 1, or sharing off) as fairseq's bmm path does, without its
    Python around them."""

    def forward(self, query, key, value, key_padding_mask: Optional[Tensor] = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None, need_weights: bool = True,
                static_kv: bool = False, attn_mask: Optional[Tensor] = None, before_softmax: bool = False,
                need_head_weights: bool = False):  # fmt: skip
        saved = None if incremental_state is None else self._get_input_buffer(incremental_state)
        prev_key = None if saved is None else saved.get("prev_key")
        bsz = query.size(1)
        covered = (
            prev_key is not None and static_kv and not self.training and query.size(0) == 1
            and attn_mask is None and self.beam_size == bsz // prev_key.size(0)
            and not before_softmax
            and type(self).apply_sparse_mask is _PLAIN_SPARSE_MASK  # RealFormer's scores need fairseq's order
            and self.bias_k is None and not self.add_zero_attn and not self.dropout_module.apply_during_inference
        )  # fmt: skip
        if not covered:
            return super().forward(query, key, value, key_padding_mask, incremental_state, need_weights, static_kv,
                                   attn_mask, before_softmax, need_head_weights)  # fmt: skip
        sentences, heads, src_len, head_dim = prev_key.shape
        beam, embed_dim = bsz // sentences, query.size(2)
        q = self.q_proj(query)
        q *= self.scaling
        # (1, sentences * beam, heads * head_dim) -> (sentences * heads, beam, head_dim)
        q = q.view(sentences, beam, heads, head_dim).transpose(1, 2).reshape(sentences * heads, beam, head_dim)
        k = prev_key.view(sentences * heads, src_len, head_dim)
        v = saved["prev_value"].view(sentences * heads, src_len, head_dim)
        weights = torch.bmm(q, k.transpose(1, 2))
        mask = saved.get("prev_key_padding_mask")
        if mask is not None and _has_padding(self, mask):
            weights = weights.view(sentences, heads, beam, src_len).masked_fill(
                mask.view(sentences, 1, 1, src_len).to(torch.bool), float("-inf")
            ).view(sentences * heads, beam, src_len)
        probs_float = torch.softmax(weights, dim=-1, dtype=torch.float32)
        probs = probs_float.type_as(weights)
        attn = torch.bmm(probs, v).view(sentences, heads, beam, head_dim).transpose(1, 2)
        attn = self.out_proj(attn.reshape(1, bsz, embed_dim))
        if not (need_weights or need_head_weights):
            return attn, None
        # fairseq's attention weights: heads x bsz x 1 x src_len, or their mean over the heads
        per_head = probs_float.view(sentences, heads, beam, src_len).permute(1, 0, 2, 3).reshape(heads, bsz, 1, src_len)
        return attn, per_head if need_head_weights else per_head.mean(dim=0)


def _has_padding(attention, mask: Tensor) -> bool:
    """Whether ``mask`` (a saved encoder padding mask) marks any position, looked at once per mask (a decode keeps
    one mask object from step to step): fairseq's encoder gives a mask even where no source is padded, and masking
    with it changes nothing but costs a pass over the scores at every step."""
    known = attention.__dict__.get("b2t_padding_of")
    if known is None or known[0] is not mask:
        known = attention.__dict__["b2t_padding_of"] = (mask, bool(mask.any()))
    return known[1]


def _plain_sparse_mask():
    from fairseq.modules import MultiheadAttention

    return MultiheadAttention.apply_sparse_mask


_PLAIN_SPARSE_MASK = _plain_sparse_mask()


def fast_incremental_attention(model) -> int:
    """Give every decoder self-attention module of ``model`` the one-copy incremental path, every cross-attention
    module the beam-shared one; returns how many modules."""
    from fairseq.modules import MultiheadAttention

    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return 0
    count = 0
    for module in decoder.modules():
        if not isinstance(module, MultiheadAttention) or isinstance(module, (CachedSelfAttention, SharedCrossAttention)):
            continue
        mixin, prefix = (CachedSelfAttention, "Cached") if module.self_attention else (SharedCrossAttention, "Shared")
        swap_class(module, (mixin, type(module)), f"{prefix}{type(module).__name__}")
        count += 1
    return count
