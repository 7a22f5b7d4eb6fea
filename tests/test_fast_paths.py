"""Exact mode's fast paths (issues 11, 22): oneDNN-packed Linear layers once a model is prepared for inference, and
cross-attention keys shared by the beams of a sentence, checked against the paths they replace (fairseq's Linear,
one copy per beam, fairseq's stock transformer): forward, incremental decoding and beam search, for every method."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import b2t_fairseq  # noqa: F401  (registers the models)
from fairseq.modules import MultiheadAttention
from b2t_fairseq.fast_paths.packed_linear import PackedLinear, pack_linears, packing_available
from conftest import build_model
from test_layers import DIMS, LM_DIMS, batch, randomize

ALL_METHODS = tuple(b2t_fairseq.modules.CONNECTIONS)
pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN (mkldnn)")
TOL = dict(rtol=1e-5, atol=1e-5)


def _inference_cfg(beam=4):
    return argparse.Namespace(generation=argparse.Namespace(beam=beam, print_alignment=False, retain_dropout=False))


# ------------------------------------------------------------------------------------------ PackedLinear
def test_packed_linear_equals_linear_and_follows_its_weight(monkeypatch):
    torch.manual_seed(0)
    plain = nn.Linear(48, 80)
    packed = nn.Linear(48, 80)
    packed.load_state_dict(plain.state_dict())
    assert pack_linears(packed) == 1 and type(packed) is PackedLinear
    assert list(packed.state_dict()) == ["weight", "bias"]  # checkpoints never see it
    x = torch.randn(5, 3, 48)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), **TOL)
        assert packed._packed is not None  # the packed kernel ran
        # an in-place update (an optimizer step, load_state_dict) makes the packed copy stale: it is redone
        packed.weight.mul_(-2.0)
        plain.weight.mul_(-2.0)
        torch.testing.assert_close(packed(x), plain(x), **TOL)
    # under CPU autocast, autocast chooses the precision, as for fairseq's Linear
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed(x).dtype == plain(x).dtype == torch.bfloat16
    # with gradients: fairseq's Linear, bit for bit, and gradients flow
    y = packed(x)
    assert torch.equal(y, plain(x))
    y.sum().backward()
    assert packed.weight.grad is not None
    # the kill switch
    monkeypatch.setenv("B2T_PACKED_LINEARS", "0")
    with torch.no_grad():
        assert torch.equal(packed(x), F.linear(x, packed.weight, packed.bias))


@pytest.mark.parametrize("connection, own", [("sub-ln", "fc2"), ("hybridnorm", "self_attn.q_proj")])
def test_a_methods_own_linear_class_keeps_its_steps_over_a_packed_product(data_dir, connection, own):
    from b2t_fairseq.modules.connections import HeadNormedLinear, InputNormedLinear

    model, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", connection, *DIMS])
    model.eval()
    model.prepare_for_inference_(_inference_cfg())
    layer = model.decoder.layers[0]
    assert type(layer.fc1) is PackedLinear and type(model.decoder.output_projection) is PackedLinear
    module = layer.get_submodule(own)
    assert isinstance(module, PackedLinear) and isinstance(module, (InputNormedLinear, HeadNormedLinear))
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    x = torch.randn(2, module.in_features)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
        out = module(x)
        assert calls  # the product was the packed one
        mp.setenv("B2T_PACKED_LINEARS", "0")  # the method's steps over fairseq's Linear
        torch.testing.assert_close(out, module(x), **TOL)
        assert len(calls) == 1


@pytest.mark.parametrize(
    "value, packed",
    [("0", False), ("false", False), ("OFF", False), ("No", False), ("1", True), ("true", True), ("On", True),
     (" yes ", True), (None, True)],
)  # fmt: skip
def test_switch_values_and_what_the_log_says(data_dir, monkeypatch, caplog, value, packed):
    """B2T_PACKED_LINEARS: 0/false/off/no switch the packing off (any case), 1/true/on/yes or unset keep it; the
    log says what was done to the prepared model."""
    import logging

    if value is None:
        monkeypatch.delenv("B2T_PACKED_LINEARS", raising=False)
    else:
        monkeypatch.setenv("B2T_PACKED_LINEARS", value)
    model, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--encoder-layers", "1", "--decoder-layers", "1",
                                         *DIMS])  # fmt: skip
    model.eval()
    with caplog.at_level(logging.INFO, logger="b2t_fairseq"):
        model.prepare_for_inference_(_inference_cfg())
    assert any(type(m) is PackedLinear for m in model.modules()) is packed
    log = caplog.text
    if packed:
        assert "float32 Linear layers packed for oneDNN" in log and "not packed" not in log
    else:
        assert f"B2T_PACKED_LINEARS={value}: CPU Linear layers are not packed" in log and "layers packed" not in log


@pytest.mark.parametrize("value", ["2", "of", "", "disable"])
def test_switch_refuses_other_values(data_dir, monkeypatch, value):
    from b2t_fairseq.safety.errors import B2TConfigError

    monkeypatch.setenv("B2T_PACKED_LINEARS", value)
    model, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--encoder-layers", "1", "--decoder-layers", "1",
                                         *DIMS])  # fmt: skip
    model.eval()
    with pytest.raises(B2TConfigError, match=f"B2T_PACKED_LINEARS='{value}': use 0, false, off or no .* 1, true, on"):
        model.prepare_for_inference_(_inference_cfg())


# -------------------------------------------------------------------- prepared models vs reference paths
def _twins(data_dir, argv, task="translation"):
    """The same randomized weights twice: one model as fairseq-generate prepares it, one left as built."""
    fast, tk, _ = build_model(data_dir, argv, task)
    reference, _, _ = build_model(data_dir, argv, task)
    randomize(fast, seed=5)
    reference.load_state_dict(fast.state_dict())
    fast.eval(), reference.eval()
    reference.b2t_beam_shared = False  # what --no-beamable-mm does: one copy of the cross-attention keys per beam
    fast.prepare_for_inference_(_inference_cfg())
    assert any(type(m) is PackedLinear for m in fast.modules())
    assert not any(type(m) is PackedLinear for m in reference.modules())
    return fast, reference, tk


def _decode_steps(model, src, lengths, prev):
    with torch.no_grad():
        enc = model.encoder(src, lengths)
        full = model.get_normalized_probs(model.decoder(prev, enc), log_probs=True)
        state, steps = {}, []
        for t in range(prev.size(1)):
            steps.append(model.get_normalized_probs(model.decoder(prev[:, : t + 1], enc, incremental_state=state),
                                                    log_probs=True))  # fmt: skip
    return full, torch.cat(steps, dim=1)


def _beam_search(model, tk, src, lengths, beam=4, max_len=9):
    from fairseq.sequence_generator import SequenceGenerator

    gen = SequenceGenerator([model], tk.target_dictionary, beam_size=beam, max_len_b=max_len)
    with torch.no_grad():
        return gen.generate([model], {"net_input": {"src_tokens": src, "src_lengths": lengths}})


def _assert_same_hypotheses(a, b):
    assert len(a) == len(b)
    for sent_a, sent_b in zip(a, b):
        assert [h["tokens"].tolist() for h in sent_a] == [h["tokens"].tolist() for h in sent_b]
        torch.testing.assert_close(torch.stack([h["score"] for h in sent_a]),
                                   torch.stack([h["score"] for h in sent_b]), **TOL)  # fmt: skip
        torch.testing.assert_close(torch.cat([h["positional_scores"] for h in sent_a]),
                                   torch.cat([h["positional_scores"] for h in sent_b]), **TOL)  # fmt: skip


def _cross_attention_beams(model):
    return {m.beam_size for m in model.modules() if isinstance(m, MultiheadAttention) and m.encoder_decoder_attention}


def _assert_decodes_alike(model, other, tk):
    """The same beam-search hypotheses (``model`` sharing its cross-attention keys among the beams of a sentence),
    then teacher-forced and step-by-step log-probabilities within 1e-5: a decode after a search, of a batch
    whose rows are not beam copies (4 sentences, beam 4), must not share them."""
    src, lengths, prev = batch(tk.source_dictionary, bsz=4, tgt_len=7)
    _assert_same_hypotheses(_beam_search(model, tk, src, lengths), _beam_search(other, tk, src, lengths))
    assert _cross_attention_beams(model) in ({4}, set())  # set(): a model without cross-attention
    for ours, theirs in zip(_decode_steps(model, src, lengths, prev), _decode_steps(other, src, lengths, prev)):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert _cross_attention_beams(model) in ({1}, set())


@pytest.mark.parametrize("connection", ALL_METHODS)
def test_prepared_model_decodes_as_the_reference_path(data_dir, connection):
    argv = ["--arch", "transformer_b2t", "--connection", connection, "--encoder-layers", "3",
            "--decoder-layers", "3", *DIMS]  # fmt: skip
    fast, reference, tk = _twins(data_dir, argv)
    _assert_decodes_alike(fast, reference, tk)


@pytest.mark.parametrize("connection", ["b2t", "dlcl", "realformer"])
def test_prepared_language_model_decodes_as_the_reference_path(data_dir, connection):
    argv = ["--arch", "transformer_lm_b2t", "--connection", connection, "--decoder-layers", "3", *LM_DIMS]
    fast, reference, tk = _twins(data_dir, argv, task="language_modeling")
    _, _, tokens = batch(tk.source_dictionary, tgt_len=8)
    with torch.no_grad():
        for model in (fast, reference):
            state = {}
            model.b2t_steps = torch.cat([
                model.get_normalized_probs(model.decoder(tokens[:, : t + 1], incremental_state=state), log_probs=True)
                for t in range(tokens.size(1))
            ], dim=1)  # fmt: skip
    torch.testing.assert_close(fast.b2t_steps, reference.b2t_steps, **TOL)


def test_prepared_post_ln_equals_fairseqs_stock_transformer(data_dir):
    """Exact mode's contract: our post-ln, prepared for decoding with every fast path, against fairseq's own
    transformer with the same weights, prepared by fairseq: log-probabilities within 1e-5, the same beams."""
    common = ["--encoder-layers", "3", "--decoder-layers", "3", "--share-all-embeddings", *DIMS]
    ours, tk, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", "post-ln", *common])
    stock, _, _ = build_model(data_dir, ["--arch", "transformer", *common], seed=9)
    randomize(ours, seed=5)
    stock.load_state_dict(ours.state_dict())
    for model in (ours, stock):
        model.eval()
        model.prepare_for_inference_(_inference_cfg())
    assert type(stock.decoder.layers[0].fc1) is nn.Linear  # fairseq's model is left alone
    _assert_decodes_alike(ours, stock, tk)


@pytest.mark.parametrize("connection, norm_type", [("b2t", "rmsnorm"), ("hybridnorm", "dyt"), ("siamese", "derf")])
def test_prepared_model_decodes_as_the_reference_path_with_a_norm_type(data_dir, connection, norm_type):
    argv = ["--arch", "transformer_b2t", "--connection", connection, "--norm-type", norm_type, "--encoder-layers", "3",
            "--decoder-layers", "3", *DIMS]  # fmt: skip
    fast, reference, tk = _twins(data_dir, argv)
    _assert_decodes_alike(fast, reference, tk)


# ------------------------------------------------------------------- self-attention keys copied once a step
def test_cached_self_attention_follows_fairseqs_through_reorders_shrinking_and_fallbacks():
    """The buffered path (kv_cache.py) against fairseq's own incremental attention, call by call: 45 steps (the
    buffer outgrows its first room of 32) with a beam reordering before most (two in a row once), the batch
    shrinking (finished sentences; once to under half the buffer's rows) and once growing past the first step's rows, then a step with a padding mask (fairseq's path from then on,
    the noted order applied first). Between those, the keys stay in one buffer: a step writes the rows its order
    changes and the new step, not every earlier step."""
    from b2t_fairseq.fast_paths.kv_cache import FIRST_ROOM, KEY_ROOM, ORDER, fast_incremental_attention

    torch.manual_seed(0)
    ours, theirs = MultiheadAttention(16, 4, self_attention=True), MultiheadAttention(16, 4, self_attention=True)
    theirs.load_state_dict(ours.state_dict())
    holder = nn.Module()
    holder.decoder = nn.Module()
    holder.decoder.attn = ours
    assert fast_incremental_attention(holder) == 1 and type(ours).__name__ == "CachedMultiheadAttention"
    ours.eval(), theirs.eval()
    state_ours, state_theirs, bsz, rooms = {}, {}, 6, []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(45):
            for _ in range(2 if step == 5 else 1 if step else 0):
                if step in (3, 20):  # sentences finished: the search drops their rows
                    order = torch.randperm(bsz, generator=g)[: bsz - 2]
                    bsz -= 2
                elif step == 35:  # fewer than half the buffer's rows left
                    order = torch.randperm(bsz, generator=g)[:2]
                    bsz = 2
                elif step == 10:  # more rows than the buffer has (fairseq's reordering allows it)
                    order = torch.randint(0, bsz, (bsz + 5,), generator=g)
                    bsz += 5
                else:
                    order = torch.randint(0, bsz, (bsz,), generator=g)
                ours.reorder_incremental_state(state_ours, order)
                theirs.reorder_incremental_state(state_theirs, order)
                assert ORDER in ours._get_input_buffer(state_ours) or step > 40  # noted, not applied
            x = torch.randn(1, bsz, 16, generator=g)
            mask = torch.zeros(bsz, step + 1, dtype=torch.bool) if step == 40 else None  # a padded step
            out = ours(x, x, x, key_padding_mask=mask, incremental_state=state_ours, need_weights=False)[0]
            ref = theirs(x, x, x, key_padding_mask=mask, incremental_state=state_theirs, need_weights=False)[0]
            assert torch.equal(out, ref), step  # the same products on the same numbers
            saved_ours, saved_theirs = ours._get_input_buffer(state_ours), theirs._get_input_buffer(state_theirs)
            assert torch.equal(saved_ours["prev_key"], saved_theirs["prev_key"]), step
            assert torch.equal(saved_ours["prev_value"], saved_theirs["prev_value"]), step
            room = saved_ours.get(KEY_ROOM)
            rooms.append(None if room is None else room.data_ptr())
            if room is not None:
                assert saved_ours["prev_key"].data_ptr() == room.data_ptr(), step
    # a new buffer when the rows outgrew it (step 10), when the first room of FIRST_ROOM steps was full (at the step
    # that needs one more) and when fewer than half its rows were left (35), none from fairseq's path on (40); the
    # same buffer at every other step
    new_buffer = [t for t in range(1, 45) if rooms[t] != rooms[t - 1]]
    assert new_buffer == [10, FIRST_ROOM, 35, 40] and rooms[40:] == [None] * 5, new_buffer


@pytest.mark.parametrize("head_dim", [64, 4, 6, 3])  # rows of 16-byte elements (64, 4), and rows that are not
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_move_rows_copies_the_rows_an_order_changes(head_dim, dtype):
    from b2t_fairseq.fast_paths.kv_cache import move_rows

    room = torch.randn(32, 20, 4, head_dim, generator=torch.Generator().manual_seed(head_dim)).to(dtype)
    moved, taken = torch.tensor([1, 5, 7, 12]), torch.tensor([5, 1, 1, 19])  # a swap, a copy, a row from the end
    expected = room.clone()
    for r, t in zip(moved.tolist(), taken.tolist()):
        expected[:9, r] = room[:9, t]
    move_rows(room[:9], moved, taken)
    assert torch.equal(room, expected)


@pytest.mark.parametrize("beam, padded", [(4, True), (1, True), (4, False)])
def test_shared_cross_attention_equals_fairseqs_beam_shared_path(beam, padded):
    """The steps after the first of a beam-shared cross-attention (kv_cache.SharedCrossAttention) against
    fairseq's own beam_size path (einsum; beam 1: its bmm path), with a padded source and with a mask that marks
    nothing (which ours skips): the same outputs and attention weights (averaged over the heads, and per head: what
    the decoder's alignment layer asks for at every step)."""
    from b2t_fairseq.fast_paths.kv_cache import fast_incremental_attention

    torch.manual_seed(0)
    ours, theirs = (MultiheadAttention(16, 4, kdim=16, vdim=16, encoder_decoder_attention=True) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    holder = nn.Module()
    holder.decoder = nn.Module()
    holder.decoder.attn = ours
    assert fast_incremental_attention(holder) == 1 and type(ours).__name__ == "SharedMultiheadAttention"
    sentences, src_len = 3, 7
    encoder_out = torch.randn(src_len, sentences, 16).repeat_interleave(beam, dim=1)
    padding = torch.zeros(sentences, src_len, dtype=torch.bool)
    padding[1, -2:] = padded
    padding = padding.repeat_interleave(beam, dim=0)
    states = {}, {}
    fairseqs, on_fairseqs_path = MultiheadAttention.forward, []

    def spied(module, *args, **kwargs):
        on_fairseqs_path.append(module is ours)
        return fairseqs(module, *args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(MultiheadAttention, "forward", spied)
        for step in range(3):
            x = torch.randn(1, sentences * beam, 16)
            outs = []
            for module, state in zip((ours, theirs), states):
                module.eval()
                module.set_beam_size(beam)
                outs.append(module(x, encoder_out, encoder_out, key_padding_mask=padding, incremental_state=state,
                                   static_kv=True, need_weights=step > 0, need_head_weights=step == 2))  # fmt: skip
            assert torch.equal(outs[0][0], outs[1][0]), step
            assert (outs[0][1] is None) == (step == 0) and (step == 0 or torch.equal(outs[0][1], outs[1][1])), step
            assert ours._get_input_buffer(states[0])["prev_key"].size(0) == sentences  # one copy per sentence
    assert on_fairseqs_path == [True, False, False, False]  # ours took fairseq's path for its first step only


def test_reordering_an_encoder_output_copies_only_when_rows_change_sentence(data_dir):
    from fairseq.models.transformer import TransformerEncoderBase

    model, tk, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--encoder-layers", "2", "--decoder-layers",
                                          "2", *DIMS])  # fmt: skip
    model.eval()
    src, lengths, _ = batch(tk.source_dictionary, bsz=3, tgt_len=4)
    with torch.no_grad():
        out = model.encoder(src, lengths)
    expand = torch.arange(3).repeat_interleave(2)  # a search's beams: two copies of each sentence
    ours = model.encoder.reorder_encoder_out(out, expand)
    theirs = TransformerEncoderBase.reorder_encoder_out(model.encoder, out, expand)
    assert torch.equal(ours["encoder_out"][0], theirs["encoder_out"][0])
    beams = torch.tensor([1, 1, 3, 2, 5, 4])  # every row keeps its sentence: nothing to copy
    assert model.encoder.reorder_encoder_out(ours, beams) is ours
    shrink = torch.tensor([0, 1, 4, 5])  # sentence 1 finished: rows leave
    smaller = model.encoder.reorder_encoder_out(ours, shrink)
    assert torch.equal(smaller["encoder_out"][0], theirs["encoder_out"][0][:, shrink])
    assert torch.equal(smaller["encoder_padding_mask"][0], theirs["encoder_padding_mask"][0][shrink])


# ------------------------------------------------------------------- the decoder's reordering of a search
def test_decoder_skips_an_order_that_keeps_every_row_and_applies_every_other(data_dir):
    """The decoder's reorder_incremental_state_scripting against fairseq's, step by step (our prepared model against
    the same weights unprepared, reordered by fairseq's FairseqIncrementalDecoder method): an order that leaves every
    row where it is changes nothing and is skipped (the saved keys stay the same tensors, no order is noted); a
    permutation, an order that drops rows (arange over fewer rows: not the identity) and a repeat are applied. Then
    a greedy search (beam 1: identity orders while no sentence has finished, then rows dropped) gives fairseq's
    hypotheses."""
    from fairseq.models import FairseqIncrementalDecoder

    from b2t_fairseq.fast_paths.kv_cache import ORDER

    argv = ["--arch", "transformer_b2t", "--connection", "b2t", "--encoder-layers", "2", "--decoder-layers", "2",
            *DIMS]  # fmt: skip
    fast, reference, tk = _twins(data_dir, argv)
    src, lengths, prev = batch(tk.source_dictionary, bsz=3, tgt_len=8)
    orders = {2: torch.arange(3), 3: torch.tensor([2, 0, 1]), 4: torch.arange(3), 5: torch.arange(2),
              6: torch.tensor([0, 0])}  # fmt: skip
    self_attention = fast.decoder.layers[0].self_attn
    with torch.no_grad():
        enc_fast, enc_ref = fast.encoder(src, lengths), reference.encoder(src, lengths)
        state_fast, state_ref, rows = {}, {}, torch.arange(3)
        for t in range(prev.size(1)):
            order = orders.get(t)
            if order is not None:
                before = dict(self_attention._get_input_buffer(state_fast))
                fast.decoder.reorder_incremental_state_scripting(state_fast, order)
                FairseqIncrementalDecoder.reorder_incremental_state_scripting(reference.decoder, state_ref, order)
                saved = self_attention._get_input_buffer(state_fast)
                skipped = order.numel() == rows.numel() and torch.equal(order, torch.arange(rows.numel()))
                assert (ORDER not in saved and saved["prev_key"] is before["prev_key"]) == skipped, t
                enc_fast = fast.encoder.reorder_encoder_out(enc_fast, order)
                enc_ref = reference.encoder.reorder_encoder_out(enc_ref, order)
                rows = rows.index_select(0, order)
            tokens = prev.index_select(0, rows)[:, : t + 1]
            out = fast.decoder(tokens, enc_fast, incremental_state=state_fast)[0]
            ref = reference.decoder(tokens, enc_ref, incremental_state=state_ref)[0]
            torch.testing.assert_close(out, ref, **TOL)
    _assert_same_hypotheses(_beam_search(fast, tk, src, lengths, beam=1, max_len=12),
                            _beam_search(reference, tk, src, lengths, beam=1, max_len=12))  # fmt: skip
