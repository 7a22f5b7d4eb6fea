"""Decoder attention for incremental decoding: self-attention whose saved keys and values live in a buffer with
room for later steps, and cross-attention that attends to the saved encoder keys with two batched products and
no Python around them (see SharedCrossAttention).

fairseq's attention reorders the saved keys and values for the beams with ``index_select`` (a copy of every earlier
step) and then appends the new step's with ``torch.cat`` (a second copy): two passes over the whole cache at every
step, a cost that grows with every step and with the beam. Here a beam reordering is only noted (``reorder_incremental_state``) and applied at the next step in place,
to the rows it changes (at beam 1 none until a sentence ends), and
the new step is written after the earlier ones (``_one_step_longer``). The saved state keeps fairseq's names and
shape (``prev_key``/``prev_value``: bsz x heads x steps x head_dim, now views of the buffer) and attention runs
fairseq's matrix products on the same numbers, so the results are fairseq's (tests/test_fast_paths.py compares
them bitwise). The buffer is step-major: on views of a rows x heads x capacity x head_dim buffer torch's batched
products ran 1.5-3x slower than on contiguous keys (why the idea lost twice before), on views of the step-major
one 0.8-1.5x (benchmarks/bench_decoding_ops.py, RESULTS.md 2026-12-07).

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
        for name, room, new in (("prev_key", KEY_ROOM, k), ("prev_value", VALUE_ROOM, v)):
            _one_step_longer(incremental_state, saved, name, room, order, new.view(bsz, heads, head_dim))
        k, v = saved["prev_key"], saved["prev_value"]
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
        saved.pop(KEY_ROOM, None), saved.pop(VALUE_ROOM, None)  # fairseq's path appends by copying from here on
        self._set_input_buffer(incremental_state, saved)


KEY_ROOM, VALUE_ROOM = "b2t_key_room", "b2t_value_room"  # the buffers that prev_key and prev_value are views of
MOVES = "b2t_moved_rows"  # of the last order: which rows it changes, shared by the decoder's layers
FIRST_ROOM = 32  # steps a new buffer holds; each full buffer is replaced by one twice as long


def _moves(incremental_state, order: Tensor):
    """(rows that ``order`` changes, the rows they take), computed once per order for all the decoder's layers
    (fairseq's search hands each layer the same order tensor)."""
    known = incremental_state.get(MOVES)
    if known is not None and known["order"] is order:
        return known["to"], known["from"]
    to = (order != torch.arange(order.numel(), device=order.device)).nonzero().squeeze(1)
    taken = order.index_select(0, to)
    incremental_state[MOVES] = {"order": order, "to": to, "from": taken}
    return to, taken


def _one_step_longer(incremental_state, saved: Dict[str, Optional[Tensor]], name: str, room_name: str,
                     order: Optional[Tensor], new: Tensor):  # fmt: skip
    """``saved[name]`` (rows x heads x steps x head_dim) in beam ``order`` with ``new`` (rows x heads x head_dim)
    appended along the steps, as fairseq's index_select and cat compute it, but kept in a buffer with room for
    later steps (``saved[room_name]``: capacity x rows x heads x head_dim, step-major), of which ``saved[name]`` is
    a view in fairseq's shape. A step writes only the rows the order changes and the new step; a full buffer is
    replaced by one twice as long; a tensor that is not a view of the buffer (a first step; fairseq's path or a
    restored state put it there), or rows more than the buffer holds or fewer than half of them (finished
    sentences: the memory goes back), are copied into a new one.

    Step-major, so that a step's keys are one contiguous block and each (row, head)'s keys a matrix with unit
    stride along head_dim: torch's batched products give the same numbers on such views and run far closer to
    their speed on contiguous keys than on views of a rows x heads x capacity x head_dim buffer (module docstring)."""
    prev, room, rows = saved.get(name), saved.get(room_name), new.size(0)
    expected = order.numel() if order is not None else rows if prev is None else prev.size(0)
    if expected != rows:
        raise RuntimeError(f"cached self-attention: {rows} rows in this step, {expected} expected")
    steps = 0 if prev is None else prev.size(2)
    # (a buffer for more than twice the rows left is given up for a smaller one)
    in_room = (
        prev is not None and room is not None and prev.data_ptr() == room.data_ptr()
        and prev.stride() == _view_strides(room) and room.size(1) // 2 < rows <= room.size(1)
    )  # fmt: skip
    if not in_room:
        room = None
        if order is not None and prev is not None:
            prev = prev.index_select(0, order)
    elif order is not None:
        moved, taken = _moves(incremental_state, order)
        if moved.numel():
            move_rows(room[:steps], moved, taken)
    if room is None or steps == room.size(0):
        bigger = new.new_empty(max(FIRST_ROOM, 2 * steps), rows if room is None else room.size(1), *new.shape[1:])
        if room is not None:
            bigger[:steps] = room[:steps]
        elif prev is not None:
            bigger[:steps, :rows] = prev.permute(2, 0, 1, 3)
        room = bigger
    room[steps, :rows] = new
    saved[room_name] = room
    saved[name] = room[: steps + 1, :rows].permute(1, 2, 0, 3)


def move_rows(front: Tensor, moved: Tensor, taken: Tensor):
    """``front[:, moved] = front[:, taken]`` (steps x rows x heads x head_dim), in place. The bytes are moved as
    16-byte elements where a row of head_dim allows it: torch's CPU index kernels copy those about twice as fast as
    float32 elements (benchmarks/bench_decoding_ops.py, RESULTS.md); the same bytes either way."""
    if front.stride(-1) == 1 and (front.size(-1) * front.element_size()) % 16 == 0:
        front = front.view(torch.complex128)
    front.index_copy_(1, moved, front.index_select(1, taken))


def _view_strides(room: Tensor):
    """The strides of a rows x heads x steps x head_dim view of a step-major buffer."""
    return room.stride(2) * room.size(2), room.stride(2), room.stride(0), 1


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
