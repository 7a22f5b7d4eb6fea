"""Command-line options of the plugin: every bad input is refused with a message that names the fix."""
import pytest
from fairseq import options

import b2t_fairseq  # noqa: F401  (registers the models)
from b2t_fairseq.safety.errors import B2TConfigError
from conftest import PLUGIN_DIR, build_model, parse_args  # noqa: F401

TINY = (
    "--encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 "
    "--encoder-attention-heads 2 --decoder-attention-heads 2"
).split()


def parse(data_dir, *argv, task="translation"):
    return parse_args(data_dir, argv, task)


def build(data_dir, *argv, task="translation"):
    return build_model(data_dir, argv, task)[0]


def refused(data_dir, *argv, match, task="translation"):
    with pytest.raises(B2TConfigError, match=match) as info:
        parse(data_dir, *argv, task=task)
    return str(info.value)


# ----------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("flag", ["--encoder-normalize-before", "--decoder-normalize-before"])
@pytest.mark.parametrize("connection", ["b2t", "post-ln"])
def test_normalize_before_contradicts_post_ln_family(data_dir, connection, flag):
    msg = refused(data_dir, "--arch", "transformer_b2t", "--connection", connection, flag, match=flag)
    assert "--connection pre-ln" in msg and "drop it" in msg


@pytest.mark.parametrize("connection", ["b2t", "post-ln"])
def test_normalize_before_refused_by_the_lm_too(data_dir, connection):
    msg = refused(
        data_dir, "--arch", "transformer_lm_b2t", "--connection", connection, "--decoder-normalize-before",
        match="--decoder-normalize-before", task="language_modeling",
    )  # fmt: skip
    assert "--connection pre-ln" in msg


def test_normalize_before_default_when_b2t_is_implicit(data_dir):
    # --connection not given: b2t is the default, so the Pre-LN flag still contradicts it
    refused(data_dir, "--arch", "transformer_b2t", "--encoder-normalize-before", match="--connection pre-ln")


@pytest.mark.parametrize("rate", ["1.0", "1.5", "-0.1"])
@pytest.mark.parametrize("side", ["enc", "dec"])
def test_replace_rate_out_of_range(data_dir, side, rate):
    msg = refused(
        data_dir, "--arch", "transformer_b2t", "--sampling-method", "worddrop", f"--{side}-replace-rate", rate,
        match=rf"--{side}-replace-rate",
    )  # fmt: skip
    assert "[0, 1)" in msg


@pytest.mark.parametrize("side", ["enc", "dec"])
def test_replace_rate_without_worddrop(data_dir, side):
    msg = refused(data_dir, "--arch", "transformer_b2t", f"--{side}-replace-rate", "0.1", match="--sampling-method")
    assert "worddrop" in msg
    refused(
        data_dir, "--arch", "transformer_b2t", "--sampling-method", "none", f"--{side}-replace-rate", "0.1",
        match="--sampling-method worddrop",
    )  # fmt: skip


def test_unknown_connection_is_an_argparse_error(data_dir, capsys):
    with pytest.raises(SystemExit) as info:
        parse(data_dir, "--arch", "transformer_b2t", "--connection", "foo")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--connection" in err and "b2t" in err and "pre-ln" in err and "post-ln" in err


@pytest.mark.parametrize("flag,value", [("--init-scaling", "sqrt"), ("--sampling-method", "tokendrop")])
def test_other_choices_are_argparse_errors(data_dir, flag, value):
    with pytest.raises(SystemExit) as info:
        parse(data_dir, "--arch", "transformer_b2t", flag, value)
    assert info.value.code == 2


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("depth", [18, 100])
def test_deep_preset_refuses_contradicting_depth(data_dir, depth, stack):
    msg = refused(
        data_dir, "--arch", f"transformer_b2t_wmt_en_de_{depth}l", f"--{stack}-layers", "6",
        match=f"--{stack}-layers 6",
    )  # fmt: skip
    assert "--arch transformer_b2t_wmt_en_de" in msg  # the fix: the plain arch with explicit depths


def test_residual_bottom_to_top_contradicts_other_connections(data_dir):
    for connection in ("pre-ln", "post-ln"):
        msg = refused(
            data_dir, "--arch", "transformer_b2t", "--residual-bottom-to-top", "--connection", connection,
            match="--residual-bottom-to-top",
        )  # fmt: skip
        assert connection in msg and "drop one" in msg


def test_config_error_is_a_value_error():
    # callers that catch fairseq's ValueErrors keep working
    assert issubclass(B2TConfigError, ValueError)


# ----------------------------------------------------------------------------------- resolutions
def test_residual_bottom_to_top_alone_means_b2t(data_dir):
    args = parse(data_dir, "--arch", "transformer_b2t", "--residual-bottom-to-top")
    assert args.connection == "b2t" and args.init_scaling == "depth"
    assert not args.encoder_normalize_before and not args.decoder_normalize_before
    args = parse(data_dir, "--arch", "transformer_b2t", "--residual-bottom-to-top", "--connection", "b2t")
    assert args.connection == "b2t"


def test_defaults(data_dir):
    args = parse(data_dir, "--arch", "transformer_b2t")
    assert args.connection == "b2t"
    assert args.init_scaling == "depth"
    assert args.sampling_method == "none" and args.enc_replace_rate == 0 and args.dec_replace_rate == 0
    assert not args.encoder_normalize_before and not args.decoder_normalize_before
    for connection in ("post-ln", "pre-ln"):
        assert parse(data_dir, "--arch", "transformer_b2t", "--connection", connection).init_scaling == "none"


def test_pre_ln_sets_normalize_before(data_dir):
    args = parse(data_dir, "--arch", "transformer_b2t", "--connection", "pre-ln")
    assert args.encoder_normalize_before is True and args.decoder_normalize_before is True
    # explicitly asking for it as well is consistent, not an error
    args = parse(data_dir, "--arch", "transformer_b2t", "--connection", "pre-ln", "--encoder-normalize-before")
    assert args.encoder_normalize_before is True
    model = build(data_dir, "--arch", "transformer_b2t", "--connection", "pre-ln", "--encoder-layers", "2",
                  "--decoder-layers", "2", *TINY)  # fmt: skip
    assert all(layer.normalize_before for layer in model.encoder.layers)
    assert all(layer.normalize_before for layer in model.decoder.layers)


@pytest.mark.parametrize("connection,expected", [("b2t", False), ("post-ln", False), ("pre-ln", True)])
def test_lm_connection_decides_normalize_before(data_dir, connection, expected):
    # fairseq's LM presets hard-wire Pre-LN; ours follow --connection
    for arch in ("transformer_lm_b2t", "transformer_lm_b2t_wiki103", "transformer_lm_b2t_gbw"):
        args = parse(data_dir, "--arch", arch, "--connection", connection, task="language_modeling")
        assert args.decoder_normalize_before is expected, arch


@pytest.mark.parametrize("depth", [18, 100])
def test_deep_presets(data_dir, depth):
    arch = f"transformer_b2t_wmt_en_de_{depth}l"
    args = parse(data_dir, "--arch", arch)
    assert args.encoder_layers == depth and args.decoder_layers == depth
    assert args.dropout == 0.5
    assert args.sampling_method == "worddrop"
    assert args.enc_replace_rate == 0.1 and args.dec_replace_rate == 0.1
    assert args.connection == "b2t" and args.init_scaling == "depth"
    # transformer_wmt_en_de dimensions
    assert args.encoder_embed_dim == 512 and args.encoder_ffn_embed_dim == 2048
    assert args.encoder_attention_heads == 8
    # the consistent depth may be repeated
    args = parse(data_dir, "--arch", arch, "--encoder-layers", depth, "--decoder-layers", depth)
    assert args.encoder_layers == depth
    # the built model really has the depth and the word dropout (tiny dims so it builds fast)
    model = build(data_dir, "--arch", arch, *TINY)
    assert len(model.encoder.layers) == depth and len(model.decoder.layers) == depth
    assert model.encoder.word_dropout_p == 0.1 and model.decoder.word_dropout_p == 0.1
    assert model.encoder.layers[0].dropout_module.p == 0.5


@pytest.mark.parametrize("depth", [18, 100])
def test_deep_preset_overrides(data_dir, depth):
    arch = f"transformer_b2t_wmt_en_de_{depth}l"
    args = parse(data_dir, "--arch", arch, "--dropout", "0.3")
    assert args.dropout == 0.3 and args.enc_replace_rate == 0.1
    args = parse(data_dir, "--arch", arch, "--enc-replace-rate", "0.2")
    assert args.enc_replace_rate == 0.2 and args.dec_replace_rate == 0.1 and args.sampling_method == "worddrop"
    args = parse(data_dir, "--arch", arch, "--dec-replace-rate", "0")
    assert args.enc_replace_rate == 0.1 and args.dec_replace_rate == 0.0
    # naming the preset's own word dropout keeps its rates (it used to train with rate 0)
    args = parse(data_dir, "--arch", arch, "--sampling-method", "worddrop")
    assert args.enc_replace_rate == 0.1 and args.dec_replace_rate == 0.1
    args = parse(data_dir, "--arch", arch, "--connection", "pre-ln")
    assert args.connection == "pre-ln" and args.init_scaling == "none" and args.encoder_normalize_before
    args = parse(data_dir, "--arch", arch, "--init-scaling", "none")
    assert args.init_scaling == "none"


@pytest.mark.parametrize("depth", [18, 100])
def test_deep_preset_sampling_none_switches_word_dropout_off(data_dir, depth):
    arch = f"transformer_b2t_wmt_en_de_{depth}l"
    args = parse(data_dir, "--arch", arch, "--sampling-method", "none")
    assert args.sampling_method == "none"
    assert args.enc_replace_rate == 0 and args.dec_replace_rate == 0
    assert args.dropout == 0.5
    model = build(data_dir, "--arch", arch, "--sampling-method", "none", *TINY)
    assert model.encoder.word_dropout_p == 0 and model.decoder.word_dropout_p == 0


def _authors_18l_command(data_dir):
    """takase/b2t_connection README, 18L-18L (anchors.md section 0), with our --user-dir and arch, minus --fp16.

    fairseq 0.12 renamed the authors' (fairseq 0.9) ``--min-lr`` to ``--stop-min-lr``; the verbatim flag is
    rejected by fairseq's own parser, so it is translated here."""
    return (
        f"{data_dir} --user-dir {PLUGIN_DIR} "
        "--arch transformer_b2t_wmt_en_de --share-all-embeddings --optimizer adam "
        "--adam-betas (0.9,0.98) --clip-norm 0.1 --lr 0.001 --lr-scheduler inverse_sqrt --warmup-updates 4000 "
        "--warmup-init-lr 1e-07 --dropout 0.5 --weight-decay 0.0 --criterion label_smoothed_cross_entropy "
        "--label-smoothing 0.1 --max-tokens 3584 --stop-min-lr 1e-09 --update-freq 16 --max-update 50000 "
        "--sampling-method worddrop --enc-replace-rate 0.1 --dec-replace-rate 0.1 --decay-val 1000 "
        "--keep-last-epochs 10 --seed 1 --encoder-layers 18 --decoder-layers 18 --residual-bottom-to-top"
    ).split()


def test_authors_18l_command_line(data_dir):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, _authors_18l_command(data_dir) + ["-s", "src", "-t", "tgt"])
    assert args.connection == "b2t" and args.residual_bottom_to_top
    assert args.encoder_layers == 18 and args.decoder_layers == 18
    assert args.sampling_method == "worddrop"
    assert args.enc_replace_rate == 0.1 and args.dec_replace_rate == 0.1 and args.decay_val == 1000
    assert args.dropout == 0.5 and args.init_scaling == "depth"
    assert args.share_all_embeddings and args.encoder_embed_dim == 512
    assert not args.encoder_normalize_before and not args.decoder_normalize_before
    assert args.stop_min_lr == 1e-09 and args.warmup_init_lr == 1e-07


def test_worddrop_without_any_rate_is_refused(data_dir):
    with pytest.raises(B2TConfigError, match="drops nothing"):
        parse(data_dir, "--arch", "transformer_b2t", "--sampling-method", "worddrop")


def test_multilingual_task_keeps_its_own_sampling_method(data_dir):
    """translation_multi_simple_epoch has a --sampling-method of its own (language-pair sampling): the plugin
    loads beside it, leaves the flag to the task, and trains without word dropout (issue 10)."""
    from fairseq import tasks

    argv = ["--arch", "transformer_b2t", "--lang-pairs", "src-tgt", "--source-lang", "src", "--target-lang", "tgt",
            "--sampling-method", "temperature", "--sampling-temperature", "1.5", *TINY]  # fmt: skip
    args = parse(data_dir, *argv, task="translation_multi_simple_epoch")
    assert args.sampling_method == "temperature" and args.connection == "b2t"
    model = tasks.setup_task(args).build_model(args)
    assert model.encoder.word_dropout_p == 0.0 and model.decoder.word_dropout_p == 0.0


# ----------------------------------------------------------------------------------- issue 12's refusals
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_resi_dual_alpha_must_be_finite(data_dir, value):
    flag = f"--resi-dual-alpha={value}"  # "=": argparse would take -inf for an option
    refused(data_dir, "--arch", "transformer_b2t", "--connection", "resi-dual", flag,
            match=f"--resi-dual-alpha {value}: must be a finite number")  # fmt: skip
    # named as such on another method too, not as "only applies to resi-dual"
    refused(data_dir, "--arch", "transformer_b2t", flag, match="must be a finite number")


_EMPTY_REFUSED = [m for m, c in b2t_fairseq.modules.CONNECTIONS.items() if not c.empty_stacks]
_EMPTY_ALLOWED = [m for m, c in b2t_fairseq.modules.CONNECTIONS.items() if c.empty_stacks]


def test_methods_that_refuse_empty_stacks():
    # the three whose constants involve N and M (README, 'What the layers compute')
    assert sorted(_EMPTY_REFUSED) == ["deepnorm", "sub-ln", "tfixup"]


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("connection", _EMPTY_REFUSED)
def test_empty_stack_refused_where_the_constants_need_depth(data_dir, connection, stack):
    msg = refused(data_dir, "--arch", "transformer_b2t", "--connection", connection, f"--{stack}-layers", "0",
                  match=f"--{stack}-layers 0 leaves the {stack} without layers, but --connection {connection}")
    assert "choose another --connection" in msg


def test_empty_stack_refused_for_such_an_init_rule_and_the_lm(data_dir):
    refused(data_dir, "--arch", "transformer_b2t", "--connection", "post-ln", "--init-scaling", "deepnorm",
            "--encoder-layers", "0", match="but --init-scaling deepnorm defines its constants")  # fmt: skip
    refused(data_dir, "--arch", "transformer_lm_b2t", "--connection", "sub-ln", "--decoder-layers", "0",
            match="--decoder-layers 0 leaves the decoder without layers", task="language_modeling")  # fmt: skip
    refused(data_dir, "--arch", "transformer_b2t", "--decoder-layers", "-1", match="--decoder-layers -1: a stack has")


@pytest.mark.parametrize("connection", _EMPTY_ALLOWED)
def test_empty_stack_trains_where_well_defined(data_dir, connection):
    """fairseq trains a Transformer whose encoder (or decoder) has no layers; so do the methods whose constants
    need no depth of the empty stack (B2T's N^-1/2 scales the layers of its own stack only)."""
    import torch

    for encoder_layers, decoder_layers in ((0, 1), (1, 0)):
        model, task, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", connection,
                                                "--encoder-layers", encoder_layers, "--decoder-layers", decoder_layers,
                                                *TINY])  # fmt: skip
        assert (len(model.encoder.layers), len(model.decoder.layers)) == (encoder_layers, decoder_layers)
        model.train()
        src, prev = torch.randint(4, 30, (2, 5)), torch.randint(4, 30, (2, 4))
        out = model(src, torch.full((2,), 5), prev)[0]
        out.float().logsumexp(-1).mean().backward()
        assert torch.isfinite(out).all() and model.decoder.embed_tokens.weight.grad.abs().sum() > 0


def test_share_all_embeddings_needs_a_joined_dictionary(data_dir, tmp_path):
    """fairseq's own refusal is a plain ValueError deep inside build_model; ours names the fix, before it."""
    import shutil

    lines = (data_dir / "dict.tgt.txt").read_text().splitlines()
    shutil.copy(data_dir / "dict.src.txt", tmp_path / "dict.src.txt")
    (tmp_path / "dict.tgt.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # two words swapped
    with pytest.raises(B2TConfigError, match="--share-all-embeddings needs one dictionary for source and target") as e:
        build(tmp_path, "--arch", "transformer_b2t", "--share-all-embeddings", *TINY)
    assert "fairseq-preprocess --joined-dictionary" in str(e.value) and "drop --share-all-embeddings" in str(e.value)
    build(data_dir, "--arch", "transformer_b2t", "--share-all-embeddings", *TINY)  # one dictionary: fine
