"""fairseq's real entry points with the plugin: any working directory, no env vars, resume, DDP, bad input."""
import json
import signal
import socket
import subprocess
import time

import pytest

from conftest import BIN, PLUGIN_DIR, REPO, TINY_MODEL, TINY_OPTIM, cli_env, run


def epoch_losses(log_text):
    """Per-epoch train loss from a fairseq --log-format json log."""
    losses = {}
    for line in log_text.splitlines():
        if "| train |" in line:
            stats = json.loads(line.split("| train |", 1)[1])
            losses[int(stats["epoch"])] = float(stats["train_loss"])
    return losses


def test_train_and_generate_from_another_directory_without_env_vars(toy_corpus, tmp_path):
    # bare "b2t_fairseq": fairseq must find the installed plugin, not a copy in the working directory
    run(
        "fairseq-train", toy_corpus["data_bin"], "--user-dir", "b2t_fairseq", "--arch", "transformer_b2t",
        *TINY_MODEL, *TINY_OPTIM, "--max-update", 10, "--save-dir", "ckpt", cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").is_file()
    gen = run(
        "fairseq-generate", toy_corpus["data_bin"], "--user-dir", "b2t_fairseq", "--path", "ckpt/checkpoint_last.pt",
        "--gen-subset", "valid", "--beam", 4, "--batch-size", 50, "--required-batch-size-multiple", 1, "--cpu",
        cwd=tmp_path,
    )  # fmt: skip
    hyps = [line for line in gen.stdout.splitlines() if line.startswith("H-")]
    assert len(hyps) == 100
    assert "Weights only load failed" not in gen.stderr


def _train_until_killed(cmd_args, log_file, cwd, kill_after_epoch):
    proc = subprocess.Popen([str(BIN / "fairseq-train"), *map(str, cmd_args)], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())  # fmt: skip
    deadline = time.time() + 300
    # logged by fairseq_cli.train after the epoch's checkpoints (checkpoint_last.pt included) are written
    marker = f"end of epoch {kill_after_epoch} "
    while time.time() < deadline and proc.poll() is None:
        if log_file.is_file() and marker in log_file.read_text():
            proc.send_signal(signal.SIGKILL)  # a crash: no chance to clean up or save
            proc.wait()
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"training never reached epoch {kill_after_epoch} (exit code {proc.poll()})")


@pytest.mark.parametrize("arch", ["transformer_b2t", "transformer"])
def test_killed_training_resumes_from_checkpoint_last(toy_corpus, tmp_path, arch):
    """Killed after epoch 2, resumed: the same losses as an uninterrupted run, with dropout and word dropout on.
    (fairseq 0.12 alone drifts here: a resumed run orders its batches under another seed; safety/runs.py.)
    Stock ``transformer`` with the plugin loaded gets the same."""
    regularised = ["--dropout", 0.1] + (["--sampling-method", "worddrop", "--enc-replace-rate", 0.1,
                                         "--dec-replace-rate", 0.1] if arch == "transformer_b2t" else [])  # fmt: skip
    common = ["--user-dir", PLUGIN_DIR, "--arch", arch, *TINY_MODEL, *TINY_OPTIM, "--max-epoch", 5, *regularised]
    ref = run("fairseq-train", toy_corpus["data_bin"], *common, "--save-dir", tmp_path / "ref")
    expected = epoch_losses(ref.stdout)
    assert sorted(expected) == [1, 2, 3, 4, 5]

    log = tmp_path / "crash.log"
    args = [toy_corpus["data_bin"], *common, "--save-dir", tmp_path / "crash", "--log-file", log]
    _train_until_killed(args, log, tmp_path, kill_after_epoch=2)
    resumed = run("fairseq-train", *args)
    assert "Loaded checkpoint" in resumed.stdout
    got = epoch_losses(resumed.stdout)
    assert min(got) >= 3, "resumed run redid epochs that were already saved"
    assert max(got) == 5
    for epoch in got:
        assert got[epoch] == expected[epoch], f"epoch {epoch} diverged after resume"  # as logged, 3 decimals


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# fairseq's legacy DDP: its pytorch_ddp passes device_ids, which PyTorch refuses for CPU modules. DLCL: weights of
# the whole stack, outside the layers; SiameseNorm: those and a second stream carried between layers
@pytest.mark.parametrize("connection", ["b2t", "dlcl", "siamese"])
def test_two_process_gloo_training_matches_update_freq_2(toy_corpus, tmp_path, connection):
    common = [
        toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL, *TINY_OPTIM,
        "--max-epoch", 3, "--dropout", 0, "--no-save", "--ddp-backend", "legacy_ddp", "--connection", connection,
    ]  # fmt: skip
    single = epoch_losses(run("fairseq-train", *common, "--update-freq", 2).stdout)

    port = _free_port()
    procs = [
        subprocess.Popen(
            [str(BIN / "fairseq-train"), *map(str, common), "--distributed-backend", "gloo",
             "--distributed-world-size", "2", "--distributed-rank", str(rank),
             "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=cli_env(),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    distributed = epoch_losses(outs[0][0])
    assert "distributed init (rank 1)" in outs[1][1] + outs[1][0]
    assert sorted(distributed) == sorted(single) == [1, 2, 3]
    for epoch in single:
        assert distributed[epoch] == pytest.approx(single[epoch], abs=1e-3)


@pytest.mark.parametrize("connection", ["dlcl", "sub-ln", "hybridnorm"])
def test_new_parameters_survive_save_resume_average_and_generate(toy_corpus, tmp_path, connection):
    """The methods whose parameters fairseq's transformer lacks (DLCL's stack weights, Sub-LN's norms inside
    Linear layers, HybridNorm's inside the attention's projections): train, resume, average two epoch checkpoints,
    decode."""
    import torch

    from b2t_fairseq.compat.checkpoints import load_checkpoint

    common = [toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL, *TINY_OPTIM,
              "--connection", connection, "--save-dir", tmp_path / "ckpt"]  # fmt: skip
    run("fairseq-train", *common, "--max-epoch", 2)
    resumed = run("fairseq-train", *common, "--max-epoch", 3)
    assert "Loaded checkpoint" in resumed.stdout and "(epoch 3 @" not in resumed.stdout.split("Loaded checkpoint")[0]
    run("b2t-average-checkpoints", "--inputs", tmp_path / "ckpt" / "checkpoint2.pt", tmp_path / "ckpt" / "checkpoint3.pt",
        "--output", tmp_path / "avg.pt")  # fmt: skip
    states = [load_checkpoint(tmp_path / name)["model"]
              for name in ("ckpt/checkpoint2.pt", "ckpt/checkpoint3.pt", "avg.pt")]  # fmt: skip
    key = {"dlcl": "encoder.dlcl_weights", "sub-ln": "encoder.layers.0.fc2.sub_layer_norm.weight",
           "hybridnorm": "decoder.layers.1.encoder_attn.k_proj.head_norm.weight"}[connection]
    assert not torch.equal(states[0][key], states[1][key]), "the method's parameter must have trained"
    torch.testing.assert_close(states[2][key], (states[0][key] + states[1][key]) / 2)
    gen = run("fairseq-generate", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--path", tmp_path / "avg.pt",
              "--gen-subset", "valid", "--beam", 4, "--batch-size", 50, "--required-batch-size-multiple", 1, "--cpu")  # fmt: skip
    assert sum(line.startswith("H-") for line in gen.stdout.splitlines()) == 100


# One CLI run per kind of failure (parse time, preset, argparse); every message is covered in test_options.py.
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--encoder-normalize-before"], "use --connection pre-ln"),
        (["--dec-replace-rate", "0.1"], "add --sampling-method worddrop"),
    ],
)
def test_bad_flags_give_one_line_errors(toy_corpus, tmp_path, flags, message):
    proc = run(
        "fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t",
        *TINY_MODEL, *TINY_OPTIM, "--max-update", 1, "--no-save", *flags, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_time_error_is_one_line(toy_corpus, tmp_path):
    """An error only the data can show, raised when fairseq builds the model (after it loaded the valid set):
    --share-all-embeddings over separate source and target dictionaries (fairseq's own is a traceback)."""
    import shutil

    data = tmp_path / "data-bin"
    shutil.copytree(toy_corpus["data_bin"], data)
    lines = (data / "dict.tgt.txt").read_text().splitlines()
    (data / "dict.tgt.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # another dictionary
    proc = run(
        "fairseq-train", data, "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL, *TINY_OPTIM,
        "--max-update", 1, "--no-save", check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "b2t_fairseq: error: --share-all-embeddings needs one dictionary" in proc.stderr
    assert "fairseq-preprocess --joined-dictionary" in proc.stderr and "Traceback" not in proc.stderr


def test_deep_preset_rejects_contradicting_depth(toy_corpus, tmp_path):
    proc = run(
        "fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t_wmt_en_de_18l",
        "--encoder-layers", 6, "--max-update", 1, "--no-save", "--cpu", check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "has 18 encoder layers, but --encoder-layers 6 was given" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_connection_is_an_argparse_error(toy_corpus, tmp_path):
    proc = run(
        "fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t",
        "--connection", "fixup", "--cpu", check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "invalid choice: 'fixup'" in proc.stderr
    from b2t_fairseq.modules import CONNECTIONS

    assert all(f"'{name}'" in proc.stderr for name in CONNECTIONS)  # the valid ones are listed


def test_hub_from_pretrained_with_user_dir_after_import(toy_corpus, tmp_path):
    """fairseq's hub interface with user_dir="b2t_fairseq" once the package is imported (issue 10: fairseq
    called the installed package "not globally unique"), decoding a sentence."""
    import sys

    run("fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL,
        *TINY_OPTIM, "--max-update", 5, "--save-dir", tmp_path / "ckpt")  # fmt: skip
    source = (toy_corpus["raw"] / "valid.src").read_text().splitlines()[0]
    code = (
        "from b2t_fairseq.models.transformer_b2t import TransformerB2TModel\n"
        f"hub = TransformerB2TModel.from_pretrained({str(tmp_path / 'ckpt')!r}, checkpoint_file='checkpoint_last.pt',"
        f" data_name_or_path={str(toy_corpus['data_bin'])!r}, user_dir='b2t_fairseq')\n"
        f"print('HYP', hub.translate({source!r}, beam=2))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith("HYP ") and len(line) > 4 for line in proc.stdout.splitlines())


def test_language_model_with_eos_break_mode_under_numpy2(toy_corpus, tmp_path):
    """--sample-break-mode eos goes through fairseq's TokenBlockDataset, which names np.compat.long (gone in
    numpy 2): training and fairseq-generate of a language model (issue 10)."""
    run("fairseq-preprocess", "--only-source", "--trainpref", toy_corpus["raw"] / "train.tgt", "--validpref",
        toy_corpus["raw"] / "valid.tgt", "--testpref", toy_corpus["raw"] / "test.tgt", "--destdir", tmp_path / "lm-bin")  # fmt: skip
    run("fairseq-train", tmp_path / "lm-bin", "--user-dir", PLUGIN_DIR, "--task", "language_modeling", "--arch",
        "transformer_lm_b2t", "--decoder-layers", 1, "--decoder-embed-dim", 16, "--decoder-ffn-embed-dim", 32,
        "--decoder-attention-heads", 2, "--sample-break-mode", "eos", "--tokens-per-sample", 64, "--optimizer", "adam",
        "--lr", "1e-3", "--max-tokens", 512, "--max-update", 3, "--cpu", "--num-workers", 0,
        "--save-dir", tmp_path / "ckpt")  # fmt: skip
    gen = run("fairseq-generate", tmp_path / "lm-bin", "--user-dir", PLUGIN_DIR, "--task", "language_modeling",
              "--path", tmp_path / "ckpt" / "checkpoint_last.pt", "--sample-break-mode", "eos", "--gen-subset",
              "valid", "--beam", 1, "--max-len-b", 5, "--batch-size", 16, "--cpu")  # fmt: skip
    assert any(line.startswith("H-") for line in gen.stdout.splitlines())


_EXIT_WHILE_LOADING = """
import sys
import torch
import b2t_fairseq  # what --user-dir does in fairseq-train
from fairseq.data.iterators import BufferedIterator

class Batches:  # each one torch work to make, as TokenBlockDataset's torch.cat is; more than the run takes
    def __len__(self):
        return 100000
    def __iter__(self):
        parts = [torch.randn(200000) for _ in range(20)]
        for _ in range(100000):
            yield torch.cat(parts).sum()

batches = BufferedIterator(100000, Batches())  # fairseq's training iterator: a daemon thread reads ahead
next(batches)
print("finished", flush=True)
"""


def test_a_run_that_ends_while_fairseq_still_loads_batches_exits_cleanly(tmp_path):
    """fairseq's BufferedIterator keeps making batches in a daemon thread; a run that ends while that thread is in
    torch aborted at interpreter exit (status 134, "terminate called without an active exception"; now and
    then for a short LM fairseq-train with --max-update, nearly always for this script without the plugin). The plugin parks the
    thread first (compat/background_threads.py): every run exits 0."""
    script = tmp_path / "exit_while_loading.py"
    script.write_text(_EXIT_WHILE_LOADING)
    for _ in range(3):
        proc = subprocess.run([str(BIN / "python"), str(script)], env=cli_env(PYTHONPATH=str(REPO)),
                              capture_output=True, text=True, timeout=120)  # the working tree's plugin
        assert proc.returncode == 0 and "finished" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_checkpoint_of_an_eval_bleu_run_decodes_with_the_safe_loader(toy_corpus, tmp_path):
    """--eval-bleu stores numpy values in the checkpoint; it still loads with weights_only=True (issue 10)."""
    run("fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL,
        *TINY_OPTIM, "--max-update", 4, "--save-dir", tmp_path / "ckpt", "--eval-bleu", "--eval-bleu-args",
        '{"beam": 1, "max_len_b": 5}', "--eval-bleu-detok", "space", "--best-checkpoint-metric", "bleu",
        "--maximize-best-checkpoint-metric")  # fmt: skip
    gen = run("fairseq-generate", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--path",
              tmp_path / "ckpt" / "checkpoint_best.pt", "--gen-subset", "valid", "--beam", 2, "--batch-size", 50,
              "--cpu")  # fmt: skip
    assert "Weights only load failed" not in gen.stderr
    assert any(line.startswith("H-") for line in gen.stdout.splitlines())


# What the authors' fork (takase/b2t_connection: fairseq 0.9; read with `git show HEAD:<file>`) saves as the model
# state dict for their WMT command (--arch transformer_wmt_en_de --residual-bottom-to-top --share-all-embeddings),
# in the order its modules register it. m = fairseq/models/transformer.py, l = fairseq/modules/transformer_layer.py.
def _authors_attention(prefix):
    # fairseq/modules/multihead_attention.py:58-62; bias_k/bias_v (:65) only with add_bias_kv, which no layer uses
    return [f"{prefix}.{proj}.{w}" for proj in ("k_proj", "v_proj", "q_proj", "out_proj") for w in ("weight", "bias")]


def _authors_modules(prefix, names):
    return [f"{prefix}.{name}.{w}" for name in names for w in ("weight", "bias")]


def _authors_model_keys(encoder_layers, decoder_layers):
    keys = [
        "encoder.version",  # m:418 register_buffer("version", torch.Tensor([3]))
        "encoder.embed_tokens.weight",  # m:433 (one Embedding, also the decoder's and the output matrix, m:985)
        # m:437 PositionalEmbedding -> fairseq/modules/sinusoidal_positional_embedding.py:29
        # register_buffer("_float_tensor", torch.FloatTensor(1)); its table (:24 self.weights) is no buffer
        "encoder.embed_positions._float_tensor",
    ]
    for i in range(encoder_layers):  # m:450
        layer = f"encoder.layers.{i}"
        keys += _authors_attention(f"{layer}.self_attn")  # l:34
        keys += _authors_modules(layer, ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"))  # l:35,45-47
    # m:457 encoder.layer_norm, m:461 encoder.layernorm_embedding: only with --encoder-normalize-before /
    # --layernorm-embedding, which their command does not give
    keys += [
        "decoder.version",  # m:665
        "decoder.embed_tokens.weight",  # m:689
        # m:699 self.embed_positions_original = PositionalEmbedding(...): the same sinusoidal buffer under their
        # own name; m:706/712 embed_positions_lrpe/_ldpe exist only with --represent-length-by-lrpe/-ldpe
        "decoder.embed_positions_original._float_tensor",
    ]
    for i in range(decoder_layers):  # m:722
        layer = f"decoder.layers.{i}"
        keys += _authors_attention(f"{layer}.self_attn")  # l:171
        keys += _authors_modules(layer, ("self_attn_layer_norm",))  # l:191
        keys += _authors_attention(f"{layer}.encoder_attn")  # l:197
        keys += _authors_modules(layer, ("encoder_attn_layer_norm", "fc1", "fc2", "final_layer_norm"))  # l:198-203
    # m:750 decoder.embed_out only without shared output embeddings; m:758 decoder.layer_norm only with
    # --decoder-normalize-before
    return keys


# their model options (m:150-204 add_args), with their defaults, beside fairseq 0.9's own
_AUTHORS_MODEL_OPTIONS = dict(
    one_emb=None, one_emb_dropout=0.5, one_emb_std=1.0, codenum=64, codebooknum=8, one_emb_inter_dim=0,
    one_emb_layernum=2, one_emb_relu_dropout=0.1, stop_relu_dropout_update=0, no_cross_attention=False,
    cross_self_attention=False, layer_wise_attention=False, represent_length_by_lrpe=False,
    represent_length_by_ldpe=False, ordinary_sinpos=False, sampling_method="none", enc_replace_rate=0.0,
    dec_replace_rate=0.0, decay_val=1000, residual_bottom_to_top=True, no_layer_norm=False,
)  # fmt: skip


def test_authors_checkpoint_format_is_loaded_as_b2t(toy_corpus, tmp_path):
    """A checkpoint as the authors' fairseq 0.9 fork writes it (flat `args`, --arch transformer
    --residual-bottom-to-top, 0.9 option names, none of our options, their state dict keys above) decodes exactly
    as the same weights in our own checkpoint; stock fairseq would build a Post-LN model from it (issue 10)."""
    import argparse
    from collections import OrderedDict

    import torch

    from b2t_fairseq.compat.checkpoints import load_checkpoint

    run("fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL,
        *TINY_OPTIM, "--max-update", 30, "--save-dir", tmp_path / "ckpt")  # fmt: skip
    ours = load_checkpoint(tmp_path / "ckpt" / "checkpoint_last.pt")
    args = vars(ours["cfg"]["model"]).copy()
    for name in ("connection", "init_scaling", "admin_output_change", "resi_dual_alpha", "allow_changed_identity",
                 "log_layer_grad_norms", "compile_layers", "int8_decoding", "_name"):  # fmt: skip
        args.pop(name, None)
    args.update(arch="transformer", min_lr=args.pop("stop_min_lr", -1.0), **_AUTHORS_MODEL_OPTIONS)
    model = OrderedDict()
    for key in _authors_model_keys(2, 2):
        if key.endswith(".version"):
            model[key] = torch.Tensor([3])
        elif key.endswith("._float_tensor"):
            model[key] = torch.zeros(1)  # uninitialised there (torch.FloatTensor(1)): only its dtype is used
        else:
            model[key] = ours["model"][key]
    # 0.12 adds one key, the output projection, which is the shared embedding matrix (there m:985)
    assert set(ours["model"]) - set(model) == {"decoder.output_projection.weight"}
    # their released checkpoints are averages (their scripts/average_checkpoints.py), which turns fp16 into float32
    authors = {"args": argparse.Namespace(**args), "model": model, "optimizer_history": ours["optimizer_history"],
               "extra_state": ours["extra_state"], "last_optimizer_state": None}  # fmt: skip
    torch.save(authors, tmp_path / "authors.pt")

    def hypotheses(path):
        gen = run("fairseq-generate", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--path", path,
                  "--gen-subset", "valid", "--beam", 2, "--batch-size", 50, "--cpu")  # fmt: skip
        return gen, sorted(line for line in gen.stdout.splitlines() if line.startswith(("H-", "D-")))

    gen, theirs = hypotheses(tmp_path / "authors.pt")
    assert "the authors' B2T checkpoint" in gen.stdout + gen.stderr
    assert theirs and theirs == hypotheses(tmp_path / "ckpt" / "checkpoint_last.pt")[1]


def test_authors_checkpoint_keys_and_options_not_offered():
    """Their learned decoder positions (--decoder-learned-pos) keep their weights under fairseq 0.12's name; their
    length-control encodings and LN-free variant are refused in one line rather than loaded half."""
    import argparse
    from collections import OrderedDict

    import pytest
    import torch

    import b2t_fairseq  # noqa: F401  (registers the architectures)
    from b2t_fairseq.compat.checkpoints import adopt_authors_checkpoint
    from b2t_fairseq.safety.errors import B2TConfigError

    def state(**options):
        args = argparse.Namespace(arch="transformer_wmt_en_de", **{**_AUTHORS_MODEL_OPTIONS, **options})
        weights = OrderedDict([("decoder.embed_positions_original.weight", torch.ones(3)),
                               ("encoder.embed_positions._float_tensor", torch.zeros(1))])  # fmt: skip
        return {"args": args, "cfg": {"model": args}, "model": weights}

    adopted = state(decoder_learned_pos=True)
    assert adopt_authors_checkpoint(adopted, "theirs.pt")
    assert list(adopted["model"]) == ["decoder.embed_positions.weight"]
    assert adopted["cfg"]["model"].arch == "transformer_b2t_wmt_en_de"
    for option, flag in (("represent_length_by_lrpe", "--represent-length-by-lrpe"),
                         ("no_layer_norm", "--no-layer-norm")):
        with pytest.raises(B2TConfigError, match=f"theirs.pt is a B2T checkpoint .* trained with {flag}"):
            adopt_authors_checkpoint(state(**{option: True}), "theirs.pt")
