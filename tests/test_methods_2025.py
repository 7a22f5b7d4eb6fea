"""The newer methods researchers compare against (METHODS.md, "Methods of 2024-2026"): Mix-LN, LayerNorm Scaling
(LNS), LayerScale, SiameseNorm, HybridNorm (and HybridNorm*).

Each model is checked against an independent float64 recomputation of METHODS.md's formula from the model's own
submodules (attention recomputed from the projection weights), at several depths including ones where
floor(alpha L) rounds down, for the encoder-decoder and the language model; the depth constants are asserted
exactly; every method trains at 18L-18L.
"""
import math

import pytest
import torch

import b2t_fairseq  # noqa: F401
from conftest import build_model
from test_layers import batch, embed, randomize
from test_methods import F64, assert_trains_at_18_layers, lm, nmt, ref_sublayers

METHODS_2025 = ("mix-ln", "lns", "layerscale", "siamese", "hybridnorm")


def ref_stack_2025(method, stack, x, layers, post_fraction=0.25, first_pre=False):
    """METHODS.md's formula over one stack; ``layers`` holds each layer's module and its sub-layers."""
    post_ln_layers = math.floor(post_fraction * len(layers))
    y = x  # SiameseNorm's pre-norm stream
    for index, (layer, subs) in enumerate(layers):
        for name, f, norm in subs:
            if method == "siamese":
                x = getattr(layer, f"{name}_post_norm")(x)
                z = f(norm(x + getattr(layer, f"{name}_pre_norm")(y)), None)[0]
                x, y = x + z / math.sqrt(2 * (index + 1)), y + z
            elif method == "hybridnorm" and first_pre and index == 0:
                x = x + f(norm(x), None)[0]
            elif method == "hybridnorm" and name == "ffn":
                u = norm(x)
                x = u + f(u, None)[0]
            elif method == "hybridnorm":
                assert norm is None  # no layer norm on an attention's input
                x = x + f(x, None)[0]
            elif method == "mix-ln":
                x = norm(x + f(x, None)[0]) if index < post_ln_layers else x + f(norm(x), None)[0]
            elif method == "lns":
                x = x + f(norm(x) / math.sqrt(index + 1), None)[0]
            elif method == "layerscale":
                x = x + getattr(layer, f"{name}_layerscale") * f(norm(x), None)[0]
            else:
                raise AssertionError(method)
    if method == "siamese":
        return stack.layer_norm(stack.siamese_post_stream_norm(x) + stack.siamese_pre_stream_norm(y))
    return stack.layer_norm(x)


@torch.no_grad()
def ref_model_2025(method, model, src, prev, **kw):
    pad = src.eq(model.encoder.padding_idx)
    x = embed(model.encoder, src) * (~pad).t().unsqueeze(-1).to(torch.float64)
    enc_layers = [(layer, ref_sublayers(method, layer, pad=pad)) for layer in model.encoder.layers]
    enc = ref_stack_2025(method, model.encoder, x, enc_layers, **kw)
    dec_layers = [(layer, ref_sublayers(method, layer, enc=enc, enc_pad=pad, causal=True))
                  for layer in model.decoder.layers]  # fmt: skip
    y = ref_stack_2025(method, model.decoder, embed(model.decoder, prev), dec_layers, **kw)
    return model.decoder.output_projection(y.transpose(0, 1))


def _double(model):
    model.double()
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("enc,dec", [(1, 1), (3, 2), (6, 7)])
@pytest.mark.parametrize("method", METHODS_2025)
def test_model_equals_methods_formula(data_dir, method, enc, dec):
    model, task, _ = build_model(data_dir, nmt(method, enc, dec))
    _double(model)
    src, lengths, prev = batch(task.source_dictionary)
    with torch.no_grad():
        logits = model(src, lengths, prev)[0]
    torch.testing.assert_close(logits, ref_model_2025(method, model, src, prev), **F64)


def test_mix_ln_post_fraction_is_the_share_of_post_ln_layers(data_dir):
    """0.5 of 3 encoder layers rounds down to 1 Post-LN layer, of 2 decoder layers is 1."""
    model, task, _ = build_model(data_dir, nmt("mix-ln", 3, 2, extra=["--mix-ln-post-fraction", "0.5"]))
    _double(model)
    assert (model.encoder.connection.post_ln_layers, model.decoder.connection.post_ln_layers) == (1, 1)
    src, lengths, prev = batch(task.source_dictionary)
    with torch.no_grad():
        logits = model(src, lengths, prev)[0]
    torch.testing.assert_close(logits, ref_model_2025("mix-ln", model, src, prev, post_fraction=0.5), **F64)
    assert (logits - ref_model_2025("mix-ln", model, src, prev)).abs().max() > 1e-3


@pytest.mark.parametrize("layers", [1, 5])
@pytest.mark.parametrize("method", METHODS_2025)
def test_language_model_equals_methods_formula(data_dir, method, layers):
    model, task, _ = build_model(data_dir, lm(method, layers), task="language_modeling")
    _double(model)
    _, _, tokens = batch(task.source_dictionary, tgt_len=9)
    with torch.no_grad():
        logits = model(tokens)[0]
        subs = [(layer, ref_sublayers(method, layer, causal=True)) for layer in model.decoder.layers]
        y = ref_stack_2025(method, model.decoder, embed(model.decoder, tokens), subs)
        expected = model.decoder.output_projection(y.transpose(0, 1))
    torch.testing.assert_close(logits, expected, **F64)


@pytest.mark.parametrize("depth, post_ln_layers", [(6, 1), (18, 4), (100, 25)])
def test_mix_ln_post_ln_layers_per_depth(data_dir, depth, post_ln_layers):
    model, _, _ = build_model(data_dir, nmt("mix-ln", depth, 2))
    assert model.encoder.connection.post_ln_layers == post_ln_layers
    assert [layer.layer_index for layer in model.encoder.layers] == list(range(depth))


@pytest.mark.parametrize("depth, eps", [(6, 0.1), (18, 0.1), (19, 1e-5), (24, 1e-5), (25, 1e-6), (100, 1e-6)])
def test_layerscale_starts_at_cait_epsilon_per_depth(data_dir, depth, eps):
    model, _, _ = build_model(data_dir, nmt("layerscale", depth, 1))
    scales = {n: p for n, p in model.named_parameters() if n.endswith("_layerscale")}
    assert len(scales) == 2 * depth + 3  # encoder: self_attn, ffn; decoder: self_attn, encoder_attn, ffn
    for name, p in scales.items():
        expected = eps if name.startswith("encoder.") else 0.1  # the decoder has 1 layer
        assert p.shape == (16,) and torch.equal(p, torch.full_like(p, expected)), name


def test_layerscale_init_flag(data_dir):
    model, _, _ = build_model(data_dir, nmt("layerscale", 2, extra=["--layerscale-init", "0.25"]))
    assert all(torch.equal(p, torch.full_like(p, 0.25)) for n, p in model.named_parameters() if "layerscale" in n)


@pytest.mark.parametrize("argv, message", [
    (["--mix-ln-post-fraction", "1.5"], "--mix-ln-post-fraction 1.5: the fraction of Post-LN layers is in [0, 1]"),
    (["--layerscale-init", "-0.1"], "--layerscale-init -0.1: lambda starts at a positive value"),
])  # fmt: skip
def test_knob_values_out_of_range_are_one_line(data_dir, argv, message):
    from b2t_fairseq.safety.errors import B2TConfigError

    method = "mix-ln" if "mix" in argv[0] else "layerscale"
    with pytest.raises(B2TConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_model(data_dir, nmt(method, 2, extra=argv))


@pytest.mark.parametrize("method", METHODS_2025)
def test_trains_at_18_layers(data_dir, method):
    assert_trains_at_18_layers(data_dir, method)


def test_hybridnorm_star_has_a_pre_ln_first_layer(data_dir):
    model, task, _ = build_model(data_dir, nmt("hybridnorm", 3, 2, extra=["--hybridnorm-first-pre"]))
    _double(model)
    for stack in (model.encoder, model.decoder):
        norms = [layer.self_attn_layer_norm is not None for layer in stack.layers]
        assert norms == [True] + [False] * (len(norms) - 1)  # the attention's input LN exists in layer 1 only
    src, lengths, prev = batch(task.source_dictionary)
    with torch.no_grad():
        logits = model(src, lengths, prev)[0]
    torch.testing.assert_close(logits, ref_model_2025("hybridnorm", model, src, prev, first_pre=True), **F64)


def test_added_parameters_are_named_as_documented(data_dir):
    model, _, _ = build_model(data_dir, nmt("siamese", 2, 1) + ["--share-all-embeddings"])
    names = {n for n, _ in model.named_parameters()}
    for stack in ("encoder", "decoder"):
        assert {f"{stack}.siamese_post_stream_norm.weight", f"{stack}.siamese_pre_stream_norm.bias"} <= names
    assert {"decoder.layers.0.encoder_attn_post_norm.weight", "encoder.layers.1.ffn_pre_norm.bias"} <= names
    model, _, _ = build_model(data_dir, nmt("hybridnorm", 2, 1))
    names = {n for n, p in model.named_parameters()}
    for attention, d_head in (("encoder.layers.0.self_attn", 8), ("decoder.layers.0.encoder_attn", 4)):  # 16 / heads
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert model.get_parameter(f"{attention}.{proj}.head_norm.weight").shape == (d_head,)
    assert not [n for n in names if "self_attn_layer_norm" in n or "encoder_attn_layer_norm" in n]


@pytest.mark.parametrize("norm_type", ["layernorm", "rmsnorm"])
def test_every_parameter_of_every_method_gets_a_gradient(data_dir, norm_type):
    """None is left unused (DDP on GPUs refuses unused parameters unless told to look for them), for every method
    with the norm types it accepts."""
    from b2t_fairseq.modules import CONNECTIONS

    for method, connection in CONNECTIONS.items():
        if norm_type != "layernorm" and not connection.layer_norms:
            continue
        model, task, _ = build_model(data_dir, nmt(method, 2, extra=["--norm-type", norm_type]))
        src, lengths, prev = batch(task.source_dictionary)
        model.train()
        model(src, lengths, prev)[0].square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (method, missing)
