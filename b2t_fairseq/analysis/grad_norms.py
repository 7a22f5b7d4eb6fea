"""Per-layer gradient norms of b2t_fairseq models: the paper's gradient-flow analysis, for any arch and depth.

    b2t-grad-norms --connections post-ln pre-ln b2t --seeds 1 2 3 -- --arch transformer_b2t --decoder-layers 18
    b2t-grad-norms --data-bin data-bin --connections post-ln b2t --log-y -- --arch transformer_b2t_wmt_en_de_18l
    b2t-grad-norms --data-bin data-bin --path ckpt/checkpoint_last.pt pre-ln=ckpt_pre/checkpoint_last.pt

A model is built at initialization from fairseq-train model flags (after ``--``; one model per --connections x
--seeds), or loaded from checkpoints (--path, each ``[LABEL=]FILE``). The loss of the model's criterion (the
one in the flags or checkpoint; fairseq's default is plain cross-entropy, so add ``--criterion
label_smoothed_cross_entropy --label-smoothing 0.1`` after ``--`` to match training) is divided by its sample
size, as fairseq's trainer does before the optimizer step, and backpropagated on each of --num-batches batches
(from --data-bin, or the generated toy corpus of b2t_fairseq.toy.translation without one). For every encoder
and decoder layer (1 = bottom) it records the L2 norm of

    params   the gradient of all the layer's parameters together
    output   the gradient w.r.t. the layer's output tensor
    lnK_in   the gradient w.r.t. the tensor the layer's K-th layer norm reads
    lnK_out  the gradient w.r.t. the tensor that layer norm returns

LN1 is self-attention's layer norm, LN2 cross-attention's, LN3 the FFN's (encoder and language-model layers:
LN1, then LN2 = the FFN's). Methods without layer norms (tfixup, rezero) have only ``output`` and ``params``;
for the others the lnK positions are the input and output of the sub-layer's own norm where their formula
(README's method table) places it. The gradient at a tensor is its total gradient over all its uses. What the
positions are, per connection (x = layer input, decoder layer shown; (1)-(5) are the paper's Fig. 2(a)):

    position | post-ln                             | b2t                        | pre-ln
    ln1_in   | x + SelfAttn(x)                 (1) | as post-ln                 | x (also the residual path)
    ln1_out  | h1 = LN1(x + SelfAttn(x))       (2) | as post-ln                 | LN1(x), what SelfAttn reads
    ln2_in   | h1 + CrossAttn(h1)              (3) | as post-ln                 | h1 = x + SelfAttn(LN1(x))
    ln2_out  | h2 = LN2(h1 + CrossAttn(h1))    (4) | as post-ln                 | LN2(h1), what CrossAttn reads
    ln3_in   | h2 + FFN(h2)                    (5) | x + h2 + FFN(h2)           | h2 = h1 + CrossAttn(LN2(h1))
    ln3_out  | y = LN3(h2 + FFN(h2))               | y = LN3(x + h2 + FFN(h2))  | LN3(h2), what FFN reads
    output   | y (the tensor ln3_out is)           | y (the tensor ln3_out is)  | y = h2 + FFN(LN3(h2)); the top
             |                                     |                            | layer's feeds the stack's final LN

Each value is the mean over the batches (rows with batch=mean); --per-batch adds one row per batch. Dropout
and word dropout are off unless --train-mode, so the numbers are deterministic. --seeds seeds the model's
initialization (as fairseq-train --seed does) and the batch order; runs with the same seed see the same
batches. The CSV has one row per run, seed, stack, layer, position and batch; the PNG shows the mean over seeds
(band: min to max) per run: parameter and output gradient norms against the layer index for the encoder and
the decoder, and the positions inside one decoder layer (--position-layer, default the top one).
"""
import argparse
import contextlib
import io
import itertools
import logging
import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from b2t_fairseq.analysis.output import pyplot, run_colors, save_png, write_csv
from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.modules import CONNECTIONS, ConnectedDecoderLayer, ConnectedEncoderLayer
from b2t_fairseq.tools.pipeline import split_passthrough

PROG = "b2t-grad-norms"
PLUGIN_DIR = Path(__file__).resolve().parents[1]
STACKS = ("encoder", "decoder")
# the layer norms of a layer, bottom to top; a decoder without cross-attention has no encoder_attn_layer_norm
LAYER_NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
CSV_FIELDS = ("run", "connection", "seed", "stack", "layer", "position", "batch", "value")


# ------------------------------------------------------------------------------------------ measuring
def layer_stacks(model):
    """[(stack name, layers)] of a b2t_fairseq model; the encoder is absent in a language model."""
    stacks = []
    for name in STACKS:
        part = getattr(model, name, None)
        layers = list(getattr(part, "layers", None) or [])
        if not layers:
            continue
        if not all(isinstance(layer, (ConnectedEncoderLayer, ConnectedDecoderLayer)) for layer in layers):
            raise B2TConfigError(
                f"the model's {name} layers are {type(layers[0]).__name__}, not b2t_fairseq layers; use a "
                "transformer_b2t* or transformer_lm_b2t* arch (--connection post-ln/pre-ln give the baselines)"
            )
        stacks.append((name, layers))
    if not stacks:
        raise B2TConfigError(f"{type(model).__name__} has no encoder or decoder layers to measure")
    return stacks


def positions(layer):
    """Position names of one layer, bottom to top (see the table in the module docstring)."""
    norms = [n for n in LAYER_NORMS if getattr(layer, n, None) is not None]
    return [f"ln{k}_{end}" for k in range(1, len(norms) + 1) for end in ("in", "out")] + ["output", "params"]


class GradientRecorder:
    """Forward hooks that put a gradient hook on every tensor of interest; ``values`` maps
    (stack, layer, position) to the norm of the gradient of the last backward pass."""

    def __init__(self, model):
        self.stacks = layer_stacks(model)
        self.values = {}
        self._handles = []

    def _record(self, key, tensor):
        if torch.is_tensor(tensor) and tensor.requires_grad:
            # overwriting (not appending) keeps one value when activation checkpointing re-runs a layer
            tensor.register_hook(lambda grad: self.values.__setitem__(key, grad.detach().float().norm().item()))

    def __enter__(self):
        for stack, layers in self.stacks:
            for index, layer in enumerate(layers, start=1):
                norms = [getattr(layer, n) for n in LAYER_NORMS if getattr(layer, n, None) is not None]
                for k, norm in enumerate(norms, start=1):
                    self._handles.append(norm.register_forward_hook(self._norm_hook(stack, index, k)))
                self._handles.append(layer.register_forward_hook(self._output_hook(stack, index)))
        return self

    def _norm_hook(self, stack, index, k):
        def hook(module, inputs, output):
            self._record((stack, index, f"ln{k}_in"), inputs[0])
            self._record((stack, index, f"ln{k}_out"), output)

        return hook

    def _output_hook(self, stack, index):
        def hook(module, inputs, output):
            # decoder layers return (x, attn, None)
            self._record((stack, index, "output"), output[0] if isinstance(output, tuple) else output)

        return hook

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def parameter_norms(self):
        for stack, layers in self.stacks:
            for index, layer in enumerate(layers, start=1):
                grads = [p.grad.detach().float() for p in layer.parameters() if p.grad is not None]
                self.values[stack, index, "params"] = math.sqrt(sum(g.pow(2).sum().item() for g in grads))


def measure(model, criterion, samples):
    """Per-batch gradient norms: {(stack, layer, position): [one value per sample]}.

    The loss is criterion(model, sample) divided by its sample size, the gradient fairseq's trainer steps on.
    Leaves the model's .grad cleared.
    """
    per_batch = defaultdict(list)
    with GradientRecorder(model) as recorder:
        for sample in samples:
            model.zero_grad(set_to_none=True)
            recorder.values = {}
            loss, sample_size, _ = criterion(model, sample)
            (loss / max(float(sample_size), 1.0)).backward()
            recorder.parameter_norms()
            for key, value in recorder.values.items():
                per_batch[key].append(value)
    model.zero_grad(set_to_none=True)
    expected = {
        (stack, i, position)
        for stack, layers in recorder.stacks
        for i, layer in enumerate(layers, start=1)
        for position in positions(layer)
    }
    missing = expected - per_batch.keys()
    if missing:  # e.g. a layer the loss does not reach: say so rather than plot a hole
        raise B2TConfigError(f"no gradient reached {len(missing)} positions, e.g. {sorted(missing)[0]}")
    return dict(per_batch)


# ------------------------------------------------------------------------------------------ models and data
def _flag_value(argv, *names):
    """The value of the last ``--name VALUE`` / ``--name=VALUE`` in ``argv``, or None."""
    value = None
    for i, flag in enumerate(argv):
        if flag in names and i + 1 < len(argv):
            value = argv[i + 1]
        elif flag.split("=", 1)[0] in names and "=" in flag:
            value = flag.split("=", 1)[1]
    return value


def _check_arch(model_argv):
    from fairseq.models import ARCH_MODEL_REGISTRY

    arch = _flag_value(model_argv, "--arch", "-a")
    if arch is None:
        return ["--arch", "transformer_b2t", *model_argv]
    if arch not in ARCH_MODEL_REGISTRY:
        raise B2TConfigError(f"unknown --arch {arch!r}")
    if ARCH_MODEL_REGISTRY[arch].__module__.split(".")[0] != "b2t_fairseq":
        raise B2TConfigError(
            f"--arch {arch} is not a b2t_fairseq architecture; use transformer_b2t* or transformer_lm_b2t* "
            "(--connection post-ln/pre-ln give the baselines)"
        )
    return list(model_argv)


def parse_model_args(data_dir, model_argv):
    """fairseq-train's own option parsing (architecture functions included); usage errors become one line."""
    from fairseq import options

    argv = [str(data_dir), "--user-dir", str(PLUGIN_DIR), *_check_arch(model_argv)]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return options.parse_args_and_arch(options.get_training_parser(), argv)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        message = message[-1].split("error: ", 1)[-1] if message else "bad model flags"
        raise B2TConfigError(f"model flags after '--': {message}") from None


def build_at_init(data_dir, model_argv, seed):
    """(model, task, criterion) built as fairseq-train builds them with --seed ``seed``."""
    from fairseq import tasks

    args = parse_model_args(data_dir, model_argv)
    task = tasks.setup_task(args)
    torch.manual_seed(seed)
    model = task.build_model(args)
    return model, task, task.build_criterion(args)


def load_checkpoint(path, data_dir=None):
    """(model, task, criterion) of a fairseq checkpoint; ``data_dir`` replaces the data directory it names."""
    from fairseq import checkpoint_utils

    if not Path(path).is_file():
        raise B2TConfigError(f"checkpoint not found: {path}")
    overrides = {"data": str(data_dir)} if data_dir is not None else None
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides=overrides)
    except B2TConfigError:
        raise
    except Exception as e:  # a foreign file, a missing data directory, dictionaries of another size ...
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise B2TConfigError(f"cannot load checkpoint {path}: {first_line}") from e
    return models[0], task, task.build_criterion(cfg.criterion)


def toy_data_dir(directory):
    """Write the dictionaries of the generated toy corpus (both sides, joined) into ``directory``."""
    from fairseq.data import Dictionary

    from b2t_fairseq.toy import translation as toy_translation

    dictionary = Dictionary()
    for word in sorted(toy_translation.source_vocab() | toy_translation.target_vocab()):
        dictionary.add_symbol(word)
    for side in ("src", "tgt"):
        dictionary.save(str(Path(directory) / f"dict.{side}.txt"))
    return ["--task", "translation", "--source-lang", "src", "--target-lang", "tgt"]


def attach_toy_dataset(task, subset, num_sentences, seed=1):
    """Give ``task`` an in-memory ``subset`` of generated toy sentence pairs."""
    from fairseq.data import LanguagePairDataset

    from b2t_fairseq.toy import translation as toy_translation

    def encode(lines, dictionary):
        return [dictionary.encode_line(line, add_if_not_exist=False, append_eos=True).long() for line in lines]

    pairs = toy_translation.generate_pairs(num_sentences, seed)
    src = encode([s for s, _ in pairs], task.src_dict)
    tgt = encode([t for _, t in pairs], task.tgt_dict)
    task.datasets[subset] = LanguagePairDataset(
        src, [len(s) for s in src], task.src_dict, tgt, [len(t) for t in tgt], task.tgt_dict
    )


def load_batches(task, model, subset, num_batches, max_tokens, batch_size, seed):
    """The first ``num_batches`` batches of ``subset`` in fairseq's shuffled order for ``seed``."""
    from fairseq import utils

    if subset not in task.datasets:
        try:
            task.load_dataset(subset, combine=False, epoch=1)
        except FileNotFoundError as e:
            raise B2TConfigError(f"no {subset!r} data: {e}") from None
    iterator = task.get_batch_iterator(
        dataset=task.dataset(subset),
        max_tokens=max_tokens,
        max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
        seed=seed,
        disable_iterator_cache=True,
    )
    batches = list(itertools.islice(iterator.next_epoch_itr(shuffle=True), num_batches))
    if not batches:
        raise B2TConfigError(f"the {subset!r} data gives no batch")
    return batches


# ------------------------------------------------------------------------------------------ runs, CSV, plot
def _order(key):
    stack, layer, position = key
    rank = {"output": 1, "params": 2}.get(position, 0)  # after the lnK_in/lnK_out positions
    return STACKS.index(stack), layer, rank, position


def summarize(run, connection, seed, per_batch, with_batches=False):
    """CSV rows (dicts) of one measured model, bottom to top: the mean over batches, and each batch if asked."""
    rows = []
    for (stack, layer, position), values in sorted(per_batch.items(), key=lambda item: _order(item[0])):
        base = dict(run=run, connection=connection, seed=seed, stack=stack, layer=layer, position=position)
        rows.append(dict(base, batch="mean", value=sum(values) / len(values)))
        if with_batches:
            rows += [dict(base, batch=i, value=v) for i, v in enumerate(values)]
    return rows


def _series(rows, run, stack, position):
    """{layer: [value per seed]} of the mean rows."""
    by_layer = defaultdict(list)
    for r in rows:
        if r["run"] == run and r["stack"] == stack and r["position"] == position and r["batch"] == "mean":
            by_layer[r["layer"]].append(r["value"])
    return dict(sorted(by_layer.items()))


def _draw(ax, xs, values_per_x, label, color):
    mean = [sum(v) / len(v) for v in values_per_x]
    ax.plot(xs, mean, marker="o", markersize=3, label=label, color=color)
    if any(len(v) > 1 for v in values_per_x):
        ax.fill_between(xs, [min(v) for v in values_per_x], [max(v) for v in values_per_x], color=color, alpha=0.2)


def plot(rows, path, log_y=False, position_layer=None, title=None):
    """The figure described in the module docstring; returns the decoder layer whose positions it shows."""
    plt = pyplot()

    runs = list(dict.fromkeys(r["run"] for r in rows))
    stacks = [s for s in STACKS if any(r["stack"] == s for r in rows)]
    colors = run_colors(plt, runs)
    pos_stack = "decoder" if "decoder" in stacks else stacks[-1]
    top = max(r["layer"] for r in rows if r["stack"] == pos_stack)
    position_layer = top if position_layer is None else position_layer
    if not 1 <= position_layer <= top:
        raise B2TConfigError(f"--position-layer {position_layer} is outside 1..{top}")

    fig = plt.figure(figsize=(max(7, 5 * len(stacks)), 10), layout="constrained")
    if title:
        fig.suptitle(title)
    grid = fig.add_gridspec(3, len(stacks))
    for row, (position, what) in enumerate((("params", "parameter gradient"), ("output", "layer-output gradient"))):
        for col, stack in enumerate(stacks):
            ax = fig.add_subplot(grid[row, col])
            for run in runs:
                series = _series(rows, run, stack, position)
                if series:
                    _draw(ax, list(series), list(series.values()), run, colors[run])
            ax.set_title(f"{stack}: {what}")
            ax.set_xlabel("layer")
            ax.set_ylabel("L2 norm")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    ax = fig.add_subplot(grid[2, :])
    for run in runs:
        picked = [r for r in rows if r["run"] == run and r["stack"] == pos_stack and r["layer"] == position_layer]
        names = [p for p in dict.fromkeys(r["position"] for r in picked) if p.startswith("ln")]
        per_pos = [[r["value"] for r in picked if r["position"] == p and r["batch"] == "mean"] for p in names]
        _draw(ax, names, per_pos, run, colors[run])
    ax.set_title(f"{pos_stack} layer {position_layer}: at the input and output of each layer norm")
    ax.set_ylabel("L2 norm of the gradient")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)
    return position_layer


def _parse_checkpoint_arg(value):
    """``[LABEL=]FILE``: a label only when the whole string is not itself an existing file."""
    if "=" in value and not Path(value).exists():
        label, path = value.split("=", 1)
        return label, Path(path)
    return None, Path(value)


def _device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise B2TConfigError("--device cuda, but torch sees no GPU")
    return torch.device(name)


def _connection(model):
    return layer_stacks(model)[0][1][0].connection.name


def _models(args, model_argv, tmp):
    """Yield (run label, seed, model, task, criterion) for every requested run."""
    if args.path:
        loaded = []
        for spec in args.path:
            label, path = _parse_checkpoint_arg(spec)
            model, task, criterion = load_checkpoint(path, args.data_bin)
            loaded.append([label or _connection(model), path, model, task, criterion])
        labels = [entry[0] for entry in loaded]
        for entry in loaded:
            if labels.count(entry[0]) > 1:  # two checkpoints of one connection: tell them apart
                entry[0] = f"{entry[0]}:{entry[1]}"
        for label, _, model, task, criterion in loaded:
            for seed in args.seeds:
                yield label, seed, model, task, criterion
        return
    toy = args.data_bin is None
    task = _flag_value(model_argv, "--task")
    if toy and task not in (None, "translation"):
        raise B2TConfigError(f"the generated toy data is for the translation task; give --task {task} a --data-bin")
    data_dir, task_flags = (tmp, toy_data_dir(tmp)) if toy else (args.data_bin, [])
    for connection in args.connections or [None]:
        flags = [*task_flags, *model_argv, *(["--connection", connection] if connection else [])]
        for seed in args.seeds:
            model, task, criterion = build_at_init(data_dir, flags, seed)
            if toy:
                attach_toy_dataset(task, args.subset, num_sentences=max(200, args.num_batches * args.max_tokens // 8))
            yield _connection(model), seed, model, task, criterion


def run_all(args, model_argv, log=print):
    """Measure every requested run; returns the CSV rows."""
    from fairseq import utils

    device = _device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, seed, model, task, criterion in _models(args, model_argv, tmp):
            model.to(device).train(args.train_mode)
            criterion.to(device)
            samples = load_batches(task, model, args.subset, args.num_batches, args.max_tokens, args.batch_size, seed)
            if device.type == "cuda":
                samples = [utils.move_to_cuda(s) for s in samples]
            torch.manual_seed(seed)  # dropout masks, with --train-mode
            per_batch = measure(model, criterion, samples)
            rows += summarize(label, _connection(model), seed, per_batch, args.per_batch)
            outputs = []
            for stack, layers in layer_stacks(model):
                bottom, top = (sum(per_batch[stack, i, "output"]) / len(samples) for i in (1, len(layers)))
                outputs.append(f"{stack} output-gradient norm layer 1 {bottom:.3g}, layer {len(layers)} {top:.3g}")
            log(f"{label} seed {seed} ({len(samples)} batches): " + "; ".join(outputs), flush=True)
    return rows


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [options] [-- fairseq-train model flags]",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("models (one of: flags after '--', or --path)")
    source.add_argument(
        "--connections", nargs="+", choices=list(CONNECTIONS), metavar="C",
        help=f"build one model per connection ({', '.join(CONNECTIONS)}) at initialization, with the flags after '--' "
        "(default: the --connection among those flags, b2t if none; arch default transformer_b2t)",
    )  # fmt: skip
    source.add_argument(
        "--path", nargs="+", metavar="[LABEL=]FILE",
        help="measure trained checkpoints instead; LABEL names the run (default: its connection)",
    )  # fmt: skip
    source.add_argument(
        "--seeds", nargs="+", type=int, default=[1], metavar="S",
        help="initialization seeds (as fairseq-train --seed) and batch-order seeds; default 1",
    )  # fmt: skip
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-bin", type=Path, metavar="DIR",
        help="a fairseq data-bin (translation, or the task in the flags after '--'); default: the generated toy "
        "corpus (translation only). With --path the checkpoint's own data directory is used when absent",
    )  # fmt: skip
    data.add_argument("--subset", default="train", help="which split to draw batches from (default train)")
    data.add_argument("--num-batches", type=int, default=4, metavar="K", help="batches to average over (default 4)")
    data.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="tokens per batch (default 4096)")
    data.add_argument("--batch-size", type=int, metavar="N", help="sentences per batch (default: no limit)")
    parser.add_argument(
        "--train-mode", action="store_true", help="keep dropout and word dropout on, as while training (default off)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda when available)",
    )  # fmt: skip
    out = parser.add_argument_group("output")
    out.add_argument("--out-csv", type=Path, metavar="FILE", default=Path("grad_norms.csv"), help="the values")
    out.add_argument("--out-png", type=Path, metavar="FILE", default=Path("grad_norms.png"), help="the plot")
    out.add_argument("--per-batch", action="store_true", help="also write one CSV row per batch")
    out.add_argument("--log-y", action="store_true", help="logarithmic y axes")
    out.add_argument("--title", metavar="TEXT", help="a title over the figure")
    out.add_argument(
        "--position-layer", type=int, metavar="L",
        help="decoder layer whose layer-norm positions are plotted (default: the top one)",
    )
    return parser


def cli_main(argv=None):
    argv, model_argv = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # importing fairseq leaves the root logger at DEBUG: keep fairseq's and matplotlib's chatter out of our output
    for name in ("fairseq", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)

    def fail(message):
        parser.exit(2, f"{PROG}: error: {message}\n")

    if args.path and (args.connections or model_argv):
        fail("--path measures checkpoints as trained; drop --connections and the flags after '--'")
    if args.connections and any(f == "--connection" or f.startswith("--connection=") for f in model_argv):
        fail("give the connection either with --connections or after '--', not both")
    if args.num_batches < 1 or args.max_tokens < 1:
        fail("--num-batches and --max-tokens must be positive")
    if args.data_bin is not None and not args.data_bin.is_dir():
        fail(f"data directory not found: {args.data_bin}")
    try:
        rows = run_all(args, model_argv)
        write_csv(rows, args.out_csv, CSV_FIELDS)
        layer = plot(rows, args.out_png, args.log_y, args.position_layer, args.title)
    except (B2TConfigError, OSError) as e:
        fail(str(e))
    print(f"wrote {args.out_csv} ({len(rows)} rows) and {args.out_png} (positions of layer {layer})")


if __name__ == "__main__":
    sys.exit(cli_main())
