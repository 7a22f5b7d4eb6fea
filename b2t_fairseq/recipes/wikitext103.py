"""WikiText-103 recipe of the B2T paper: binarize the corpus, train one (method, depth) language model, score its
perplexity on valid and test, build the table.

    python -m b2t_fairseq.recipes.wikitext103 prepare --raw-dir wikitext-103 --data-bin data-bin/wikitext-103
    python -m b2t_fairseq.recipes.wikitext103 train --method b2t --depth 16 --gpus 8 \\
        --data-bin data-bin/wikitext-103 --save-dir ckpt/b2t-16l [--dry-run] [-- extra fairseq-train flags]
    python -m b2t_fairseq.recipes.wikitext103 evaluate --save-dir ckpt/b2t-16l --data-bin data-bin/wikitext-103 \\
        --out results/b2t-16l.json
    python -m b2t_fairseq.recipes.wikitext103 table --results results/ --out table.md

Hyperparameters live in configs/wikitext103/*.yaml (base + 16l/32l, + smoke for --scale smoke); this file
only combines them. Every method gets the same flags; --method only sets --connection.

fairseq's tools (preprocess, train, eval-lm) run through their own entry points inside this process rather than
as subprocesses: importing this package has already imported fairseq (about 7 s on a 2-core CPU), and each
subprocess would pay that again. The printed commands are the equivalent command lines.
"""
import contextlib
import functools
import json
import logging
import re
import shlex
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from b2t_fairseq import atomic
from b2t_fairseq.modules.connections import CONNECTIONS
from b2t_fairseq.recipes.common import (
    METHOD_NAMES, METHODS, PLUGIN_DIR, RESERVED_EXTRA, RecipeError, add_evaluate_parser, add_table_parser,
    add_train_parser, average_run, by_row, default_config_dir, default_cpu, fairseq_errors,
    load_config as _load_config, load_results as _load_results, print_table, recipe_parser, result_row, run_cli,
    run_fairseq, train_command, work_dir, write_launch_scripts, write_recipe_facts,
)  # fmt: skip
from b2t_fairseq.tools.pipeline import as_flags

PROG = "wikitext103"
DEFAULT_CONFIG_DIR = default_config_dir("wikitext103")
DEPTHS = (16, 32)
SPLITS = ("train", "valid", "test")
RAW_FILE = "wiki.{}.tokens"  # the names in the WikiText-103 release (wikitext-103-v1.zip -> wikitext-103/)
RESERVED = {**RESERVED_EXTRA, "--decoder-layers": "--depth (or the depth's config file)"}
# the log format of fairseq's command-line tools
LOG_FORMAT, LOG_DATEFMT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s", "%Y-%m-%d %H:%M:%S"
# fairseq_cli/eval_lm.py logs these two lines at the end of a run (fairseq 0.12)
EVALUATED = re.compile(r"Evaluated ([\d,]+) tokens in")
LOSS = re.compile(r"Loss \(base 2\): (\S+), Perplexity: (\S+)")


# ------------------------------------------------------------------ data
def missing_binarized(data_bin, subsets):
    """The files of a language-modelling data-bin (fairseq-preprocess --only-source) that ``data_bin`` lacks."""
    names = ["dict.txt"] + [f"{s}.{ext}" for s in subsets for ext in ("idx", "bin")]
    return [name for name in names if not (Path(data_bin) / name).is_file()]


def check_data_bin(data_bin, subsets):
    data_bin = Path(data_bin)
    if not data_bin.is_dir():
        raise RecipeError(f"data-bin {data_bin} does not exist (make it with `{PROG} prepare`)")
    missing = missing_binarized(data_bin, subsets)
    if missing:
        raise RecipeError(f"{data_bin} lacks {', '.join(missing)}; is it a `{PROG} prepare` output directory?")


def prepare(raw_dir, data_bin, workers=1):
    """Binarize wiki.{train,valid,test}.tokens with one dictionary over train; skipped when already done."""
    raw_dir, data_bin = Path(raw_dir), Path(data_bin)
    if data_bin.is_dir() and not missing_binarized(data_bin, SPLITS):
        print(f"{data_bin} already holds the binarized corpus; nothing to do", flush=True)
        return data_bin
    if not raw_dir.is_dir():
        raise RecipeError(f"raw directory {raw_dir} does not exist (pass the wikitext-103/ of wikitext-103-v1.zip)")
    missing = [RAW_FILE.format(s) for s in SPLITS if not (raw_dir / RAW_FILE.format(s)).is_file()]
    if missing:
        raise RecipeError(f"{raw_dir} lacks {', '.join(missing)} (pass the directory of the WikiText-103 release)")
    if data_bin.exists() and any(data_bin.iterdir()):
        raise RecipeError(f"{data_bin} exists and is not a complete data-bin; remove it or pass another --data-bin")
    # fairseq-preprocess refuses an existing dict.txt, so an interrupted run must not leave one in data_bin:
    # binarize next to it and rename when done.
    partial = data_bin.with_name(data_bin.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    argv = ["--only-source", "--destdir", str(partial), "--workers", str(workers)]
    for split in SPLITS:
        argv += [f"--{split}pref", str(raw_dir / RAW_FILE.format(split))]
    run_fairseq(["fairseq-preprocess", *argv])
    if data_bin.exists():
        data_bin.rmdir()
    data_bin.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(data_bin)
    print(f"binarized corpus -> {data_bin}", flush=True)
    return data_bin


def cmd_prepare(args, extra):
    if args.workers < 1:
        raise RecipeError(f"--workers must be >= 1, not {args.workers}")
    prepare(args.raw_dir, args.data_bin, args.workers)
    return 0


# ------------------------------------------------------------------ train
def load_config(config_dir=DEFAULT_CONFIG_DIR, depth=None, scale=None):
    return _load_config(config_dir, depth, scale)


def _load_train_config(config_dir, depth, scale):
    """load_config, refusing a depth file whose model has another number of layers than its name."""
    config = load_config(config_dir, depth, scale)
    train = config["train"]
    if scale is None and int(train.get("decoder-layers", -1)) != int(depth):
        raise RecipeError(f"{depth}l.yaml must set decoder-layers: {depth}, not {train.get('decoder-layers')}")
    return config


def build_train_command(method, depth, gpus, data_bin, save_dir, scale=None, extra=(), max_tokens=None,
                        config_dir=DEFAULT_CONFIG_DIR, nodes=1):  # fmt: skip
    """(fairseq-train argv, facts for recipe.json). Pure: touches no file but the configs."""
    if method in CONNECTIONS and not CONNECTIONS[method].decoder_only:
        raise RecipeError(
            f"--method {method} defines its initialisation for encoder-decoder models only, so the language-model "
            "recipe cannot train it; choose another --method"
        )
    load = functools.partial(_load_train_config, config_dir)
    return train_command(PROG, DEPTHS, load, method, depth, gpus, data_bin, save_dir, scale, extra, max_tokens,
                         reserved=RESERVED, nodes=nodes)  # fmt: skip


def run_train(args, cmd, info):
    check_data_bin(args.data_bin, ("train", "valid"))
    write_recipe_facts(args.save_dir, info)
    if info["nodes"] > 1:
        return write_launch_scripts(args.save_dir, cmd, info)
    run_fairseq(cmd)
    return 0


# ------------------------------------------------------------------ evaluate
def parse_eval_lm_output(text, source="fairseq-eval-lm output"):
    """(tokens scored, loss in bits per token, perplexity) from the log of one fairseq-eval-lm run."""
    losses = LOSS.findall(text)
    counts = EVALUATED.findall(text)
    if len(losses) != 1 or len(counts) != 1:
        raise RecipeError(
            f"{source} has {len(losses)} 'Loss (base 2): ..., Perplexity: ...' and {len(counts)} "
            "'Evaluated N tokens' lines, expected one each; did fairseq-eval-lm finish?"
        )
    try:
        loss, ppl = float(losses[0][0]), float(losses[0][1])
    except ValueError:
        raise RecipeError(f"{source}: cannot read numbers from 'Loss (base 2): {', Perplexity: '.join(losses[0])}'")
    return int(counts[0].replace(",", "")), loss, ppl


def subset_tokens(data_bin, subset):
    """Tokens (end-of-line symbols included) in a binarized subset, i.e. what fairseq-eval-lm must score: the sum
    of the int32 item sizes in fairseq's MMapIndexedDataset index (9-byte magic, u64 version, u8 dtype code,
    u64 item count, then the sizes)."""
    path = Path(data_bin) / f"{subset}.idx"
    with open(path, "rb") as f:
        header = f.read(26)
        if header[:9] != b"MMIDIDX\x00\x00":
            raise RecipeError(f"{path} is not a fairseq mmap index (binarize with `{PROG} prepare`)")
        (items,) = struct.unpack("<Q", header[18:26])
        return int(np.fromfile(f, dtype="<i4", count=items).sum())


@contextlib.contextmanager
def _log_to(path):
    """Copy everything fairseq logs meanwhile into ``path``, as a subprocess's captured output would be."""
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(root.getEffectiveLevel(), logging.INFO))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def eval_lm_argv(data_bin, checkpoint, subset, flags, cpu):
    argv = [str(data_bin), "--user-dir", str(PLUGIN_DIR), "--path", str(checkpoint), "--gen-subset", subset,
            *as_flags(flags)]  # fmt: skip
    return argv + (["--cpu"] if cpu else [])


def eval_lm(data_bin, checkpoint, subset, flags, cpu, log):
    """Score one subset with fairseq-eval-lm's main() and read the result from what it logs."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm as fairseq_eval_lm

    argv = eval_lm_argv(data_bin, checkpoint, subset, flags, cpu)
    print("+ fairseq-eval-lm", shlex.join(argv), flush=True)  # = python -m fairseq_cli.eval_lm ARGV
    with fairseq_errors("fairseq-eval-lm"), atomic.atomic_path(log) as tmp, _log_to(tmp):
        args = options.parse_args_and_arch(options.get_eval_lm_parser(), argv)
        fairseq_eval_lm.main(convert_namespace_to_omegaconf(args))
    tokens, loss, ppl = parse_eval_lm_output(Path(log).read_text(encoding="utf-8"), str(log))
    expected = subset_tokens(data_bin, subset)
    if tokens != expected:  # eval-lm silently skips blocks longer than the model's positions
        raise RecipeError(f"fairseq-eval-lm scored {tokens:,} of the {expected:,} tokens of '{subset}' ({log}); "
                          "use sample-break-mode none in the config's eval_lm")  # fmt: skip
    return {"ppl": ppl, "loss_base2": loss, "tokens": tokens, "log": str(log)}


def evaluate(save_dir, data_bin, out, scale=None, average_last=None, cpu=None, config_dir=DEFAULT_CONFIG_DIR):
    config = load_config(config_dir, scale=scale)
    ev = config["evaluate"]
    subsets = list(ev["subsets"])
    save_dir, out = Path(save_dir), Path(out)
    if not save_dir.is_dir():
        raise RecipeError(f"save dir {save_dir} does not exist")
    check_data_bin(data_bin, subsets)
    n = int(average_last or ev["average_last_epochs"])
    checkpoint, inputs, facts = average_run(save_dir, n, scale)
    cpu = default_cpu(scale) if cpu is None else cpu
    work = work_dir(out)
    per_subset = {}
    for subset in subsets:
        result = eval_lm(data_bin, checkpoint, subset, ev["eval_lm"], cpu, work / f"eval-lm-{subset}.log")
        print(f"{subset}: perplexity {result['ppl']:.2f} over {result['tokens']:,} tokens", flush=True)
        per_subset[subset] = result
    summary = {
        **result_row(PROG, facts),
        "valid_ppl": per_subset.get("valid", {}).get("ppl"),
        "test_ppl": per_subset.get("test", {}).get("ppl"),
        "subsets": per_subset,
        "checkpoint": str(checkpoint),
        "averaged": [str(p) for p in inputs],
        "eval_settings": {"tool": "fairseq-eval-lm", **ev["eval_lm"], "cpu": cpu},
    }
    atomic.write_text(out, json.dumps(summary, indent=2) + "\n")
    print(f"{facts['method']} {facts['depth']}L: valid {summary['valid_ppl']} / test {summary['test_ppl']} -> {out}")
    return summary


def cmd_evaluate(args, extra):
    evaluate(args.save_dir, args.data_bin, args.out, args.scale, args.average_last, True if args.cpu else None,
             args.config_dir)  # fmt: skip
    return 0


# ------------------------------------------------------------------ table
def load_results(paths):
    return _load_results(paths, PROG, ("method", "depth", "valid_ppl", "test_ppl", "eval_settings"))


def _fmt(value):
    return "–" if value is None else f"{float(value):.2f}"


def _settings(result):
    s = dict(result["eval_settings"])
    return f"{s.pop('tool', 'fairseq-eval-lm')} {shlex.join(as_flags({k: v for k, v in s.items() if k != 'cpu'}))}"


def render_table(results, config):
    published = config.get("published", {})
    ours = by_row(results)
    order = {m: i for i, m in enumerate(METHODS)}
    rows = []  # (sort key, method, layers, source, cells)
    for p in published.get("rows", []):
        depth = p.get("depth")
        # published values as printed in the source, without padding them to a precision it does not give
        cells = ["–" if p.get(k) is None else str(p[k]) for k in ("valid", "test")]
        source = f"published: {p['label']}" + (f" — {p['note']}" if p.get("note") else "")
        layers = f"{depth}L" if depth is not None else "unknown"
        rows.append(((depth or 0, order.get(p["method"], 9), 0), p["method"], layers, source, cells))
    for (method, depth, variant), r in ours.items():
        source = "ours" + (f" ({variant})" if variant else "") + (f", scale {r['scale']}" if r.get("scale") else "")
        cells = [_fmt(r["valid_ppl"]), _fmt(r["test_ppl"])]
        rows.append(((depth, order.get(method, 9), 1), method, f"{depth}L", source, cells))
    rows.sort(key=lambda row: row[0])
    lines = ["| Method | Layers | Source | Valid PPL | Test PPL |", "|---|---|---|---|---|"]
    for _, method, layers, source, cells in rows:
        lines.append(f"| {METHOD_NAMES.get(method, method)} | {layers} | {source} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Perplexity (ours): {'; '.join(sorted({_settings(r) for r in ours.values()}))}")
    if published.get("source"):
        lines.append(f"Published numbers: {' '.join(str(published['source']).split())}.")
    return "\n".join(lines) + "\n"


def cmd_table(args, extra):
    config = load_config(args.config_dir)
    print_table(render_table(load_results(args.results), config), args.out)
    return 0


# ------------------------------------------------------------------ CLI
def build_parser():
    parser, sub = recipe_parser(PROG, __doc__, DEFAULT_CONFIG_DIR)

    p = sub.add_parser("prepare", help="binarize wiki.{train,valid,test}.tokens with fairseq-preprocess --only-source")
    p.add_argument("--raw-dir", required=True, type=Path, help="directory holding wiki.{train,valid,test}.tokens")
    p.add_argument("--data-bin", required=True, type=Path, help="output directory (skipped when already complete)")
    p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess worker processes (default: 1)")
    p.set_defaults(func=cmd_prepare)

    smoke_help = "smoke: tiny model, a few dozen CPU updates (tests)"
    add_train_parser(sub, build_train_command, run_train, DEPTHS, "decoder layers", smoke_help, 3072)

    add_evaluate_parser(sub, cmd_evaluate, "average, run fairseq-eval-lm on valid and test, write one JSON",
                        "smoke: the short context of the smoke model", device="evaluate")

    add_table_parser(sub, cmd_table, "Markdown table of evaluate results beside the published numbers")
    return parser


def main(argv=None):
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    # fairseq's tools configure logging when run as commands; importing the plugin got there first, unformatted
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATEFMT, level=logging.INFO, stream=sys.stdout, force=True)
    sys.exit(main())
