"""The deep-Transformer methods beside B2T (METHODS.md): DeepNet, Admin, T-Fixup, ReZero, Peri-LN (wired
inside a layer) and DLCL, RealFormer, ResiDual, Sub-LN (which also act across layers or inside attention).

Each model is checked against an independent recomputation of METHODS.md's formula from the model's own
parameters (float64, eval mode, several depths; attention recomputed from the projection weights where the
method changes it); the init constants are recomputed here from the formulas and checked against a same-seed
post-ln build with fairseq's init; every method trains at 18L-18L.
"""
import importlib
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import b2t_fairseq  # noqa: F401
from conftest import build_model, parse_args
from test_layers import (
    DIMS, LM_DIMS, NO_DROPOUT, assert_incremental_equals_full, batch, causal_mask, cross_attn, embed, randomize,
    self_attn,
)

LAYER_METHODS = ("deepnorm", "admin", "tfixup", "rezero", "peri-ln")
STACK_METHODS = ("dlcl", "realformer", "resi-dual", "sub-ln")
NEW_METHODS = LAYER_METHODS + STACK_METHODS
LM_METHODS = ("deepnorm", "admin", "rezero", "peri-ln", *STACK_METHODS)  # T-Fixup has no decoder-only form
F64 = dict(rtol=1e-10, atol=1e-10)


def nmt(method, enc, dec=None, extra=()):
    dec = enc if dec is None else dec
    return ["--arch", "transformer_b2t", "--connection", method, "--encoder-layers", str(enc),
            "--decoder-layers", str(dec), *DIMS, *extra]  # fmt: skip


def lm(method, layers, extra=()):
    return ["--arch", "transformer_lm_b2t", "--connection", method, "--decoder-layers", str(layers), *LM_DIMS, *extra]


# ------------------------------------------------------------------------------- METHODS.md's formulas
def deepnorm_alpha(side, n, m):
    if side == "encoder":
        return 0.81 * (n**4 * m) ** 0.0625
    if side == "decoder":
        return (3 * m) ** 0.25
    return (2 * m) ** 0.25


def ref_sublayer(method, layer, name, x, fx_of, norm_name, alpha):
    """One sub-layer; ``fx_of(h)`` applies the sub-layer F to h."""
    norm = getattr(layer, norm_name, None)
    if method == "deepnorm":
        return norm(alpha * x + fx_of(x))
    if method == "admin":
        return norm(getattr(layer, f"{name}_omega") * x + fx_of(x))
    if method == "tfixup":
        return x + fx_of(x)
    if method == "rezero":
        return x + getattr(layer, f"{name}_rezero_a") * fx_of(x)
    if method == "peri-ln":
        return x + getattr(layer, f"{name}_out_layer_norm")(fx_of(norm(x)))
    raise AssertionError(method)


def ffn(layer):
    return lambda h: layer.fc2(F.relu(layer.fc1(h)))


def ref_encoder_layer(method, layer, x, pad, alpha):
    x = ref_sublayer(method, layer, "self_attn", x, lambda h: self_attn(layer, h, pad), "self_attn_layer_norm", alpha)
    return ref_sublayer(method, layer, "ffn", x, ffn(layer), "final_layer_norm", alpha)


def ref_decoder_layer(method, layer, x, enc, pad, alpha):
    mask = causal_mask(x.size(0)).to(x.dtype)
    x = ref_sublayer(
        method, layer, "self_attn", x, lambda h: self_attn(layer, h, attn_mask=mask), "self_attn_layer_norm", alpha
    )
    if enc is not None:
        x = ref_sublayer(
            method, layer, "encoder_attn", x, lambda h: cross_attn(layer, h, enc, pad), "encoder_attn_layer_norm", alpha
        )
    return ref_sublayer(method, layer, "ffn", x, ffn(layer), "final_layer_norm", alpha)


def final(method, stack, x):
    if method == "peri-ln":
        return stack.layer_norm(x)
    assert stack.layer_norm is None
    return x


@torch.no_grad()
def ref_model(method, model, src, prev, n, m):
    pad = src.eq(model.encoder.padding_idx)
    x = embed(model.encoder, src) * (~pad).t().unsqueeze(-1).to(torch.float64)
    for layer in model.encoder.layers._modules.values():
        x = ref_encoder_layer(method, layer, x, pad, deepnorm_alpha("encoder", n, m))
    enc = final(method, model.encoder, x)
    y = embed(model.decoder, prev)
    for layer in model.decoder.layers._modules.values():
        y = ref_decoder_layer(method, layer, y, enc, pad, deepnorm_alpha("decoder", n, m))
    return model.decoder.output_projection(final(method, model.decoder, y).transpose(0, 1))


def attention(mha, query, memory, key_padding_mask=None, attn_mask=None, previous=None, inner_norm=None,
              fp32_softmax=False, head_norms=False):
    """Multi-head attention recomputed from ``mha``'s projection weights. Returns the output and the raw
    scores Q K^T / sqrt(d_head) (+ ``previous``, RealFormer's) before masks; ``inner_norm`` (Sub-LN) acts on the
    heads' concatenated output before out_proj; ``head_norms`` (HybridNorm): each projection's ``head_norm`` weight
    and bias in a layer norm over each head's features. ``fp32_softmax``: as fairseq's unfused attention
    (cross-attention, and self-attention where the method needs the unfused path), the softmax in float32."""
    t, b, c = query.shape
    h = mha.num_heads
    d = c // h

    def heads(y, proj):  # T x B x C -> B x H x T x d
        y = F.linear(y, proj.weight, proj.bias).reshape(y.size(0), b, h, d)
        if head_norms:
            y = F.layer_norm(y, (d,), proj.head_norm.weight, proj.head_norm.bias, proj.head_norm.eps)
        return y.permute(1, 2, 0, 3)

    q = heads(query, mha.q_proj) * d**-0.5
    k = heads(memory, mha.k_proj)
    v = heads(memory, mha.v_proj)
    scores = q @ k.transpose(-1, -2)
    if previous is not None:
        scores = scores + previous
    masked = scores if attn_mask is None else scores + attn_mask
    if key_padding_mask is not None:
        masked = masked.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = masked.float().softmax(-1).to(masked.dtype) if fp32_softmax else masked.softmax(-1)
    out = (probs @ v).permute(2, 0, 1, 3).reshape(t, b, c)
    if inner_norm is not None:
        out = inner_norm(out)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias), scores


def ref_sublayers(method, layer, pad=None, enc=None, enc_pad=None, causal=False):
    """A layer as (name, F(h, previous scores) -> (output, scores), its layer norm) per sub-layer."""
    sub_ln = method == "sub-ln"
    unfused = method in ("realformer", "sub-ln", "hybridnorm")  # they need the scores / the projections' outputs
    qkv_norms = method == "hybridnorm"

    def self_f(h, previous):
        mask = causal_mask(h.size(0)).to(h.dtype) if causal else None
        inner = layer.self_attn.out_proj.sub_layer_norm if sub_ln else None
        return attention(layer.self_attn, h, h, pad, mask, previous, inner, fp32_softmax=unfused, head_norms=qkv_norms)

    def ffn_f(h, previous):
        h = F.relu(F.linear(h, layer.fc1.weight, layer.fc1.bias))
        if sub_ln:
            h = layer.fc2.sub_layer_norm(h)
        return F.linear(h, layer.fc2.weight, layer.fc2.bias), None

    subs = [("self_attn", self_f, layer.self_attn_layer_norm)]
    if enc is not None:
        subs.append(("encoder_attn", lambda h, p: attention(layer.encoder_attn, h, enc, enc_pad, None, p,
                     fp32_softmax=True, head_norms=qkv_norms), layer.encoder_attn_layer_norm))  # fmt: skip
    return subs + [("ffn", ffn_f, layer.final_layer_norm)]


def ref_stack(method, stack, x, layers, alpha=1.0):
    """METHODS.md's stack for DLCL, RealFormer, ResiDual, Sub-LN; ``layers`` holds each layer's sub-layers."""
    history, dual, scores = [x], x, {}
    for index, subs in enumerate(layers):
        if method == "dlcl":  # the input of layer l+1: sum_k W[l, k] LN_k(y_k), y_0 = the embeddings
            x = sum(stack.dlcl_weights[index, k] * y for k, y in enumerate(history))
        for name, f, norm in subs:
            if method in ("dlcl", "sub-ln"):  # Pre-LN layers
                x = x + f(norm(x), None)[0]
                continue
            out, s = f(x, scores.get(name) if method == "realformer" else None)
            scores[name] = s
            dual = dual + out
            x = norm(x + out)
        if method == "dlcl":
            history.append(stack.dlcl_layer_norms[index](x))
    if method == "dlcl":
        return stack.layer_norm(sum(stack.dlcl_weights[len(layers), k] * y for k, y in enumerate(history)))
    if method == "resi-dual":
        return alpha * x + stack.layer_norm(dual)
    if method == "sub-ln":
        return stack.layer_norm(x)
    assert stack.layer_norm is None
    return x


@torch.no_grad()
def ref_stack_model(method, model, src, prev, alpha=1.0):
    pad = src.eq(model.encoder.padding_idx)
    x = embed(model.encoder, src) * (~pad).t().unsqueeze(-1).to(torch.float64)
    enc_layers = [ref_sublayers(method, layer, pad=pad) for layer in model.encoder.layers]
    enc = ref_stack(method, model.encoder, x, enc_layers, alpha)
    dec_layers = [ref_sublayers(method, layer, enc=enc, enc_pad=pad, causal=True) for layer in model.decoder.layers]
    y = ref_stack(method, model.decoder, embed(model.decoder, prev), dec_layers, alpha)
    return model.decoder.output_projection(y.transpose(0, 1))


@pytest.mark.parametrize("enc,dec", [(1, 1), (3, 2), (6, 6)])
@pytest.mark.parametrize("method", NEW_METHODS)
def test_model_equals_methods_formula(data_dir, method, enc, dec):
    model, task, _ = build_model(data_dir, nmt(method, enc, dec))
    model.double()
    randomize(model)
    model.eval()
    src, lengths, prev = batch(task.source_dictionary)
    assert src.eq(task.source_dictionary.pad()).any()
    with torch.no_grad():
        logits = model(src, lengths, prev)[0]
    if method in STACK_METHODS:
        expected = ref_stack_model(method, model, src, prev)
    else:
        expected = ref_model(method, model, src, prev, enc, dec)
    torch.testing.assert_close(logits, expected, **F64)


def test_resi_dual_alpha_scales_the_post_ln_stream(data_dir):
    model, task, _ = build_model(data_dir, nmt("resi-dual", 3, 2, extra=["--resi-dual-alpha", "0.5"]))
    model.double()
    randomize(model)
    model.eval()
    src, lengths, prev = batch(task.source_dictionary)
    with torch.no_grad():
        logits = model(src, lengths, prev)[0]
    torch.testing.assert_close(logits, ref_stack_model("resi-dual", model, src, prev, alpha=0.5), **F64)
    assert (logits - ref_stack_model("resi-dual", model, src, prev, alpha=1.0)).abs().max() > 1e-3


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("method", LM_METHODS)
def test_language_model_equals_methods_formula(data_dir, method, layers):
    model, task, _ = build_model(data_dir, lm(method, layers), task="language_modeling")
    model.double()
    randomize(model)
    model.eval()
    _, _, tokens = batch(task.source_dictionary, tgt_len=9)
    with torch.no_grad():
        logits = model(tokens)[0]
        y = embed(model.decoder, tokens)
        if method in STACK_METHODS:
            subs = [ref_sublayers(method, layer, causal=True) for layer in model.decoder.layers]
            y = ref_stack(method, model.decoder, y, subs)
        else:
            for layer in model.decoder.layers._modules.values():
                y = ref_decoder_layer(method, layer, y, None, None, deepnorm_alpha("decoder-only", None, layers))
            y = final(method, model.decoder, y)
        expected = model.decoder.output_projection(y.transpose(0, 1))
    torch.testing.assert_close(logits, expected, **F64)


def test_methods_differ_from_each_other_with_identical_weights(data_dir):
    """Load one set of shared weights into every method: all outputs differ pairwise (no method is a no-op)."""
    outs = {}
    for method in ("post-ln", "deepnorm", "admin", "tfixup", "rezero", "dlcl", "realformer", "resi-dual", "sub-ln"):
        model, task, _ = build_model(data_dir, nmt(method, 2, extra=["--init-scaling", "none"]), seed=3)
        randomize(model, seed=4)
        model.eval()
        src, lengths, prev = batch(task.source_dictionary)
        with torch.no_grad():
            outs[method] = model(src, lengths, prev)[0]
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


# ------------------------------------------------------------------------------- parameters and names
def test_added_parameters_are_plainly_named_and_lns_removed(data_dir):
    post, _, _ = build_model(data_dir, nmt("post-ln", 2))
    base = set(post.state_dict())
    added = {
        "admin": {"_omega"},
        "rezero": {"_rezero_a"},
        "peri-ln": {"_out_layer_norm.weight", "_out_layer_norm.bias", "encoder.layer_norm.", "decoder.layer_norm."},
        "deepnorm": set(),
        "tfixup": set(),
        "dlcl": {"coder.dlcl_weights", "coder.dlcl_layer_norms.", "encoder.layer_norm.", "decoder.layer_norm."},
        "realformer": set(),
        "resi-dual": {"encoder.layer_norm.", "decoder.layer_norm."},
        "sub-ln": {"self_attn.out_proj.sub_layer_norm.", "fc2.sub_layer_norm.", "encoder.layer_norm.",
                   "decoder.layer_norm."},  # fmt: skip
    }
    for method, suffixes in added.items():
        model, _, _ = build_model(data_dir, nmt(method, 2))
        keys = set(model.state_dict())
        extra = keys - base
        if method in ("tfixup", "rezero"):  # no layer norm anywhere
            assert not any("layer_norm" in k for k in keys), method
            assert base - keys == {k for k in base if "layer_norm" in k}
        else:
            assert base <= keys, method
        assert all(any(s in k for s in suffixes) for k in extra), (method, sorted(extra)[:4])
        assert bool(extra) == bool(suffixes), method
    sub_ln, _, _ = build_model(data_dir, nmt("sub-ln", 2))
    assert not hasattr(sub_ln.decoder.layers[0].encoder_attn.out_proj, "sub_layer_norm")  # self-attention only
    dlcl, _, _ = build_model(data_dir, nmt("dlcl", 2, 3))
    assert dlcl.encoder.dlcl_weights.shape == (3, 3) and dlcl.decoder.dlcl_weights.shape == (4, 4)
    assert len(dlcl.encoder.dlcl_layer_norms) == 2 and len(dlcl.decoder.dlcl_layer_norms) == 3
    admin, _, _ = build_model(data_dir, nmt("admin", 2))
    dec = admin.decoder.layers[0]
    assert {n for n, _ in dec.named_parameters() if n.endswith("_omega")} == {
        "self_attn_omega", "encoder_attn_omega", "ffn_omega"}  # fmt: skip
    assert dec.ffn_omega.shape == (16,)


# ------------------------------------------------------------------------------- init constants
# METHODS.md's table, N = M: deepnorm enc beta, dec beta; admin omega enc, dec; tfixup enc, dec
TABLE = {
    6: dict(deepnorm=(0.497, 0.343), admin=(2.017, 2.335), tfixup=(0.428, 0.369)),
    18: dict(deepnorm=(0.353, 0.261), admin=(3.041, 3.567), tfixup=(0.325, 0.280)),
    100: dict(deepnorm=(0.206, 0.170), admin=(6.075, 7.193), tfixup=(0.212, 0.183)),
}
SCALED = {"self_attn.v_proj.weight", "self_attn.out_proj.weight", "encoder_attn.v_proj.weight",
          "encoder_attn.out_proj.weight", "fc1.weight", "fc2.weight"}  # fmt: skip
TINY_DEEP = (
    "--encoder-embed-dim 8 --decoder-embed-dim 8 --encoder-ffn-embed-dim 8 --decoder-ffn-embed-dim 8 "
    "--encoder-attention-heads 2 --decoder-attention-heads 2"
).split()


def _ratios(model, reference):
    """{parameter name: scalar ratio} where model's parameter is a scalar multiple of reference's."""
    ref = reference.state_dict()
    out = {}
    for name, p in model.state_dict().items():
        if name not in ref or not p.is_floating_point():
            continue
        r = ref[name]
        mask = r.abs() > 1e-6
        if not mask.any():
            assert torch.equal(p, r), name
            continue
        ratio = p[mask] / r[mask]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5), name
        out[name] = ratio[0].item()
    return out


@pytest.mark.parametrize("depth", [6, 18, 100])
@pytest.mark.parametrize("method", ["deepnorm", "tfixup"])
def test_init_constants_and_exactly_the_listed_parameters(data_dir, method, depth):
    argv = ["--encoder-layers", str(depth), "--decoder-layers", str(depth), *TINY_DEEP]
    model, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", method, *argv], seed=7)
    post, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", "post-ln", *argv], seed=7)
    enc_c, dec_c = TABLE[depth][method]
    n = m = depth
    exact = {
        "deepnorm": (0.87 * (n**4 * m) ** (-1 / 16), (12 * m) ** -0.25),
        "tfixup": (0.67 * n**-0.25, (9 * m) ** -0.25),
    }[method]
    assert round(exact[0], 3) == enc_c and round(exact[1], 3) == dec_c  # the table is the formula
    ratios = _ratios(model, post)
    for name, ratio in ratios.items():
        stack, _, rest = name.partition(".layers.")
        sub = rest.split(".", 1)[1] if rest else None
        want = 1.0
        if sub in SCALED:
            want = exact[0] if stack == "encoder" else exact[1]
            if method == "tfixup" and sub.endswith("v_proj.weight"):
                want *= math.sqrt(2)  # reference: undo fairseq's xavier gain 1/sqrt(2) on v
        elif method == "tfixup" and name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            want = (9 * (n if stack == "encoder" else m)) ** -0.25
        assert ratio == pytest.approx(want, rel=1e-5), name


# Sub-LN's gamma (torchscale --subln), N = M: encoder sqrt(ln(3M) ln(2N) / 3), decoder sqrt(ln 3M)
SUBLN_GAMMA = {6: (1.547, 1.700), 18: (2.183, 1.997), 100: (3.174, 2.388)}
SUBLN_SCALED = {f"{m}.{p}" for m in ("self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2") for p in ("weight", "bias")}


@pytest.mark.parametrize("depth", [6, 18, 100])
def test_subln_gamma_on_exactly_the_listed_parameters(data_dir, depth):
    argv = ["--encoder-layers", str(depth), "--decoder-layers", str(depth), *TINY_DEEP]
    model, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", "sub-ln", *argv], seed=7)
    post, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", "post-ln", *argv], seed=7)
    n = m = depth
    exact = (math.sqrt(math.log(3 * m) * math.log(2 * n) / 3), math.sqrt(math.log(3 * m)))
    assert (round(exact[0], 3), round(exact[1], 3)) == SUBLN_GAMMA[depth]
    seen = set()
    for name, ratio in _ratios(model, post).items():
        stack, _, rest = name.partition(".layers.")
        sub = rest.split(".", 1)[1] if rest else None
        want = (exact[0] if stack == "encoder" else exact[1]) if sub in SUBLN_SCALED else 1.0
        if sub in SUBLN_SCALED:
            seen.add(sub)
        assert ratio == pytest.approx(want, rel=1e-5), name
    # every listed weight was compared (fairseq's zero biases have no ratio: they stay zero)
    assert {s for s in SUBLN_SCALED if s.endswith("weight")} <= seen and "fc1.bias" in seen
    lm_model, _, _ = build_model(
        data_dir, lm("sub-ln", depth, ["--decoder-embed-dim", "8", "--decoder-ffn-embed-dim", "8"]),
        task="language_modeling", seed=7,
    )
    lm_post, _, _ = build_model(
        data_dir, lm("post-ln", depth, ["--decoder-embed-dim", "8", "--decoder-ffn-embed-dim", "8"]),
        task="language_modeling", seed=7,
    )
    ratios = _ratios(lm_model, lm_post)
    assert ratios["decoder.layers.0.fc1.weight"] == pytest.approx(math.sqrt(math.log(2 * depth)), rel=1e-5)


def test_dlcl_weights_start_as_row_averages(data_dir):
    model, _, _ = build_model(data_dir, nmt("dlcl", 4, 2))
    for stack, n in ((model.encoder, 4), (model.decoder, 2)):
        w = stack.dlcl_weights.detach()
        for row in range(n + 1):
            assert torch.equal(w[row, : row + 1], torch.full((row + 1,), 1.0 / (row + 1))), row
            assert not w[row, row + 1 :].any(), row


def test_tfixup_shared_embeddings_scaled_once(data_dir):
    argv = ["--encoder-layers", "6", "--decoder-layers", "6", *TINY_DEEP, "--share-all-embeddings"]
    model, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", "tfixup", *argv], seed=2)
    post, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", "post-ln", *argv], seed=2)
    assert model.encoder.embed_tokens is model.decoder.embed_tokens
    ratio = _ratios(model, post)["encoder.embed_tokens.weight"]
    assert ratio == pytest.approx(54**-0.25, rel=1e-6)


@pytest.mark.parametrize("depth", [6, 18, 100])
def test_admin_omega_and_rezero_start(data_dir, depth):
    argv = ["--encoder-layers", str(depth), "--decoder-layers", str(depth), *TINY_DEEP]
    admin, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", "admin", *argv])
    enc_w, dec_w = TABLE[depth]["admin"]
    for stack, n, want in (("encoder", 2 * depth, enc_w), ("decoder", 3 * depth, dec_w)):
        exact = math.sqrt((n + 1) / math.log(n + 1) - 1)
        assert round(exact, 3) == want
        omegas = [p for k, p in getattr(admin, stack).named_parameters() if k.endswith("_omega")]
        assert len(omegas) == depth * (2 if stack == "encoder" else 3)
        assert all(torch.allclose(p, torch.full_like(p, exact)) for p in omegas)
    rezero, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", "rezero", *argv])
    a = [p for k, p in rezero.named_parameters() if k.endswith("_rezero_a")]
    assert len(a) == 5 * depth and all(p.item() == 0.0 for p in a)


def test_admin_output_change_forms(data_dir):
    argv = nmt("admin", 3)
    for form, want in (("O(n)", 1.0), ("O(1)", math.sqrt(6))):
        model, _, _ = build_model(data_dir, [*argv, "--admin-output-change", form])
        assert torch.allclose(model.encoder.layers[0].ffn_omega, torch.full((16,), want))


def test_foreign_init_rule_is_allowed_and_logged(data_dir, caplog):
    with caplog.at_level("INFO"):
        model, _, _ = build_model(data_dir, nmt("admin", 2, extra=["--init-scaling", "deepnorm"]))
    assert "not the method's own initialisation" in caplog.text
    assert parse_args(data_dir, nmt("deepnorm", 2)).init_scaling == "deepnorm"
    assert parse_args(data_dir, nmt("tfixup", 2)).init_scaling == "tfixup"
    assert parse_args(data_dir, nmt("rezero", 2)).init_scaling == "none"


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "argv,task,message",
    [
        (nmt("tfixup", 2, extra=["--encoder-normalize-before"]), "translation", "--encoder-normalize-before"),
        (nmt("deepnorm", 2, extra=["--admin-output-change", "O(n)"]), "translation", "only applies to"),
        (nmt("rezero", 2, extra=["--layernorm-embedding"]), "translation", "--layernorm-embedding"),
        (lm("tfixup", 2), "language_modeling", "encoder-decoder models only"),
        (nmt("b2t", 2, extra=["--resi-dual-alpha", "0.5"]), "translation", "only applies to --connection resi-dual"),
        (nmt("dlcl", 2, extra=["--decoder-layerdrop", "0.2"]), "translation", "--decoder-layerdrop"),
    ],
)
def test_contradicting_flags_fail_with_the_fix(data_dir, argv, task, message):
    from b2t_fairseq.safety.errors import B2TConfigError

    with pytest.raises(B2TConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args(data_dir, argv, task)


def test_unknown_method_lists_the_valid_ones(data_dir, capsys):
    with pytest.raises(SystemExit):
        parse_args(data_dir, nmt("fixup", 2))
    err = capsys.readouterr().err
    assert all(m in err for m in ("b2t", "post-ln", "pre-ln", *NEW_METHODS))


# ------------------------------------------------------------------------------- decoding and training
@pytest.mark.parametrize("method", NEW_METHODS)
def test_incremental_decoding_matches_teacher_forcing(data_dir, method):
    model, task, _ = build_model(data_dir, nmt(method, 3))
    model.double()
    randomize(model)
    if not model.encoder.connection.layer_norms:
        # without layer norms (T-Fixup, ReZero) randomized weights give logits in the hundreds, where the
        # float32 softmax of fairseq's incremental attention path alone differs by more than 1e-5
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(0.3)
    model.eval()
    assert_incremental_equals_full(model, task)


def assert_trains_at_18_layers(data_dir, method, lr=1e-3, extra=(), falls_to=0.7):
    """18L-18L at width 16: 40 Adam steps on one batch, losses finite and falling (the last below ``falls_to`` times
    the first)."""
    model, task, _ = build_model(data_dir, nmt(method, 18, extra=[*NO_DROPOUT, *extra]), seed=1)
    src, lengths, prev = batch(task.source_dictionary, bsz=4, tgt_len=6)
    target = prev.roll(-1, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        out = model(src, lengths, prev)[0]
        loss = F.cross_entropy(out.reshape(-1, out.size(-1)), target.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < falls_to * losses[0], losses[::8]


@pytest.mark.parametrize("method", NEW_METHODS)
def test_trains_at_18_layers(data_dir, method):
    assert_trains_at_18_layers(data_dir, method, lr=1e-3 if method != "tfixup" else 3e-4)


# ------------------------------------------------------------------------------- against the reference library
def test_admin_equals_admin_torch(data_dir):
    """admin-torch's own OmegaResidual (as_parameter=True, as METHODS.md's learnable omega) sets the initial
    omega of every sub-layer, and with our trained-away omega copied into it computes the same layer."""
    admin_torch = pytest.importorskip("admin_torch", reason="admin-torch is installed by `make test` (Makefile DEPS)")
    model, task, _ = build_model(data_dir, nmt("admin", 4, 3))
    for stack, n in (("encoder", 2 * 4), ("decoder", 3 * 3)):
        for layer in getattr(model, stack).layers:
            for name, p in layer.named_parameters():
                if name.endswith("_omega"):
                    reference = admin_torch.as_module(n, as_parameter=True, embed_dim=16)
                    assert torch.equal(p.detach(), reference.omega.detach()), (stack, name)
    model.double()
    randomize(model)
    model.eval()
    layer = model.encoder.layers[1]
    residual = {}
    for name in ("self_attn", "ffn"):
        residual[name] = admin_torch.as_module(8, as_parameter=True, embed_dim=16).double()
        with torch.no_grad():
            residual[name].omega.copy_(getattr(layer, f"{name}_omega"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 2, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        h = layer.self_attn_layer_norm(residual["self_attn"](x, self_attn(layer, x)))
        expected = layer.final_layer_norm(residual["ffn"](h, ffn(layer)(h)))
        torch.testing.assert_close(layer(x, encoder_padding_mask=None), expected, **F64)


def _torchscale(monkeypatch):
    """torchscale 0.3.0 (test-only; `make test` installs it without its dependencies). Its modules import
    fairscale (activation checkpointing, FSDP) and timm (drop path) at the top, and use them only when those
    are switched on; where the packages are absent, stand-ins that fail when called take their place."""
    if importlib.util.find_spec("torchscale") is None:
        pytest.skip("torchscale is installed by `make test` (Makefile TEST_NODEPS)")

    def unused(*args, **kwargs):
        raise AssertionError("the compared torchscale layers must not use fairscale or timm")

    stand_ins = {"fairscale": {}, "fairscale.nn": {"checkpoint_wrapper": unused, "wrap": unused}, "timm": {},
                 "timm.models": {}, "timm.models.layers": {"drop_path": unused}}  # fmt: skip
    for name, attrs in stand_ins.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            monkeypatch.setitem(sys.modules, name, module)
    from torchscale.architecture.config import EncoderDecoderConfig
    from torchscale.architecture.decoder import DecoderLayer
    from torchscale.architecture.encoder import EncoderLayer

    return EncoderDecoderConfig, EncoderLayer, DecoderLayer


# our parameter names -> torchscale's (FeedForwardNetwork holds fc1/fc2; Sub-LN's norms are siblings there)
TORCHSCALE_NAMES = (("fc1.", "ffn.fc1."), ("fc2.sub_layer_norm.", "ffn.ffn_layernorm."), ("fc2.", "ffn.fc2."),
                    ("self_attn.out_proj.sub_layer_norm.", "self_attn.inner_attn_ln."))  # fmt: skip


def _as_torchscale(state):
    out = {}
    for name, value in state.items():
        for ours, theirs in TORCHSCALE_NAMES:
            if name.startswith(ours):
                name = theirs + name[len(ours):]
                break
        out[name] = value
    return out


@pytest.mark.parametrize("method", ["deepnorm", "sub-ln"])
def test_deepnorm_and_subln_layers_equal_torchscale(data_dir, method, monkeypatch):
    """torchscale's own EncoderLayer / DecoderLayer (deepnorm=True, or subln=True), with our weights copied in,
    compute what our layers compute, in float64: DeepNet's alpha, Sub-LN's extra norms and their places."""
    config_cls, encoder_layer, decoder_layer = _torchscale(monkeypatch)
    n, m = 4, 3
    model, task, _ = build_model(data_dir, nmt(method, n, m))
    model.double()
    randomize(model)
    model.eval()
    config = config_cls(
        encoder_embed_dim=16, decoder_embed_dim=16, encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=4, encoder_layers=n, decoder_layers=m,  # as DIMS
        activation_fn="relu", deepnorm=method == "deepnorm", subln=method == "sub-ln",
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 16, generator=g, dtype=torch.float64)  # T x B x C (torchscale: B x T x C)
    enc = torch.randn(5, 2, 16, generator=g, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [True, True, False, False, False]])
    ours_enc, ours_dec = model.encoder.layers[1], model.decoder.layers[1]
    ref_enc = encoder_layer(config, depth=1, is_encoder_decoder=True).double().eval()
    ref_dec = decoder_layer(config, depth=1, is_encoder_decoder=True).double().eval()
    ref_enc.load_state_dict(_as_torchscale(ours_enc.state_dict()), strict=True)
    ref_dec.load_state_dict(_as_torchscale(ours_dec.state_dict()), strict=True)
    if method == "deepnorm":  # the residual weight itself, as torchscale computes it
        assert ref_enc.alpha == pytest.approx(deepnorm_alpha("encoder", n, m), rel=1e-12)
        assert ref_dec.alpha == pytest.approx(deepnorm_alpha("decoder", n, m), rel=1e-12)
    # torchscale's softmax runs in float32 even for float64 inputs: agreement to ~1e-7, not 1e-10
    close = dict(rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        expected = ref_enc(enc.transpose(0, 1), encoder_padding_mask=pad)[0].transpose(0, 1)
        torch.testing.assert_close(ours_enc(enc, encoder_padding_mask=pad), expected, **close)
        mask = causal_mask(6).to(torch.float64)
        expected = ref_dec(x.transpose(0, 1), encoder_out=enc.transpose(0, 1), encoder_padding_mask=pad,
                           self_attn_mask=mask)[0].transpose(0, 1)  # fmt: skip
        got = ours_dec(x, enc, pad, self_attn_mask=mask)[0]
        torch.testing.assert_close(got, expected, **close)
