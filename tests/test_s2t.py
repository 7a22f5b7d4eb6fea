"""``s2t_transformer_b2t``: fairseq's speech-to-text Transformer with every residual method.

Built the way fairseq-train builds it (argument parsing, architecture function, the speech_to_text task on a
directory holding only a config and a dictionary). The references are fairseq's stock ``s2t_transformer``
(same seed, or its weights loaded into ours), fairseq's own beam search and CTC criterion, autograd, and the
methods' init formulas recomputed here.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import b2t_fairseq  # noqa: F401  (registers the models)
from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.modules import CONNECTIONS, INIT_RULES
from conftest import build_model, parse_args
from test_layers import randomize

ALL_METHODS = tuple(CONNECTIONS)
FEATURES = 8
DIMS = (
    "--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 --decoder-embed-dim 32 "
    "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 4 --decoder-attention-heads 4 "
    "--conv-channels 16"
).split()
CTC = "--criterion label_smoothed_cross_entropy_with_ctc --ctc-weight 0.5".split()
EXACT = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def s2t_dir(tmp_path_factory):
    """What fairseq's speech_to_text task reads before any data: its config and the target dictionary."""
    from fairseq.data import Dictionary

    d = tmp_path_factory.mktemp("s2t")
    dictionary = Dictionary()
    for i in range(20):
        dictionary.add_symbol(f"w{i}")
    dictionary.save(str(d / "dict.txt"))
    (d / "config.yaml").write_text(f"input_feat_per_channel: {FEATURES}\ninput_channels: 1\nvocab_filename: dict.txt\n")
    return d


def own_init_is_refused(method):
    rule = INIT_RULES.get(CONNECTIONS[method].default_init_scaling)
    return rule is not None and rule.init_scales_embeddings


def ours(method, extra=(), arch="s2t_transformer_b2t_s"):
    init = ["--init-scaling", "none"] if own_init_is_refused(method) else []
    return ["--arch", arch, "--connection", method, *DIMS, *init, *extra]


def build(s2t_dir, argv, seed=0):
    return build_model(s2t_dir, argv, task="speech_to_text", seed=seed)


def build_stock(s2t_dir, normalize_before, extra=(), seed=0):
    """fairseq's own s2t_transformer_s; its presets are Pre-LN and no flag turns that off, so Post-LN is set on
    the parsed options, as a Python user would."""
    from fairseq import tasks

    args = parse_args(s2t_dir, ["--arch", "s2t_transformer_s", *DIMS, *extra], task="speech_to_text")
    args.encoder_normalize_before = args.decoder_normalize_before = normalize_before
    task = tasks.setup_task(args)
    torch.manual_seed(seed)
    return task.build_model(args), task, args


def speech_batch(dictionary, frames=(23, 17, 12), targets=(6, 4, 5), seed=2):
    """A padded batch in fairseq's speech_to_text format: zero-padded features, right-padded targets."""
    from fairseq.data import data_utils

    g = torch.Generator().manual_seed(seed)
    src = torch.randn(len(frames), max(frames), FEATURES, generator=g)
    for b, n in enumerate(frames):
        src[b, n:] = 0
    lo, hi = dictionary.nspecial, len(dictionary)
    sentences = [torch.cat([torch.randint(lo, hi, (n - 1,), generator=g), torch.tensor([dictionary.eos()])])
                 for n in targets]  # fmt: skip
    pad, eos = dictionary.pad(), dictionary.eos()
    target = data_utils.collate_tokens(sentences, pad, eos, left_pad=False)
    prev = data_utils.collate_tokens(sentences, pad, eos, left_pad=False, move_eos_to_beginning=True)
    return {
        "net_input": {"src_tokens": src, "src_lengths": torch.tensor(frames), "prev_output_tokens": prev},
        "target": target,
        "target_lengths": torch.tensor(targets),
        "ntokens": sum(targets),
        "nsentences": len(frames),
    }


def move_from_init(model):
    """test_layers.randomize; for the methods without layer norms also scaled down, so that their attention does
    not saturate (a one-hot softmax passes no gradient to the queries and keys)."""
    randomize(model)
    if not model.encoder.connection.layer_norms:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(0.3)


def forward(model, sample):
    return model(**sample["net_input"])


def token_nll(model, sample, net_output):
    lprobs = model.get_normalized_probs(net_output, log_probs=True)
    return F.nll_loss(lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1),
                      ignore_index=model.decoder.dictionary.pad(), reduction="sum")  # fmt: skip


# ------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_builds_and_gets_gradients(s2t_dir, method):
    model, task, _ = build(s2t_dir, ours(method))
    conn = CONNECTIONS[method]
    for stack in (model.encoder, model.decoder):
        assert type(stack.connection) is conn
        assert (stack.layer_norm is not None) == conn.final_norm, "a final layer norm only where the method has one"
    sample = speech_batch(task.target_dictionary)
    model.train()
    for moved in (False, True):  # at init, then away from it (ReZero's a = 0 at init passes no gradient on)
        if moved:
            move_from_init(model)
        model.zero_grad(set_to_none=True)
        loss = token_nll(model, sample, forward(model, sample))
        assert torch.isfinite(loss)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if moved:
                assert p.grad.abs().sum() > 0, name


def test_speech_encoder_refuses_what_needs_tokens(s2t_dir):
    refused = [m for m in ALL_METHODS if own_init_is_refused(m)]
    assert refused == ["tfixup"]
    with pytest.raises(B2TConfigError, match="--init-scaling none") as info:
        parse_args(s2t_dir, ["--arch", "s2t_transformer_b2t_s", "--connection", "tfixup"], task="speech_to_text")
    assert "\n" not in str(info.value)
    with pytest.raises(B2TConfigError, match="--enc-replace-rate"):
        parse_args(s2t_dir, ours("b2t", ["--sampling-method", "worddrop", "--enc-replace-rate", "0.1"]),
                   task="speech_to_text")  # fmt: skip
    args = parse_args(s2t_dir, ours("b2t", ["--sampling-method", "worddrop", "--dec-replace-rate", "0.1"]),
                      task="speech_to_text")  # fmt: skip
    assert args.dec_replace_rate == 0.1


@pytest.mark.parametrize("arch", ["s2t_transformer", "s2t_transformer_s", "s2t_transformer_xs", "s2t_transformer_sp",
                                  "s2t_transformer_m", "s2t_transformer_mp", "s2t_transformer_l",
                                  "s2t_transformer_lp"])  # fmt: skip
def test_architectures_mirror_fairseqs(s2t_dir, arch):
    mirror = arch.replace("s2t_transformer", "s2t_transformer_b2t", 1)
    stock = vars(parse_args(s2t_dir, ["--arch", arch], task="speech_to_text"))
    for method, before in (("pre-ln", True), ("b2t", False)):
        mine = vars(parse_args(s2t_dir, ["--arch", mirror, "--connection", method], task="speech_to_text"))
        for key, value in stock.items():
            if key not in ("arch", "encoder_normalize_before", "decoder_normalize_before"):
                assert mine[key] == value, (mirror, key)
        assert mine["encoder_normalize_before"] is before and mine["decoder_normalize_before"] is before


# ------------------------------------------------------------------------------- fairseq's stock model
@pytest.mark.parametrize("method", ["post-ln", "pre-ln"])
def test_equals_stock_s2t_transformer(s2t_dir, method):
    before = method == "pre-ln"
    stock, task, _ = build_stock(s2t_dir, before, seed=4)
    model, _, _ = build(s2t_dir, ours(method), seed=4)
    theirs, mine = stock.state_dict(), model.state_dict()
    assert list(mine) == list(theirs), "state-dict keys must be fairseq's"
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs), "a seed must draw fairseq's initial weights"
    assert any(k.startswith("encoder.transformer_layers.1.") for k in theirs)

    randomize(stock, seed=7)
    model.load_state_dict(stock.state_dict(), strict=True)
    stock.eval(), model.eval()
    sample = speech_batch(task.target_dictionary)
    with torch.no_grad():
        enc_s = stock.encoder(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], True)
        enc_m = model.encoder(sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"], True)
        assert enc_m.keys() == enc_s.keys()
        assert len(enc_s["encoder_padding_mask"]) == 1 and enc_s["encoder_padding_mask"][0].any()
        torch.testing.assert_close(enc_m["encoder_padding_mask"], enc_s["encoder_padding_mask"])
        torch.testing.assert_close(enc_m["encoder_out"], enc_s["encoder_out"], **EXACT)
        torch.testing.assert_close(enc_m["encoder_states"], enc_s["encoder_states"], **EXACT)
        out_s, out_m = forward(stock, sample), forward(model, sample)
    torch.testing.assert_close(out_m[0], out_s[0], **EXACT)
    torch.testing.assert_close(out_m[1]["encoder_out"]["encoder_out"], out_s[1]["encoder_out"]["encoder_out"], **EXACT)
    assert out_s[0].abs().max() > 1  # randomized weights, not near-zero outputs


def test_dropout_module_names_are_fairseqs(s2t_dir):
    """--retain-dropout-modules (Monte-Carlo dropout) selects dropout modules by fairseq's class names."""
    stock, _, _ = build_stock(s2t_dir, True)
    model, _, _ = build(s2t_dir, ours("pre-ln"))

    def names(m):
        return {n: d.module_name for n, d in m.named_modules() if type(d).__name__ == "FairseqDropout"}

    assert names(model) == names(stock)


@pytest.fixture(scope="module")
def stock_checkpoints(s2t_dir, tmp_path_factory):
    """Stock s2t_transformer_s checkpoints (Pre-LN, Post-LN) in fairseq's trainer format, randomized weights."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    out = {}
    for method in ("pre-ln", "post-ln"):
        stock, _, args = build_stock(s2t_dir, method == "pre-ln", seed=1)
        randomize(stock, seed=3)
        cfg = convert_namespace_to_omegaconf(args)
        state = {
            "args": None,
            "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "model": stock.state_dict(),
            "criterion": {},
            "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "Adam",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 0}],  # fmt: skip
            "task_state": {},
            "extra_state": {"train_iterator": None},
            "last_optimizer_state": None,
        }
        path = tmp_path_factory.mktemp("stock") / f"{method}.pt"
        checkpoint_utils.torch_persistent_save(state, str(path))
        out[method] = (path, stock.eval())
    return out


@pytest.mark.parametrize("method", ["post-ln", "pre-ln"])
def test_stock_checkpoint_loads_and_decodes_the_same(s2t_dir, stock_checkpoints, method):
    """What fairseq-train --restore-file / --finetune-from-model does with a stock checkpoint."""
    from fairseq import checkpoint_utils

    path, stock = stock_checkpoints[method]
    model, task, args = build(s2t_dir, ours(method))
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    model.load_state_dict(state["model"], strict=True, model_cfg=args)
    model.eval()
    sample = speech_batch(task.target_dictionary, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(forward(model, sample)[0], forward(stock, sample)[0], **EXACT)

    other = "b2t" if method == "post-ln" else "post-ln"  # same keys as post-ln, another method: refused
    wrong, _, wrong_args = build(s2t_dir, ours(other))
    with pytest.raises(B2TConfigError, match=f"connection '{method}' there, '{other}' here"):
        wrong.load_state_dict(checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"], model_cfg=wrong_args)


def test_pretrained_encoder_loads_or_is_refused_in_one_line(s2t_dir, stock_checkpoints):
    path, stock = stock_checkpoints["pre-ln"]
    model, _, _ = build(s2t_dir, ours("pre-ln", ["--load-pretrained-encoder-from", path]))
    theirs = stock.encoder.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(model.decoder.embed_tokens.weight, stock.decoder.embed_tokens.weight)
    # a rule of the method's own would rescale trained weights: the pretrained encoder keeps them
    deep, _, _ = build(s2t_dir, ours("pre-ln", ["--load-pretrained-encoder-from", path, "--init-scaling", "depth"]))
    assert all(torch.equal(v, theirs[k]) for k, v in deep.encoder.state_dict().items())
    with pytest.raises(B2TConfigError, match="connection 'pre-ln' there, 'resi-dual' here") as info:
        build(s2t_dir, ours("resi-dual", ["--load-pretrained-encoder-from", path]))
    assert "\n" not in str(info.value)
    with pytest.raises(B2TConfigError, match="do not fit") as info:  # told to load anyway: the keys differ
        build(s2t_dir, ours("b2t", ["--load-pretrained-encoder-from", path, "--allow-changed-identity"]))
    assert "\n" not in str(info.value)


def test_ctc_loss_equals_stock(s2t_dir):
    """--ctc-weight: the CTC projection is built (and drawn) as fairseq's, and the criterion reads the encoder
    output our decoder returns."""
    stock, task, args = build_stock(s2t_dir, True, extra=CTC, seed=2)
    model, _, _ = build(s2t_dir, ours("pre-ln", CTC), seed=2)
    assert model.encoder.ctc_proj is not None
    assert all(torch.equal(v, stock.state_dict()[k]) for k, v in model.state_dict().items())
    randomize(stock)
    model.load_state_dict(stock.state_dict())
    criterion = task.build_criterion(args)
    sample = speech_batch(task.target_dictionary)
    stock.eval(), model.eval()
    with torch.no_grad():
        _, _, log_s = criterion(stock, sample)
        _, _, log_m = criterion(model, sample)
    assert log_s["ctc_loss"] > 0
    assert log_m["ctc_loss"] == pytest.approx(log_s["ctc_loss"], rel=1e-6)
    assert log_m["loss"] == pytest.approx(log_s["loss"], rel=1e-6)


# ------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("method", ALL_METHODS)
def test_incremental_decoding_equals_full_decoding(s2t_dir, method):
    model, task, _ = build(s2t_dir, ours(method))
    model.double()
    move_from_init(model)
    model.eval()
    sample = speech_batch(task.target_dictionary)
    src, lengths, prev = (sample["net_input"][k] for k in ("src_tokens", "src_lengths", "prev_output_tokens"))
    with torch.no_grad():
        enc = model.encoder(src.double(), lengths)
        full = model.get_normalized_probs(model.decoder(prev, enc), log_probs=True)
        state, steps = {}, []
        for t in range(prev.size(1)):
            steps.append(model.get_normalized_probs(model.decoder(prev[:, : t + 1], enc, incremental_state=state),
                                                    log_probs=True))  # fmt: skip
    assert state, "the decoder must have used the incremental state"
    real = prev.ne(task.target_dictionary.pad())  # right padding: what comes after a sentence's end is not used
    assert not real.all()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-5, atol=1e-5)


def beam_search(model, task, sample, beam=3):
    from fairseq.sequence_generator import SequenceGenerator

    generator = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_b=8)
    net_input = {k: sample["net_input"][k] for k in ("src_tokens", "src_lengths")}
    with torch.no_grad():
        return generator.generate([model], {"net_input": net_input})


def test_beam_search_returns_hypotheses(s2t_dir, stock_checkpoints):
    model, task, _ = build(s2t_dir, ours("b2t"))
    randomize(model)
    model.eval()
    sample = speech_batch(task.target_dictionary)
    hypos = beam_search(model, task, sample)
    eos = task.target_dictionary.eos()
    assert len(hypos) == 3 and all(len(h) == 3 for h in hypos)
    for sentence in hypos:
        scores = [h["score"].item() for h in sentence]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
        assert all(h["tokens"][-1] == eos and len(h["tokens"]) <= 9 for h in sentence)

    # the whole decoding path (reorder_encoder_out, incremental state) gives fairseq's hypotheses
    path, stock = stock_checkpoints["pre-ln"]
    pre, _, _ = build(s2t_dir, ours("pre-ln"))
    pre.load_state_dict(stock.state_dict())
    pre.eval()
    for mine, theirs in zip(beam_search(pre, task, sample), beam_search(stock, task, sample)):
        assert [h["tokens"].tolist() for h in mine] == [h["tokens"].tolist() for h in theirs]
        torch.testing.assert_close(torch.stack([h["score"] for h in mine]), torch.stack([h["score"] for h in theirs]))


# ------------------------------------------------------------------------------- init, logging, int8
def test_init_scaling_differs_per_method(s2t_dir):
    def ratios(method, rule):
        scaled, _, _ = build(s2t_dir, ours(method), seed=3)
        plain, _, _ = build(s2t_dir, ours(method, ["--init-scaling", "none"]), seed=3)
        assert scaled.encoder.connection.default_init_scaling == rule
        ref = plain.state_dict()
        out = {}
        for name, p in scaled.state_dict().items():
            if p.is_floating_point() and ref[name].abs().sum() > 0:
                r = (p / ref[name])[ref[name].abs() > 1e-6]
                assert torch.allclose(r, r[0].expand_as(r), rtol=1e-5), name
                out[name] = r[0].item()
        return out

    n = m = 2
    deepnorm = ratios("deepnorm", "deepnorm")
    enc_beta, dec_beta = 0.87 * (n**4 * m) ** (-1 / 16), (12 * m) ** -0.25
    for name, ratio in deepnorm.items():
        layer = re.match(r"(encoder|decoder)\.(?:transformer_)?layers\.\d+\.(.*)", name)
        stack, sub = layer.groups() if layer else (None, None)
        scaled = sub in ("self_attn.v_proj.weight", "self_attn.out_proj.weight", "encoder_attn.v_proj.weight",
                         "encoder_attn.out_proj.weight", "fc1.weight", "fc2.weight")  # fmt: skip
        want = (enc_beta if stack == "encoder" else dec_beta) if scaled else 1.0
        assert ratio == pytest.approx(want, rel=1e-5), name
    assert deepnorm["encoder.transformer_layers.0.fc1.weight"] == pytest.approx(enc_beta, rel=1e-5)
    assert deepnorm["encoder.subsample.conv_layers.0.weight"] == 1.0  # the conv front end is not a layer

    b2t = ratios("b2t", "depth")  # N^-1/2 on every non-LN matrix of each layer
    assert b2t["encoder.transformer_layers.1.self_attn.q_proj.weight"] == pytest.approx(n**-0.5, rel=1e-5)
    assert b2t["decoder.layers.0.encoder_attn.k_proj.weight"] == pytest.approx(m**-0.5, rel=1e-5)
    assert b2t["encoder.transformer_layers.1.fc2.bias"] == 1.0
    assert b2t["encoder.subsample.conv_layers.1.weight"] == 1.0


def test_live_layer_grad_norms_attach(s2t_dir):
    from fairseq.logging import metrics

    from b2t_fairseq.analysis.live import LayerGradNormLogger

    model, task, _ = build(s2t_dir, ours("b2t", ["--log-layer-grad-norms", "1"]))
    plain, _, _ = build(s2t_dir, ours("b2t"))
    assert isinstance(model.layer_grad_norm_logger, LayerGradNormLogger)
    assert not hasattr(plain, "layer_grad_norm_logger")
    assert model.state_dict().keys() == plain.state_dict().keys(), "checkpoints must not change"
    model.train()
    sample = speech_batch(task.target_dictionary)
    with metrics.aggregate(new_root=True) as aggregate:
        model.set_num_updates(0)
        token_nll(model, sample, forward(model, sample)).backward()
        model.set_num_updates(1)
        logged = {k: v for k, v in aggregate.get_smoothed_values().items() if k.startswith("gnorm_")}
    expected = {
        f"gnorm_{side}{i}": torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item() / sample["ntokens"]
        for side, stack in (("enc", model.encoder.transformer_layers), ("dec", model.decoder.layers))
        for i, layer in enumerate(stack, start=1)
    }
    assert sorted(logged) == sorted(expected) == ["gnorm_dec1", "gnorm_dec2", "gnorm_enc1", "gnorm_enc2"]
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4), key


def test_int8_decoding_quantizes_the_speech_encoder_layers(s2t_dir):
    from b2t_fairseq.fast_paths.int8 import quantize_for_cpu_decoding

    model, task, _ = build(s2t_dir, ours("b2t"))
    model.eval()
    sample = speech_batch(task.target_dictionary)
    with torch.no_grad():
        before = forward(model, sample)[0]
        quantize_for_cpu_decoding(model, "all")
        after = forward(model, sample)[0]
    quantized = {n for n, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}
    assert "encoder.transformer_layers.0.fc1" in quantized and "decoder.layers.1.self_attn.v_proj" in quantized
    assert "encoder.transformer_layers.0.self_attn.q_proj" in quantized  # queries and keys too
    assert "encoder.subsample.conv_layers.0" not in quantized
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_a_norm_type_reaches_every_norm_of_the_speech_model(s2t_dir):
    """--norm-type rmsnorm: the speech encoder's layers and final norm, and the decoder's, are RMSNorm."""
    from torch import nn

    from b2t_fairseq.modules.norms import RMSNorm

    model, _, _ = build(s2t_dir, ours("siamese") + ["--norm-type", "rmsnorm"])
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))]
    assert norms and all(isinstance(m, RMSNorm) for m in norms)
    assert isinstance(model.encoder.layer_norm, RMSNorm) and isinstance(model.encoder.siamese_pre_stream_norm, RMSNorm)
