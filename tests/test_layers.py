"""B2T / Post-LN / Pre-LN layers and stacks, checked against PAPER.md's equations and fairseq's own models.

Every reference value here is recomputed in the test from the layers' submodules (fairseq's attention, the
layer norms, fc1/fc2, relu) following PAPER.md, or comes from fairseq's stock models; nothing is compared with
a value produced by the code under test.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fairseq import options, tasks  # noqa: F401

import b2t_fairseq  # noqa: F401  (registers the models)
from conftest import PLUGIN_DIR, build_model, parse_args  # noqa: F401

CONNECTIONS = ("b2t", "post-ln", "pre-ln")
ALL_METHODS = tuple(b2t_fairseq.modules.CONNECTIONS)  # tests that hold for every method, new ones included
DIMS = (
    "--encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 "
    "--encoder-attention-heads 2 --decoder-attention-heads 4"
).split()
LM_DIMS = (
    "--decoder-embed-dim 16 --decoder-input-dim 16 --decoder-output-dim 16 --decoder-ffn-embed-dim 32 "
    "--decoder-attention-heads 2 --tokens-per-sample 32"
).split()
NO_DROPOUT = "--dropout 0 --attention-dropout 0 --activation-dropout 0".split()
TIGHT = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- helpers
def parse(data_dir, argv, task="translation"):
    return parse_args(data_dir, argv, task)


def build(data_dir, argv, task="translation", seed=0):
    model, tk, _ = build_model(data_dir, argv, task, seed)
    return model, tk


def nmt_argv(connection, layers=2, extra=()):
    return [
        "--arch", "transformer_b2t", "--connection", connection,
        "--encoder-layers", str(layers), "--decoder-layers", str(layers), *DIMS, *extra,
    ]  # fmt: skip


@torch.no_grad()
def randomize(model, seed=1):
    """Move every parameter away from its init (layer norms included) so swapped or missing terms show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "layer_norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * noise)
        else:
            p.add_(0.3 * noise)


def batch(dictionary, bsz=3, src_len=7, tgt_len=6, seed=2, src_pad=True):
    """Left-padded sources (fairseq's default) and teacher-forced decoder inputs starting with eos."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = dictionary.nspecial, len(dictionary)
    src = torch.randint(lo, hi, (bsz, src_len), generator=g)
    lengths = torch.full((bsz,), src_len)
    if src_pad:
        for b in range(1, bsz):
            n = src_len - 2 * b if src_len - 2 * b > 1 else 2
            src[b, : src_len - n] = dictionary.pad()
            lengths[b] = n
    src[:, -1] = dictionary.eos()
    prev = torch.randint(lo, hi, (bsz, tgt_len), generator=g)
    prev[:, 0] = dictionary.eos()
    return src, lengths, prev


def causal_mask(t):
    return torch.triu(torch.full((t, t), float("-inf")), 1)


def ffn(layer, h):
    return layer.fc2(F.relu(layer.fc1(h)))


def self_attn(layer, x, key_padding_mask=None, attn_mask=None):
    return layer.self_attn(query=x, key=x, value=x, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0]


def cross_attn(layer, x, enc, enc_pad):
    return layer.encoder_attn(query=x, key=enc, value=enc, key_padding_mask=enc_pad, static_kv=True)[0]


# PAPER.md, "Equations" -------------------------------------------------------------------------------
def ref_encoder_layer(layer, x, pad, connection):
    ln1, ln2 = layer.self_attn_layer_norm, layer.final_layer_norm
    if connection == "pre-ln":
        h = x + self_attn(layer, ln1(x), pad)
        return h + ffn(layer, ln2(h))
    h = ln1(x + self_attn(layer, x, pad))
    if connection == "post-ln":
        return ln2(h + ffn(layer, h))
    return ln2(x + h + ffn(layer, h))  # b2t


def ref_decoder_layer(layer, x, enc, enc_pad, connection):
    ln1, ln3 = layer.self_attn_layer_norm, layer.final_layer_norm
    ln2 = layer.encoder_attn_layer_norm
    mask = causal_mask(x.size(0))
    if connection == "pre-ln":
        h = x + self_attn(layer, ln1(x), attn_mask=mask)
        if enc is not None:
            h = h + cross_attn(layer, ln2(h), enc, enc_pad)
        return h + ffn(layer, ln3(h))
    h = ln1(x + self_attn(layer, x, attn_mask=mask))
    if enc is not None:
        h = ln2(h + cross_attn(layer, h, enc, enc_pad))
    if connection == "post-ln":
        return ln3(h + ffn(layer, h))
    return ln3(x + h + ffn(layer, h))  # b2t (for the LM: LN2(x + h1 + FFN(h1)))


def embed(stack, tokens):
    assert stack.layernorm_embedding is None
    x = stack.embed_scale * stack.embed_tokens(tokens) + stack.embed_positions(tokens)
    return x.transpose(0, 1)  # T x B x C


@torch.no_grad()
def ref_encoder(encoder, src, connection):
    pad = src.eq(encoder.padding_idx)
    x = embed(encoder, src) * (~pad).t().unsqueeze(-1)
    for layer in encoder.layers._modules.values():
        x = ref_encoder_layer(layer, x, pad, connection)
    if connection == "pre-ln":
        x = encoder.layer_norm(x)
    return x, pad


@torch.no_grad()
def ref_decoder(decoder, prev, enc, enc_pad, connection):
    assert decoder.project_in_dim is None and decoder.project_out_dim is None
    x = embed(decoder, prev)
    for layer in decoder.layers._modules.values():
        x = ref_decoder_layer(layer, x, enc, enc_pad, connection)
    if connection == "pre-ln":
        x = decoder.layer_norm(x)
    return decoder.output_projection(x.transpose(0, 1))


def capture_layer_io(layers):
    """Forward hooks recording (args, kwargs, output) of every layer call; the encoder's output without the
    carry the stacks pass between layers."""
    records, handles = [], []
    for i, layer in enumerate(layers._modules.values()):

        def hook(module, args, kwargs, output, i=i):
            if isinstance(output, tuple) and len(output) == 2:  # an encoder layer's (x, carry)
                output = output[0]
            records.append((i, args, dict(kwargs), output))

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return records, handles


# ---------------------------------------------------------------------------------------- tests
def test_plugin_imported_from_working_tree():
    assert Path(b2t_fairseq.__file__).resolve().parent == PLUGIN_DIR


@pytest.mark.parametrize("layers", [1, 3, 6])
@pytest.mark.parametrize("connection", CONNECTIONS)
def test_every_layer_matches_paper_equations(data_dir, connection, layers):
    """Each encoder/decoder layer, called inside the full model, returns the PAPER.md equation of its inputs."""
    model, task = build(data_dir, nmt_argv(connection, layers))
    randomize(model)
    model.eval()
    src, lengths, prev = batch(task.source_dictionary)
    enc_records, h1 = capture_layer_io(model.encoder.layers)
    dec_records, h2 = capture_layer_io(model.decoder.layers)
    with torch.no_grad():
        model(src, lengths, prev)
    for h in h1 + h2:
        h.remove()
    assert [r[0] for r in enc_records] == list(range(layers))
    assert [r[0] for r in dec_records] == list(range(layers))
    layer_list = list(model.encoder.layers._modules.values())
    pad = src.eq(task.source_dictionary.pad())
    assert pad.any()
    with torch.no_grad():
        enc_out = None
        for i, args, kwargs, out in enc_records:
            x = args[0]
            expected = ref_encoder_layer(layer_list[i], x, pad, connection)
            torch.testing.assert_close(out, expected, **TIGHT)
            enc_out = out
        if connection == "pre-ln":
            enc_out = model.encoder.layer_norm(enc_out)
        dec_layers = list(model.decoder.layers._modules.values())
        for i, args, kwargs, out in dec_records:
            x = args[0]
            expected = ref_decoder_layer(dec_layers[i], x, enc_out, pad, connection)
            torch.testing.assert_close(out[0], expected, **TIGHT)


@pytest.mark.parametrize("layers", [1, 3, 6])
@pytest.mark.parametrize("connection", CONNECTIONS)
def test_whole_model_matches_independent_recomputation(data_dir, connection, layers):
    model, task = build(data_dir, nmt_argv(connection, layers))
    randomize(model)
    model.eval()
    src, lengths, prev = batch(task.source_dictionary)
    with torch.no_grad():
        logits = model(src, lengths, prev)[0]
    enc, pad = ref_encoder(model.encoder, src, connection)
    expected = ref_decoder(model.decoder, prev, enc, pad, connection)
    torch.testing.assert_close(logits, expected, **TIGHT)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_final_layer_norm_only_for_pre_ln(data_dir, connection):
    model, _ = build(data_dir, nmt_argv(connection, 3))
    if connection == "pre-ln":
        assert model.encoder.layer_norm is not None and model.decoder.layer_norm is not None
    else:
        assert model.encoder.layer_norm is None and model.decoder.layer_norm is None
        assert not any(k.startswith(("encoder.layer_norm", "decoder.layer_norm")) for k in model.state_dict())
    lm, _ = build(
        data_dir, ["--arch", "transformer_lm_b2t", "--connection", connection, "--decoder-layers", "2", *LM_DIMS],
        task="language_modeling",
    )
    assert (lm.decoder.layer_norm is not None) == (connection == "pre-ln")


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("connection", CONNECTIONS)
def test_language_model_matches_paper_equations(data_dir, connection, layers):
    """Decoder-only B2T: y = LN2(x + h1 + FFN(h1)), h1 = LN1(x + SelfAttn(x))."""
    model, task = build(
        data_dir,
        ["--arch", "transformer_lm_b2t", "--connection", connection, "--decoder-layers", str(layers), *LM_DIMS],
        task="language_modeling",
    )
    randomize(model)
    model.eval()
    assert all(layer.encoder_attn is None for layer in model.decoder.layers._modules.values())
    _, _, tokens = batch(task.source_dictionary, tgt_len=9)
    with torch.no_grad():
        logits = model(tokens)[0]
    torch.testing.assert_close(logits, ref_decoder(model.decoder, tokens, None, None, connection), **TIGHT)


# ------------------------------------------------------------------- the bottom term is really there
@torch.no_grad()
def test_b2t_with_zero_ffn_is_ln2_of_x_plus_h(data_dir):
    """With fc2 zeroed the FFN vanishes: B2T encoder layer y = LN2(x + LN1(x + Attn(x))), decoder
    y = LN3(x + LN2(h1 + Cross(h1))) with h1 = LN1(x + Self(x)); Post-LN would give LN2(h) instead."""
    model, task = build(data_dir, nmt_argv("b2t", 3))
    randomize(model)
    for layer in [*model.encoder.layers._modules.values(), *model.decoder.layers._modules.values()]:
        layer.fc2.weight.zero_()
        layer.fc2.bias.zero_()
    model.eval()
    src, lengths, prev = batch(task.source_dictionary)
    pad = src.eq(task.source_dictionary.pad())
    x = embed(model.encoder, src) * (~pad).t().unsqueeze(-1)
    for layer in model.encoder.layers:
        h = layer.self_attn_layer_norm(x + self_attn(layer, x, pad))
        x = layer.final_layer_norm(x + h)
    enc = x
    y = embed(model.decoder, prev)
    for layer in model.decoder.layers:
        h1 = layer.self_attn_layer_norm(y + self_attn(layer, y, attn_mask=causal_mask(y.size(0))))
        h2 = layer.encoder_attn_layer_norm(h1 + cross_attn(layer, h1, enc, pad))
        y = layer.final_layer_norm(y + h2)
    expected = model.decoder.output_projection(y.transpose(0, 1))
    enc_out = model.encoder(src, lengths)
    torch.testing.assert_close(enc_out["encoder_out"][0], enc, **TIGHT)
    torch.testing.assert_close(model(src, lengths, prev)[0], expected, **TIGHT)


@torch.no_grad()
def test_b2t_and_post_ln_differ_with_identical_weights(data_dir):
    argv = ["--init-scaling", "none"]
    b2t, task = build(data_dir, nmt_argv("b2t", 3, argv), seed=5)
    post, _ = build(data_dir, nmt_argv("post-ln", 3, argv), seed=5)
    sd_b2t, sd_post = b2t.state_dict(), post.state_dict()
    assert sd_b2t.keys() == sd_post.keys()
    assert all(torch.equal(sd_b2t[k], sd_post[k]) for k in sd_b2t)
    b2t.eval(), post.eval()
    src, lengths, prev = batch(task.source_dictionary)
    enc_b2t = b2t.encoder(src, lengths)["encoder_out"][0]
    enc_post = post.encoder(src, lengths)["encoder_out"][0]
    assert (enc_b2t - enc_post).abs().max() > 1e-2
    assert (b2t(src, lengths, prev)[0] - post(src, lengths, prev)[0]).abs().max() > 1e-2


@torch.no_grad()
def test_bottom_term_gets_no_dropout(data_dir):
    """With sub-layer dropout p=1 every sub-layer output is zero in training mode, so the B2T encoder layer is
    y = LN2(x + LN1(x)) and the decoder layer y = LN3(x + LN2(LN1(x))): the bottom x survives untouched."""
    model, _ = build(data_dir, nmt_argv("b2t", 2, NO_DROPOUT))
    randomize(model)
    model.train()
    enc_layer, dec_layer = model.encoder.layers[0], model.decoder.layers[0]
    enc_layer.dropout_module.p = 1.0
    dec_layer.dropout_module.p = 1.0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 16, generator=g)
    enc = torch.randn(4, 2, 16, generator=g)
    y = enc_layer(x, encoder_padding_mask=None)
    torch.testing.assert_close(y, enc_layer.final_layer_norm(x + enc_layer.self_attn_layer_norm(x)), **TIGHT)
    y, _, _ = dec_layer(x, enc, None, self_attn_mask=causal_mask(5))
    ln1, ln2, ln3 = dec_layer.self_attn_layer_norm, dec_layer.encoder_attn_layer_norm, dec_layer.final_layer_norm
    torch.testing.assert_close(y, ln3(x + ln2(ln1(x))), **TIGHT)


# ------------------------------------------------------------------- post-ln / pre-ln == stock fairseq
def _stock_equivalence(data_dir, ours_argv, stock_argv, task, inputs):
    ours, tk = build(data_dir, ours_argv, task=task, seed=0)
    stock, _ = build(data_dir, stock_argv, task=task, seed=123)  # different init: the copy must matter
    randomize(ours, seed=7)
    stock.load_state_dict(ours.state_dict(), strict=True)  # key-for-key compatible, both ways
    ours.load_state_dict(stock.state_dict(), strict=True)
    assert type(stock).__module__.startswith("fairseq.")
    ours.eval(), stock.eval()
    with torch.no_grad():
        a = ours(*inputs(tk))[0]
        b = stock(*inputs(tk))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [["--encoder-layers", "3", "--decoder-layers", "2"],
                                   ["--encoder-layers", "2", "--decoder-layers", "2", "--share-all-embeddings"]])
@pytest.mark.parametrize("connection", ["post-ln", "pre-ln"])
def test_baselines_equal_fairseq_stock_transformer(data_dir, connection, shape):
    common = [*shape, *DIMS]
    stock = ["--arch", "transformer", *common]
    if connection == "pre-ln":
        stock += ["--encoder-normalize-before", "--decoder-normalize-before"]
    _stock_equivalence(
        data_dir,
        ["--arch", "transformer_b2t", "--connection", connection, *common],
        stock,
        "translation",
        lambda tk: batch(tk.source_dictionary),
    )


@pytest.mark.parametrize("connection", ["post-ln", "pre-ln"])
def test_lm_baselines_equal_fairseq_stock_transformer_lm(data_dir, connection):
    # fairseq 0.12's `--arch transformer_lm` from the command line keeps its dataclass default
    # decoder_normalize_before=False (its arch function is a no-op), so Pre-LN needs the explicit flag.
    common = ["--decoder-layers", "3", *LM_DIMS]
    stock = ["--arch", "transformer_lm", *common]
    if connection == "pre-ln":
        stock += ["--decoder-normalize-before"]
    _stock_equivalence(
        data_dir,
        ["--arch", "transformer_lm_b2t", "--connection", connection, *common],
        stock,
        "language_modeling",
        lambda tk: (batch(tk.source_dictionary, tgt_len=9)[2],),
    )


# ----------------------------------------------------------------------------- incremental decoding
def assert_incremental_equals_full(model, task):
    """Step-by-step decoding with fairseq's incremental state gives the teacher-forced log-probabilities."""
    src, lengths, prev = batch(task.source_dictionary, tgt_len=7)
    with torch.no_grad():
        enc = model.encoder(src, lengths)
        full = model.get_normalized_probs(model.decoder(prev, enc), log_probs=True)
        state = {}
        steps = []
        for t in range(prev.size(1)):
            out = model.decoder(prev[:, : t + 1], enc, incremental_state=state)
            steps.append(model.get_normalized_probs(out, log_probs=True))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_incremental_decoding_matches_teacher_forcing(data_dir, connection):
    model, task = build(data_dir, nmt_argv(connection, 3))
    randomize(model)
    model.eval()
    assert_incremental_equals_full(model, task)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_lm_incremental_decoding_matches_full_pass(data_dir, connection):
    model, task = build(
        data_dir,
        ["--arch", "transformer_lm_b2t", "--connection", connection, "--decoder-layers", "3", *LM_DIMS],
        task="language_modeling",
    )
    randomize(model)
    model.eval()
    _, _, tokens = batch(task.source_dictionary, tgt_len=8)
    with torch.no_grad():
        full = model.get_normalized_probs(model(tokens), log_probs=True)
        state = {}
        steps = [
            model.get_normalized_probs(model.decoder(tokens[:, : t + 1], incremental_state=state), log_probs=True)
            for t in range(tokens.size(1))
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("connection", ALL_METHODS)
def test_beam_search_produces_valid_hypotheses(data_dir, connection):
    from fairseq.sequence_generator import SequenceGenerator

    model, task = build(data_dir, nmt_argv(connection, 2))
    randomize(model)
    model.eval()
    tgt_dict = task.target_dictionary
    src, lengths, _ = batch(task.source_dictionary, bsz=3)
    generator = SequenceGenerator([model], tgt_dict, beam_size=4, max_len_b=10)
    with torch.no_grad():
        hypos = generator.generate([model], {"net_input": {"src_tokens": src, "src_lengths": lengths}})
    assert len(hypos) == 3
    for sent in hypos:
        assert len(sent) == 4
        scores = [h["score"].item() for h in sent]
        assert all(torch.isfinite(torch.tensor(scores)))
        assert scores == sorted(scores, reverse=True)
        for h in sent:
            toks = h["tokens"]
            assert 1 <= toks.numel() <= 11
            assert toks[-1].item() == tgt_dict.eos()
            assert toks.min().item() >= 0 and toks.max().item() < len(tgt_dict)
            assert not toks.eq(tgt_dict.pad()).any()
            assert not toks[:-1].eq(tgt_dict.eos()).any()


# -------------------------------------------------------------- activation checkpointing, layerdrop
def _train_step(model, task, seed=0):
    src, lengths, prev = batch(task.source_dictionary, bsz=4)
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(src, lengths, prev)[0]
    loss = F.cross_entropy(out.reshape(-1, out.size(-1)), prev.roll(-1, dims=1).reshape(-1))
    loss.backward()
    return out.detach(), loss.detach()


# --offload-activations implies checkpointing (fairseq's rule) and keeps the layers' saved inputs on the CPU
@pytest.mark.parametrize("flag", ["--checkpoint-activations", "--offload-activations"])
@pytest.mark.parametrize("connection", ALL_METHODS)
def test_checkpoint_activations_same_forward_and_gradients(data_dir, connection, flag):
    plain, task = build(data_dir, nmt_argv(connection, 3, NO_DROPOUT), seed=4)
    ckpt, _ = build(data_dir, nmt_argv(connection, 3, [*NO_DROPOUT, flag]), seed=4)
    assert ckpt.encoder.checkpoint_layers and ckpt.decoder.checkpoint_layers
    # away from init (ReZero's a = 0 would leave fc1 without a gradient), in float64 (T-Fixup has no layer
    # norm to keep the randomized activations small)
    plain.double(), ckpt.double()
    randomize(plain)
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    calls = {}
    for model in (plain, ckpt):
        for layer in list(model.encoder.layers) + list(model.decoder.layers):
            layer.register_forward_pre_hook(lambda m, args, model=model: calls.update({model: calls.get(model, 0) + 1}))
    out_a, loss_a = _train_step(plain, task)
    out_b, loss_b = _train_step(ckpt, task)
    # each checkpointed layer ran again in the backward pass
    assert calls == {plain: 6, ckpt: 12}
    assert torch.isfinite(loss_b)
    torch.testing.assert_close(out_b, out_a, **TIGHT)
    grads_a = dict((n, p.grad) for n, p in plain.named_parameters())
    for name, p in ckpt.named_parameters():
        if grads_a[name] is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    # every layer's weights got a gradient through the checkpointed path
    for layer in list(ckpt.encoder.layers) + list(ckpt.decoder.layers):
        assert layer.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_offloaded_layer_recomputes_a_transposed_input(data_dir, side):
    """--offload-activations on a layer whose input is a transposed view (the T x B x C transpose of the
    embeddings): torch's save_on_cpu(pin_memory=True) handed it back contiguous, the recomputed Linear layers
    saved other tensors, and torch refused the backward ("Recomputed values ... have different metadata")."""
    model, task = build(data_dir, nmt_argv("post-ln", 1, [*NO_DROPOUT, "--offload-activations"]), seed=4)
    model.train()
    stack = getattr(model, side)
    layer = stack.layers[0]
    torch.manual_seed(3)
    base = torch.randn(3, 5, 16, requires_grad=True)  # B x T x C
    enc = torch.randn(4, 3, 16) if side == "decoder" else None
    args = (enc, None, None) if side == "decoder" else (None,)
    grads = []
    for call in (layer, lambda *a, **k: stack._call_layer(layer, *a, **k)):
        model.zero_grad()
        base.grad = None
        out = call(base.transpose(0, 1), *args, carry={})[0]
        out.square().sum().backward()
        grads.append([base.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for plain, offloaded in zip(*grads):
        torch.testing.assert_close(offloaded, plain, **TIGHT)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_layerdrop(data_dir, connection):
    ld = ["--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5", *NO_DROPOUT]
    model, task = build(data_dir, nmt_argv(connection, 3, ld), seed=4)
    plain, _ = build(data_dir, nmt_argv(connection, 3, NO_DROPOUT), seed=9)
    randomize(model)
    plain.load_state_dict(model.state_dict(), strict=True)
    src, lengths, prev = batch(task.source_dictionary)

    # eval: every layer runs, so it is the plain model, and the paper's equations over all layers
    model.eval(), plain.eval()
    with torch.no_grad():
        out = model(src, lengths, prev)[0]
        torch.testing.assert_close(out, plain(src, lengths, prev)[0], rtol=0, atol=0)
        enc, pad = ref_encoder(model.encoder, src, connection)
        torch.testing.assert_close(out, ref_decoder(model.decoder, prev, enc, pad, connection), **TIGHT)

    # train: the set of layers changes from call to call (dropout is 0, so only layerdrop varies)
    model.train()
    outs = []
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(8):
            outs.append(model(src, lengths, prev)[0])
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
    assert any(not torch.allclose(o, out) for o in outs)  # some call skipped a layer
    _, loss = _train_step(model, task, seed=1)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------- --retain-dropout-modules (issue 10)
@pytest.mark.parametrize("connection", ["post-ln", "dlcl"])
def test_dropout_modules_carry_fairseqs_names(data_dir, connection):
    """fairseq's --retain-dropout-modules (Monte-Carlo dropout) selects dropout modules by their owner's class
    name: ours answer to stock fairseq's names, so the same flags work on both."""
    from fairseq.modules import FairseqDropout

    ours, _ = build(data_dir, nmt_argv(connection, 2))
    stock, _ = build(data_dir, ["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2", *DIMS])

    def names(model):
        return sorted(d.module_name for d in model.modules() if isinstance(d, FairseqDropout))

    assert names(ours) == names(stock)
    ours.eval()
    ours.make_generation_fast_(retain_dropout=True, retain_dropout_modules=["TransformerDecoderLayerBase"])
    retained = {d.module_name for d in ours.modules() if isinstance(d, FairseqDropout) and d.apply_during_inference}
    assert retained == {"TransformerDecoderLayerBase"}
