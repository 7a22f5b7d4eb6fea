"""The authors' depth-scaled init (``--init-scaling``) and word dropout (``--sampling-method worddrop``)."""
import math
import re

import pytest
import torch

import b2t_fairseq  # noqa: F401  (registers the models)
from conftest import PLUGIN_DIR, build_model, parse_args  # noqa: F401

DIMS = (
    "--encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 "
    "--encoder-attention-heads 2 --decoder-attention-heads 2"
).split()
LM_DIMS = (
    "--decoder-embed-dim 16 --decoder-input-dim 16 --decoder-output-dim 16 --decoder-ffn-embed-dim 32 "
    "--decoder-attention-heads 2 --tokens-per-sample 64"
).split()
NO_DROPOUT = "--dropout 0 --attention-dropout 0 --activation-dropout 0".split()

# the weight matrices inside a layer that the authors' rescaling_init multiplies by N^-1/2
SCALED = re.compile(
    r"^(encoder|decoder)\.layers\.\d+\."
    r"(?:(?:self_attn|encoder_attn)\.(?:q|k|v|out)_proj|fc1|fc2)\.weight$"
)


def parse(data_dir, argv, task="translation"):
    return parse_args(data_dir, argv, task)


build = build_model


def nmt(connection, enc_layers, dec_layers, *extra):
    return [
        "--arch", "transformer_b2t", "--connection", connection,
        "--encoder-layers", str(enc_layers), "--decoder-layers", str(dec_layers), *DIMS, *extra,
    ]  # fmt: skip


# ============================================================================ init scaling
def _compare_scaling(scaled_model, plain_model, factors):
    """Every scaled parameter is factor x plain; everything else is bit-identical. Returns the scaled names."""
    plain = dict(plain_model.named_parameters())
    scaled_names = []
    for name, p in scaled_model.named_parameters():
        q = plain[name]
        m = SCALED.match(name)
        if m:
            factor = factors[m.group(1)]
            torch.testing.assert_close(p, q * factor, rtol=1e-6, atol=0, msg=name)
            assert factor == 1.0 or not torch.equal(p, q), name
            scaled_names.append(name)
        else:
            assert torch.equal(p, q), f"{name} should not be rescaled"
    assert plain.keys() == dict(scaled_model.named_parameters()).keys()
    return scaled_names


@pytest.mark.parametrize(
    "enc_layers,dec_layers,extra",
    [
        (3, 5, []),
        (5, 3, []),
        (1, 2, []),
        (3, 5, ["--share-all-embeddings"]),
        (3, 5, ["--checkpoint-activations"]),
        # fairseq's LayerDropModuleList skips layers when iterated in training mode (and a fresh model is in
        # training mode): every layer must still be scaled
        (3, 5, ["--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5"]),
    ],
)
def test_depth_scaling_touches_exactly_the_layer_weight_matrices(data_dir, enc_layers, dec_layers, extra):
    scaled, _, args = build(data_dir, nmt("b2t", enc_layers, dec_layers, "--init-scaling", "depth", *extra), seed=3)
    plain, _, args_none = build(data_dir, nmt("b2t", enc_layers, dec_layers, "--init-scaling", "none", *extra), seed=3)
    assert args.init_scaling == "depth" and args_none.init_scaling == "none"
    names = _compare_scaling(scaled, plain, {"encoder": enc_layers**-0.5, "decoder": dec_layers**-0.5})
    # q, k, v, out, fc1, fc2 per encoder layer; self q/k/v/out, cross q/k/v/out, fc1, fc2 per decoder layer
    assert len(names) == 6 * enc_layers + 10 * dec_layers
    for i in range(enc_layers):
        assert f"encoder.layers.{i}.fc2.weight" in names
    for i in range(dec_layers):
        assert f"decoder.layers.{i}.encoder_attn.k_proj.weight" in names


def test_depth_factor_values(data_dir):
    # PAPER.md: N=6: 0.408, 18: 0.236, 100: 0.1
    for n, expected in ((6, 0.408), (18, 0.236), (100, 0.1)):
        assert math.isclose(n**-0.5, expected, abs_tol=5e-4)
    scaled, _, _ = build(data_dir, nmt("b2t", 6, 6, "--init-scaling", "depth"), seed=3)
    plain, _, _ = build(data_dir, nmt("b2t", 6, 6, "--init-scaling", "none"), seed=3)
    ratio = scaled.encoder.layers[2].fc1.weight / plain.encoder.layers[2].fc1.weight
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.408), rtol=0, atol=5e-4)


def test_default_is_depth_for_b2t(data_dir):
    default, _, args = build(data_dir, nmt("b2t", 3, 5), seed=3)
    plain, _, _ = build(data_dir, nmt("b2t", 3, 5, "--init-scaling", "none"), seed=3)
    assert args.init_scaling == "depth"
    assert len(_compare_scaling(default, plain, {"encoder": 3**-0.5, "decoder": 5**-0.5})) == 6 * 3 + 10 * 5
    # the authors' spelling gets the same default
    authors, _, args = build(
        data_dir, ["--arch", "transformer_b2t", "--residual-bottom-to-top", "--encoder-layers", "3",
                   "--decoder-layers", "5", *DIMS], seed=3,
    )  # fmt: skip
    assert args.connection == "b2t" and args.init_scaling == "depth"
    _compare_scaling(authors, plain, {"encoder": 3**-0.5, "decoder": 5**-0.5})


@pytest.mark.parametrize("connection", ["post-ln", "pre-ln"])
def test_default_is_none_for_baselines(data_dir, connection):
    default, _, args = build(data_dir, nmt(connection, 3, 5), seed=3)
    plain, _, _ = build(data_dir, nmt(connection, 3, 5, "--init-scaling", "none"), seed=3)
    assert args.init_scaling == "none"
    sd_a, sd_b = default.state_dict(), plain.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # ... but it can be switched on for them too
    scaled, _, _ = build(data_dir, nmt(connection, 3, 5, "--init-scaling", "depth"), seed=3)
    assert len(_compare_scaling(scaled, plain, {"encoder": 3**-0.5, "decoder": 5**-0.5})) == 6 * 3 + 10 * 5


@pytest.mark.parametrize("connection,default", [("b2t", "depth"), ("post-ln", "none"), ("pre-ln", "none")])
def test_lm_init_scaling(data_dir, connection, default):
    argv = ["--arch", "transformer_lm_b2t", "--connection", connection, "--decoder-layers", "4", *LM_DIMS]
    dflt, _, args = build(data_dir, argv, task="language_modeling", seed=3)
    plain, _, _ = build(data_dir, argv + ["--init-scaling", "none"], task="language_modeling", seed=3)
    scaled, _, _ = build(data_dir, argv + ["--init-scaling", "depth"], task="language_modeling", seed=3)
    assert args.init_scaling == default
    names = _compare_scaling(scaled, plain, {"decoder": 4**-0.5})
    assert len(names) == 6 * 4  # no cross-attention in a language model
    expected = scaled if default == "depth" else plain
    for (n, p), q in zip(dflt.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), n


# ============================================================================ word dropout
class LayerInputs:
    """Records the input (T x B x C) of the first layer of a stack: embed_scale * tokens + positions with
    dropout 0, i.e. exactly where word dropout must show."""

    def __init__(self, stack):
        self.seen = []
        first = next(iter(stack.layers._modules.values()))
        self.handle = first.register_forward_pre_hook(lambda mod, args: self.seen.append(args[0].detach()))

    def remove(self):
        self.handle.remove()


def classify(stack, tokens, x):
    """Per token: True where the embedding was dropped (x == positions), False where it is intact
    (x == scale * E[token] + positions); anything else (e.g. a 1/(1-p) rescale) fails."""
    with torch.no_grad():
        pos = stack.embed_positions(tokens).transpose(0, 1)
        full = stack.embed_scale * stack.embed_tokens.weight[tokens].transpose(0, 1) + pos
    kept = torch.isclose(x, full, rtol=1e-5, atol=1e-5).all(-1)
    dropped = torch.isclose(x, pos, rtol=1e-5, atol=1e-5).all(-1)
    assert not (kept & dropped).any()  # embeddings are never all-zero
    bad = ~(kept | dropped)
    assert not bad.any(), f"{bad.sum()} token vectors are neither intact nor zeroed (rescaled?)"
    return dropped.t()  # B x T


def big_batch(dictionary, bsz=64, src_len=40, tgt_len=40, seed=5):
    g = torch.Generator().manual_seed(seed)
    lo, hi = dictionary.nspecial, len(dictionary)
    src = torch.randint(lo, hi, (bsz, src_len), generator=g)
    src[:, -1] = dictionary.eos()
    prev = torch.randint(lo, hi, (bsz, tgt_len), generator=g)
    prev[:, 0] = dictionary.eos()
    return src, torch.full((bsz,), src_len), prev


def within_binomial(count, n, p, sigmas=5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def worddrop(enc, dec):
    return ["--sampling-method", "worddrop", "--enc-replace-rate", str(enc), "--dec-replace-rate", str(dec)]


@pytest.mark.parametrize("enc_p,dec_p", [(0.3, 0.3), (0.3, 0.0), (0.0, 0.3)])
@pytest.mark.parametrize("share", [False, True])
def test_word_dropout_rates_in_training(data_dir, enc_p, dec_p, share):
    extra = [*NO_DROPOUT, *worddrop(enc_p, dec_p)] + (["--share-all-embeddings"] if share else [])
    model, task, _ = build(data_dir, nmt("b2t", 2, 2, *extra))
    assert (model.encoder.embed_tokens is model.decoder.embed_tokens) == share
    src, lengths, prev = big_batch(task.source_dictionary)
    enc_in, dec_in = LayerInputs(model.encoder), LayerInputs(model.decoder)
    model.train()
    torch.manual_seed(11)
    with torch.no_grad():
        model(src, lengths, prev)
        model(src, lengths, prev)
    enc_in.remove(), dec_in.remove()
    # no hook may stay behind on the (possibly shared) embedding module
    assert not model.encoder.embed_tokens._forward_hooks and not model.decoder.embed_tokens._forward_hooks

    enc_drops = [classify(model.encoder, src, x) for x in enc_in.seen]
    dec_drops = [classify(model.decoder, prev, x) for x in dec_in.seen]
    assert len(enc_drops) == 2 and len(dec_drops) == 2
    n = src.numel()
    assert within_binomial(int(enc_drops[0].sum()), n, enc_p), enc_drops[0].float().mean()
    assert not dec_drops[0][:, 0].any(), "decoder position 0 (the start token) must never be dropped"
    rest = dec_drops[0][:, 1:]
    assert within_binomial(int(rest.sum()), rest.numel(), dec_p), rest.float().mean()
    if enc_p > 0:  # a fresh draw every forward
        assert not torch.equal(enc_drops[0], enc_drops[1])
    if dec_p > 0:
        assert not torch.equal(dec_drops[0], dec_drops[1])
        # which tokens get dropped does not depend on the column (apart from position 0)
        per_position = dec_drops[0][:, 1:].float().mean(0)
        assert per_position.min() > 0 and per_position.max() < 0.75


def test_encoder_forward_embedding_directly(data_dir):
    """Calling the encoder's forward_embedding in training mode: zeroed rows and intact, unscaled others."""
    model, task, _ = build(data_dir, nmt("b2t", 2, 2, *NO_DROPOUT, *worddrop(0.3, 0.3)))
    src, _, _ = big_batch(task.source_dictionary)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        _, embed = model.encoder.forward_embedding(src)
        full = model.encoder.embed_scale * model.encoder.embed_tokens(src)
    zero = embed.eq(0).all(-1)
    intact = torch.isclose(embed, full, rtol=1e-6, atol=1e-7).all(-1)
    assert (zero | intact).all()
    assert within_binomial(int(zero.sum()), zero.numel(), 0.3)
    model.eval()
    with torch.no_grad():
        _, embed = model.encoder.forward_embedding(src)
    torch.testing.assert_close(embed, full, rtol=0, atol=0)


@pytest.mark.parametrize("share", [False, True])
def test_word_dropout_is_off_in_eval(data_dir, share):
    extra = ["--share-all-embeddings"] if share else []
    wd, task, _ = build(data_dir, nmt("b2t", 2, 2, *NO_DROPOUT, *worddrop(0.3, 0.3), *extra), seed=8)
    plain, _, _ = build(data_dir, nmt("b2t", 2, 2, *NO_DROPOUT, *extra), seed=8)
    plain.load_state_dict(wd.state_dict(), strict=True)
    src, lengths, prev = big_batch(task.source_dictionary, bsz=8, src_len=12, tgt_len=10)
    wd.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(wd(src, lengths, prev)[0], plain(src, lengths, prev)[0], rtol=0, atol=0)
        # incremental decoding (beam search) runs in eval mode: no word dropout there either
        enc = wd.encoder(src, lengths)
        state = {}
        steps = [wd.decoder(prev[:, : t + 1], enc, incremental_state=state)[0] for t in range(prev.size(1))]
        torch.testing.assert_close(torch.cat(steps, 1), plain(src, lengths, prev)[0], rtol=1e-5, atol=1e-5)
    # sanity: with the same weights, training mode differs only because of word dropout
    wd.train(), plain.train()
    with torch.no_grad():
        assert not torch.allclose(wd(src, lengths, prev)[0], plain(src, lengths, prev)[0])
        a = plain(src, lengths, prev)[0]
        torch.testing.assert_close(a, plain(src, lengths, prev)[0], rtol=0, atol=0)


def test_word_dropout_leaves_shared_output_projection_alone(data_dir):
    """With --share-all-embeddings the logits use the full embedding matrix, never a word-dropped one."""
    model, task, _ = build(data_dir, nmt("b2t", 2, 2, *NO_DROPOUT, *worddrop(0.3, 0.3), "--share-all-embeddings"))
    decoder = model.decoder
    assert decoder.output_projection.weight is decoder.embed_tokens.weight
    weight_before = decoder.embed_tokens.weight.detach().clone()
    src, lengths, prev = big_batch(task.source_dictionary, bsz=16, src_len=20, tgt_len=20)
    seen = {}

    def grab(module, args, output):
        seen["features"], seen["logits"] = args[0].detach(), output.detach()

    handle = decoder.output_projection.register_forward_hook(grab)
    dec_in = LayerInputs(decoder)
    model.train()
    torch.manual_seed(4)
    logits = model(src, lengths, prev)[0]
    handle.remove(), dec_in.remove()
    assert classify(decoder, prev, dec_in.seen[0]).any()  # word dropout did act in this very forward
    torch.testing.assert_close(logits.detach(), seen["logits"], rtol=0, atol=0)
    expected = seen["features"] @ weight_before.t()
    torch.testing.assert_close(seen["logits"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(decoder.embed_tokens.weight, weight_before)
    # every vocabulary row gets a gradient through the output projection, dropped words included
    logits.logsumexp(-1).sum().backward()
    grad = decoder.embed_tokens.weight.grad
    special = task.target_dictionary.pad()
    rows = [i for i in range(len(task.target_dictionary)) if i != special]
    assert grad[rows].abs().sum(-1).gt(0).all()


def test_lm_word_dropout(data_dir):
    argv = ["--arch", "transformer_lm_b2t", "--decoder-layers", "2", *LM_DIMS, *NO_DROPOUT]
    model, task, _ = build(data_dir, argv + worddrop(0.0, 0.3), task="language_modeling", seed=2)
    plain, _, _ = build(data_dir, argv, task="language_modeling", seed=2)
    plain.load_state_dict(model.state_dict(), strict=True)
    _, _, tokens = big_batch(task.source_dictionary, bsz=64, tgt_len=40)
    dec_in = LayerInputs(model.decoder)
    model.train()
    with torch.no_grad():
        model(tokens)
    dec_in.remove()
    dropped = classify(model.decoder, tokens, dec_in.seen[0])
    assert not dropped[:, 0].any()
    assert within_binomial(int(dropped[:, 1:].sum()), dropped[:, 1:].numel(), 0.3)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], plain(tokens)[0], rtol=0, atol=0)
