"""b2t-grad-norms and b2t-loss-curves.

Gradient norms are checked against torch.autograd.grad of a loss the test computes itself, w.r.t. tensors the
test captures another way (fairseq's encoder_states / inner_states, or a test-written connection that keeps
every layer-norm input and output); loss curves against the stats lines of a real fairseq-train log, read here
by a plain string split.
"""
import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import b2t_fairseq  # noqa: F401  (registers the models)
from b2t_fairseq.analysis import grad_norms, loss_curves
from b2t_fairseq.analysis.live import LayerGradNormLogger
from b2t_fairseq.modules import CONNECTIONS as ALL_METHODS
from conftest import REPO, TINY_MODEL, TINY_OPTIM, build_model, run

CONNECTIONS = ("post-ln", "pre-ln", "b2t")
SMALL = (
    "--encoder-layers 2 --decoder-layers 3 --encoder-embed-dim 16 --decoder-embed-dim 16 "
    "--encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 --encoder-attention-heads 2 --decoder-attention-heads 2"
).split()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- helpers
def small_model(data_dir, connection, seed=0):
    model, task, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", connection, *SMALL], seed=seed)
    return model.eval(), task


def samples(dictionary, n=2, bsz=3, seed=5):
    """Padded batches in fairseq's sample format, built here (not by the tool)."""
    from fairseq.data import LanguagePairDataset

    g = torch.Generator().manual_seed(seed)
    lo, hi = dictionary.nspecial, len(dictionary)

    def sentence():
        return torch.cat([torch.randint(lo, hi, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g),
                          torch.tensor([dictionary.eos()])])  # fmt: skip

    out = []
    for _ in range(n):
        src, tgt = [sentence() for _ in range(bsz)], [sentence() for _ in range(bsz)]
        dataset = LanguagePairDataset(src, [len(s) for s in src], dictionary, tgt, [len(t) for t in tgt], dictionary)
        out.append(dataset.collater([dataset[i] for i in range(bsz)]))
    return out


def token_ce(model, sample, decoder_out):
    """Plain cross-entropy per target token: what fairseq's default criterion divided by its sample size is."""
    lprobs = F.log_softmax(decoder_out[0], dim=-1)  # the decoder's logits
    target = sample["target"]
    pad = model.decoder.dictionary.pad()
    return F.nll_loss(lprobs.view(-1, lprobs.size(-1)), target.view(-1), ignore_index=pad, reduction="sum") / (
        target.ne(pad).sum()
    )


def ce_criterion(task):
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    return CrossEntropyCriterion(task, sentence_avg=False)


def norm(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]).norm().item()


# --------------------------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("connection", ALL_METHODS)
def test_layer_and_parameter_norms_match_autograd(data_dir, connection):
    model, task = small_model(data_dir, connection)
    batches = samples(task.src_dict)
    measured = grad_norms.measure(model, ce_criterion(task), batches)

    for b, sample in enumerate(batches):
        net = sample["net_input"]
        enc = model.encoder(net["src_tokens"], net["src_lengths"], return_all_hiddens=True)
        dec = model.decoder(net["prev_output_tokens"], encoder_out=enc)
        loss = token_ce(model, sample, dec)
        # [embedded input, layer 1 output, ...]; for pre-ln the last is what the stack's final layer norm reads
        states = {"encoder": enc["encoder_states"], "decoder": dec[1]["inner_states"]}
        for stack, layers in (("encoder", model.encoder.layers), ("decoder", model.decoder.layers)):
            grads = torch.autograd.grad(loss, states[stack], retain_graph=True)
            for i, layer in enumerate(layers, start=1):
                assert measured[stack, i, "output"][b] == pytest.approx(grads[i].norm().item(), rel=1e-4)
                params = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
                assert measured[stack, i, "params"][b] == pytest.approx(norm(params), rel=1e-4)
            if connection in ("pre-ln", "peri-ln"):  # the first layer norm reads the embedded input itself
                assert measured[stack, 1, "ln1_in"][b] == pytest.approx(grads[0].norm().item(), rel=1e-4)
    assert all(len(values) == len(batches) for values in measured.values())
    assert model.encoder.layers[0].fc1.weight.grad is None, "measure() must not leave gradients behind"


class Recording:
    """The connection equations of PAPER.md, keeping each layer norm's input and output (in call order)."""

    def __init__(self, name):
        self.name, self.taps = name, []

    def _norm(self, norm, s):
        h = norm(s)
        self.taps += [s, h]
        return h

    def sublayer(self, layer, name, x, f, norm, carry):
        if self.name == "pre-ln":
            return x + f(self._norm(norm, x))
        return self._norm(norm, x + f(x))

    def last_sublayer(self, layer, name, x, f, norm, carry, bottom):
        if self.name == "b2t":
            return self._norm(norm, bottom + x + f(x))
        return self.sublayer(layer, name, x, f, norm, carry)


@pytest.mark.parametrize("connection", CONNECTIONS)
def test_layer_norm_positions_match_autograd(data_dir, connection):
    model, task = small_model(data_dir, connection)
    batches = samples(task.src_dict, n=1)
    net = batches[0]["net_input"]
    reference = model(**net)[0]
    recorders = {}
    for stack in (model.encoder, model.decoder):
        for layer in stack.layers:
            recorders[layer] = layer.connection = Recording(connection)
    assert torch.allclose(model(**net)[0], reference, atol=1e-6), "the recording connection must compute the same"

    measured = grad_norms.measure(model, ce_criterion(task), batches)
    for recorder in recorders.values():
        recorder.taps = []
    dec = model.decoder(net["prev_output_tokens"], encoder_out=model.encoder(net["src_tokens"], net["src_lengths"]))
    loss = token_ce(model, batches[0], dec)
    for stack, layers in (("encoder", model.encoder.layers), ("decoder", model.decoder.layers)):
        for i, layer in enumerate(layers, start=1):
            taps = recorders[layer].taps
            assert len(taps) == (6 if stack == "decoder" else 4)
            grads = torch.autograd.grad(loss, taps, retain_graph=True)
            names = [f"ln{k}_{end}" for k in range(1, len(taps) // 2 + 1) for end in ("in", "out")]
            for name, grad in zip(names, grads):
                assert measured[stack, i, name][0] == pytest.approx(grad.norm().item(), rel=1e-4), (stack, i, name)


def test_post_ln_gradient_before_a_layer_norm_is_its_backward_of_the_one_after(data_dir):
    # LayerNorm's backward written out: g_in = (g - mean(g) - y * mean(g * y)) / sigma, with g = gamma * g_out
    model, task = small_model(data_dir, "post-ln")
    sample = samples(task.src_dict, n=1)[0]
    measured = grad_norms.measure(model, ce_criterion(task), [sample])
    top = model.decoder.layers[-1]
    taps = {}

    def keep(module, inputs, output):
        taps["in"], taps["out"] = inputs[0], output

    handle = top.final_layer_norm.register_forward_hook(keep)
    net = sample["net_input"]
    dec = model.decoder(net["prev_output_tokens"], encoder_out=model.encoder(net["src_tokens"], net["src_lengths"]))
    handle.remove()
    g_out = torch.autograd.grad(token_ce(model, sample, dec), taps["out"])[0]
    s = taps["in"].detach()
    sigma = (s.var(-1, unbiased=False, keepdim=True) + top.final_layer_norm.eps).sqrt()
    y = (s - s.mean(-1, keepdim=True)) / sigma
    g = top.final_layer_norm.weight * g_out
    g_in = (g - g.mean(-1, keepdim=True) - y * (g * y).mean(-1, keepdim=True)) / sigma
    n = len(model.decoder.layers)
    assert measured["decoder", n, "ln3_in"][0] == pytest.approx(g_in.norm().item(), rel=1e-4)
    assert measured["decoder", n, "ln3_out"][0] == pytest.approx(g_out.norm().item(), rel=1e-4)


# --------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real tiny fairseq-train run (with --log-layer-grad-norms): its stdout log, --log-file, checkpoint, data-bin.

    The corpus is smaller than conftest's toy_corpus and binarized in-process, so this file stays fast alone.
    """
    from fairseq import options
    from fairseq_cli import preprocess

    from b2t_fairseq.toy import translation as toy_translation

    root = tmp_path_factory.mktemp("trained")
    (root / "fake-wandb").mkdir()
    (root / "fake-wandb" / "wandb.py").write_text(FAKE_WANDB)
    toy_translation.write_corpus(root / "raw", n_train=200, n_valid=40, n_test=1, seed=3)
    preprocess.main(options.get_preprocessing_parser().parse_args([
        "--source-lang", "src", "--target-lang", "tgt", "--trainpref", str(root / "raw" / "train"),
        "--validpref", str(root / "raw" / "valid"), "--destdir", str(root / "data-bin"), "--joined-dictionary",
    ]))  # fmt: skip
    proc = run(
        "fairseq-train", root / "data-bin", "--user-dir", REPO / "b2t_fairseq", "--arch", "transformer_b2t",
        *TINY_MODEL, *TINY_OPTIM, "--max-tokens", 500, "--log-interval", 3, "--max-update", 9,
        "--log-layer-grad-norms", 3, "--save-dir", root / "ckpt", "--no-epoch-checkpoints",
        "--log-file", root / "file.log", "--tensorboard-logdir", root / "tb", "--wandb-project", "b2t-test",
        env={"PYTHONPATH": root / "fake-wandb", "FAKE_WANDB_LOG": root / "wandb.jsonl"},
    )  # fmt: skip
    (root / "stdout.log").write_text(proc.stdout)
    return {
        "tensorboard": root / "tb", "wandb": root / "wandb.jsonl",
        "stdout": root / "stdout.log", "file": root / "file.log", "checkpoint": root / "ckpt" / "checkpoint_last.pt",
        "data_bin": root / "data-bin", "raw": root / "raw",
    }  # fmt: skip


# What fairseq's WandBProgressBarWrapper calls, recorded; a value wandb's run history cannot hold is refused.
# (The real client is 20 MB with a background service and wants an account or offline files; fairseq's wrapper
# code, which is what our metrics meet, runs unchanged.)
FAKE_WANDB = """
import json, numbers, os

_log = open(os.environ["FAKE_WANDB_LOG"], "a")


def _write(record):
    _log.write(json.dumps(record) + "\\n")
    _log.flush()


class _Config:
    def update(self, values):
        _write({"config": json.loads(json.dumps(values, default=str))})


config = _Config()


def init(project=None, reinit=False, name=None):
    _write({"init": project})


def log(values, step=None):
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"wandb.log: {key} is a {type(value).__name__}, not a number")
    _write({"step": step, "values": values})
"""


def tensorboard_scalars(logdir):
    """{tag: [(step, value)]} of the tensorboard event files under ``logdir``, read record by record (TFRecord
    framing: length, its crc, the Event proto, its crc) with tensorboardX's proto classes."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def logged_points(text, split):
    """(num_updates, loss) of the '| split | {json}' lines, read independently of the tool."""
    points = []
    for line in text.splitlines():
        if f"| {split} |" in line:
            stats = json.loads(line.split(f"| {split} |", 1)[1])
            key = "" if split == "train_inner" else f"{split}_"
            points.append((int(stats[f"{key}num_updates"]), float(stats[f"{key}loss"])))
    return points


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def curve_of(rows, run, split):
    return [(int(r["num_updates"]), float(r["value"])) for r in rows if r["run"] == run and r["split"] == split]


def test_grad_norms_cli_end_to_end_with_several_runs(tmp_path, capsys):
    argv = [
        "--connections", "post-ln", "b2t", "--seeds", 1, 2, "--num-batches", 1, "--max-tokens", 300, "--per-batch",
        "--log-y", "--out-csv", tmp_path / "g.csv", "--out-png", tmp_path / "g.png", "--", *SMALL,
    ]  # fmt: skip
    grad_norms.cli_main(list(map(str, argv)))
    png = (tmp_path / "g.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000
    rows = read_csv(tmp_path / "g.csv")
    # per run and seed: encoder 2 layers x (2 layer norms x in/out + output + params), decoder 3 x (3 x 2 + 2);
    # each once as the mean and once for the single batch
    assert len(rows) == 2 * 2 * (2 * 6 + 3 * 8) * 2
    assert {(r["run"], r["seed"]) for r in rows} == {(c, s) for c in ("post-ln", "b2t") for s in ("1", "2")}
    assert all(r["run"] == r["connection"] and float(r["value"]) > 0 for r in rows)
    value = {(r["run"], r["seed"], r["stack"], r["layer"], r["position"], r["batch"]): float(r["value"]) for r in rows}
    key = ("decoder", "1", "params", "mean")
    assert value[("b2t", "1", *key)] != value[("b2t", "2", *key)], "--seeds must change the initialization"
    assert value[("b2t", "1", *key)] != value[("post-ln", "1", *key)]
    assert value[("b2t", "1", *key)] == value[("b2t", "1", *key[:-1], "0")], "one batch: mean = that batch"
    assert "wrote" in capsys.readouterr().out


def test_grad_norms_of_a_checkpoint_on_a_data_bin(trained, tmp_path):
    grad_norms.cli_main([
        "--path", f"mine={trained['checkpoint']}", "--data-bin", str(trained["data_bin"]), "--subset", "valid",
        "--num-batches", "2", "--max-tokens", "500", "--out-csv", str(tmp_path / "c.csv"),
        "--out-png", str(tmp_path / "c.png"),
    ])  # fmt: skip
    rows = read_csv(tmp_path / "c.csv")
    assert {r["run"] for r in rows} == {"mine"} and {r["connection"] for r in rows} == {"b2t"}
    assert len(rows) == 2 * 6 + 2 * 8  # TINY_MODEL: 2 encoder and 2 decoder layers, mean rows only
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_SIGNATURE)


def test_grad_norms_of_a_language_model(trained, tmp_path):
    from fairseq import options
    from fairseq_cli import preprocess

    preprocess.main(options.get_preprocessing_parser().parse_args([
        "--only-source", "--trainpref", str(trained["raw"] / "train.tgt"), "--destdir", str(tmp_path / "lm-bin"),
    ]))  # fmt: skip
    grad_norms.cli_main([
        "--data-bin", str(tmp_path / "lm-bin"), "--connections", "b2t", "pre-ln", "--num-batches", "1",
        "--out-csv", str(tmp_path / "lm.csv"), "--out-png", str(tmp_path / "lm.png"), "--", "--task",
        "language_modeling", "--arch", "transformer_lm_b2t", "--decoder-layers", "2", "--decoder-embed-dim", "16",
        "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2", "--tokens-per-sample", "32",
    ])  # fmt: skip
    rows = read_csv(tmp_path / "lm.csv")
    # decoder-only layers: LN1 (self-attention) and LN2 (FFN), no encoder
    assert {r["stack"] for r in rows} == {"decoder"}
    assert {r["position"] for r in rows} == {"ln1_in", "ln1_out", "ln2_in", "ln2_out", "output", "params"}
    assert len(rows) == 2 * 2 * 6
    assert (tmp_path / "lm.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-bin", "/nonexistent/data-bin"], "data directory not found"),
        (["--path", "/nonexistent/checkpoint.pt"], "checkpoint not found"),
        (["--", "--arch", "transformer_nope"], "unknown --arch 'transformer_nope'"),
        (["--", "--arch", "transformer"], "not a b2t_fairseq architecture"),
        (["--", "--encoder-normalize-before"], "use --connection pre-ln"),
        (["--", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--connections", "b2t", "--", "--connection", "pre-ln"], "not both"),
        (["--path", "a.pt", "--connections", "b2t"], "drop --connections"),
        (["--", "--task", "language_modeling", "--arch", "transformer_lm_b2t"], "give --task language_modeling a"),
    ],
)
def test_grad_norms_bad_input_is_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        grad_norms.cli_main(["--out-csv", str(tmp_path / "g.csv"), "--out-png", str(tmp_path / "g.png"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("b2t-grad-norms: error: ") and message in err[0], err
    assert not (tmp_path / "g.csv").exists()


def test_help_describes_every_option(capsys):
    for main, options in (
        (grad_norms.cli_main, ["--connections", "--path", "--seeds", "--data-bin", "--num-batches", "--train-mode",
                               "--per-batch", "--log-y", "ln3_in", "x + h2 + FFN(h2)"]),
        (loss_curves.cli_main, ["--run", "--metric", "--out-png", "--out-csv", "--log-y", "train_inner", "resumed"]),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(option in text for option in options), [o for o in options if o not in text]


# --------------------------------------------------------------------------------------------- loss curves
def test_loss_curves_from_a_real_log(trained, tmp_path):
    text = trained["stdout"].read_text()
    inner, valid = logged_points(text, "train_inner"), logged_points(text, "valid")
    assert len(inner) >= 3 and len(valid) >= 2, "the tiny run should log several train_inner and valid lines"

    loss_curves.cli_main(["--run", f"b2t={trained['stdout']}", "--run", str(trained["file"]),
                          "--out-csv", str(tmp_path / "l.csv"), "--out-png", str(tmp_path / "l.png")])  # fmt: skip
    rows = read_csv(tmp_path / "l.csv")
    assert curve_of(rows, "b2t", "train_inner") == inner
    assert curve_of(rows, "b2t", "valid") == valid
    assert curve_of(rows, "b2t", "train") == logged_points(text, "train")
    # --log-file writes bare json messages; the label defaults to the file stem
    assert curve_of(rows, "file", "train_inner") == inner and curve_of(rows, "file", "valid") == valid
    png = (tmp_path / "l.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_loss_curves_of_a_resumed_run_keep_the_later_attempt(trained, tmp_path):
    text = trained["stdout"].read_text()
    inner = logged_points(text, "train_inner")
    # a second attempt, resumed from a checkpoint before the last logged update, logs those updates again
    redone = []
    for line in text.splitlines():
        if "| train_inner |" in line:
            head, body = line.split("| train_inner |")
            stats = json.loads(body)
            stats["loss"] = str(float(stats["loss"]) + 100)
            redone.append(f"{head}| train_inner | {json.dumps(stats)}")
    (tmp_path / "resumed.log").write_text("\n".join(redone[1:]) + "\n")
    loss_curves.cli_main(["--run", f"r={trained['stdout']}", "--run", f"r={tmp_path / 'resumed.log'}",
                          "--out-csv", str(tmp_path / "l.csv"), "--out-png", str(tmp_path / "l.png")])  # fmt: skip
    got = curve_of(read_csv(tmp_path / "l.csv"), "r", "train_inner")
    assert [u for u, _ in got] == [u for u, _ in inner], "each update once"
    assert got[0] == inner[0]
    assert [loss for _, loss in got[1:]] == pytest.approx([loss + 100 for _, loss in inner[1:]])


@pytest.mark.parametrize(
    "case, message",
    [("missing", "no such log file"), ("empty", "is empty"), ("plain text", "has no json stats lines"),
     ("metric", "logs no 'bleu'; it logs: ")],
)  # fmt: skip
def test_loss_curves_bad_input_is_one_line(trained, tmp_path, capsys, case, message):
    (tmp_path / "empty.log").write_text("")
    (tmp_path / "plain.log").write_text("epoch 001 | loss 9.1 | nll_loss 9.0 | num_updates 10\n")
    argv = {
        "missing": ["--run", str(tmp_path / "nope.log")],
        "empty": ["--run", str(tmp_path / "empty.log")],
        "plain text": ["--run", str(tmp_path / "plain.log")],
        "metric": ["--run", str(trained["stdout"]), "--metric", "bleu"],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        loss_curves.cli_main([*argv, "--out-csv", str(tmp_path / "l.csv"), "--out-png", str(tmp_path / "l.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("b2t-loss-curves: error: ") and message in err[0], err
    assert not (tmp_path / "l.csv").exists()


# --------------------------------------------------------------------------------------------- live logging
# dyt: a norm type with its own parameters (alpha) inside every layer
@pytest.mark.parametrize("norm_type", ["layernorm", "dyt"])
def test_live_layer_grad_norms_are_the_gradient_per_target_token(data_dir, norm_type):
    from fairseq.logging import metrics

    argv = ["--arch", "transformer_b2t", *SMALL, "--norm-type", norm_type]
    model, task, _ = build_model(data_dir, [*argv, "--log-layer-grad-norms", 2])
    plain = build_model(data_dir, argv)[0]
    assert not any(isinstance(m, LayerGradNormLogger) for m in plain.modules()), "off must attach nothing"
    assert model.state_dict().keys() == plain.state_dict().keys(), "checkpoints must not change"
    model.train()
    criterion, batches = ce_criterion(task), samples(task.src_dict, n=4)
    micro_batches = [[batches[0]], [batches[1]], batches[2:]]  # the last update with --update-freq 2
    expected = defaultdict(list)
    with metrics.aggregate(new_root=True) as aggregate:
        for update, micro in enumerate(micro_batches):
            model.zero_grad(set_to_none=True)
            for sample in micro:  # fairseq's task.train_step: set_num_updates, then forward and backward
                model.set_num_updates(update)
                criterion(model, sample)[0].backward()  # the summed loss, as the trainer backpropagates it
            if update % 2 == 0:
                ntokens = sum(sample["ntokens"] for sample in micro)
                for stack in (model.encoder, model.decoder):
                    for i, layer in enumerate(stack.layers, start=1):
                        key = f"gnorm_{'enc' if stack is model.encoder else 'dec'}{i}"
                        expected[key].append(norm([p.grad for p in layer.parameters()]) / ntokens)
        model.set_num_updates(len(micro_batches))
        logged = {k: v for k, v in aggregate.get_smoothed_values().items() if k.startswith("gnorm_")}
    assert sorted(logged) == sorted(expected) and len(expected) == 2 + 3
    for key, values in expected.items():  # two logged updates (0 and 2), averaged like any fairseq metric
        assert logged[key] == pytest.approx(sum(values) / len(values), rel=1e-4), key


def test_live_layer_grad_norms_in_a_real_training_log(trained, tmp_path):
    text = trained["stdout"].read_text()
    lines = [json.loads(line.split("| train_inner |", 1)[1]) for line in text.splitlines() if "| train_inner |" in line]
    keys = {"gnorm_enc1", "gnorm_enc2", "gnorm_dec1", "gnorm_dec2"}  # TINY_MODEL: 2 + 2 layers
    assert lines and all({k for k in stats if k.startswith("gnorm_")} == keys for stats in lines)
    assert all(float(stats[k]) > 0 for stats in lines for k in keys)
    loss_curves.cli_main(["--run", str(trained["stdout"]), "--metric", "gnorm_dec1",
                          "--out-csv", str(tmp_path / "g.csv"), "--out-png", str(tmp_path / "g.png")])  # fmt: skip
    got = curve_of(read_csv(tmp_path / "g.csv"), "stdout", "train_inner")
    assert got == [(int(stats["num_updates"]), float(stats["gnorm_dec1"])) for stats in lines]


def test_layer_grad_norms_reach_tensorboard_and_wandb(trained):
    """--tensorboard-logdir works with the runtime install (tensorboardX) and --wandb-project takes our metrics:
    both receive every gnorm value of the json log, at its update."""
    text = trained["stdout"].read_text()
    lines = [json.loads(line.split("| train_inner |", 1)[1]) for line in text.splitlines() if "| train_inner |" in line]
    keys = ("gnorm_enc1", "gnorm_enc2", "gnorm_dec1", "gnorm_dec2")
    expected = {k: [(int(stats["num_updates"]), float(stats[k])) for stats in lines] for k in keys}
    assert all(len(points) == 3 for points in expected.values())  # updates 3, 6, 9

    board = tensorboard_scalars(trained["tensorboard"] / "train_inner")
    assert "loss" in board
    for key, points in expected.items():
        assert [step for step, _ in board[key]] == [step for step, _ in points], key
        # the json log rounds to 3 significant digits; tensorboard stores float32
        assert [v for _, v in board[key]] == pytest.approx([v for _, v in points], rel=5e-3), key

    records = [json.loads(line) for line in trained["wandb"].read_text().splitlines()]
    assert records[0] == {"init": "b2t-test"}
    assert any("config" in r for r in records)
    for key, points in expected.items():
        got = [(r["step"], r["values"][f"train_inner/{key}"]) for r in records if f"train_inner/{key}" in r.get("values", {})]
        assert [step for step, _ in got] == [step for step, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=5e-3), key
