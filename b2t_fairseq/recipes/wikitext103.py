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
import argparse
import contextlib
import json
import logging
import re
import shlex
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from b2t_fairseq.errors import B2TConfigError
from b2t_fairseq.recipes.common import (
    METHOD_NAMES, METHODS, PLUGIN_DIR, RESERVED_EXTRA, RecipeError, average, check_extra, default_config_dir,
    load_config as _load_config, load_results as _load_results, recipe_facts, update_freq, write_recipe_facts,
)  # fmt: skip
from b2t_fairseq.tools.pipeline import as_flags, split_passthrough

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
    print("+ fairseq-preprocess", shlex.join(argv), flush=True)
    from fairseq import options
    from fairseq_cli import preprocess as fairseq_preprocess

    with _fairseq_errors("fairseq-preprocess"):
        fairseq_preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    if data_bin.exists():
        data_bin.rmdir()
    data_bin.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(data_bin)
    print(f"binarized corpus -> {data_bin}", flush=True)
    return data_bin


def cmd_prepare(args, extra):
    if extra:
        raise RecipeError("prepare takes no extra flags after --")
    if args.workers < 1:
        raise RecipeError(f"--workers must be >= 1, not {args.workers}")
    prepare(args.raw_dir, args.data_bin, args.workers)
    return 0


# ------------------------------------------------------------------ train
def load_config(config_dir=DEFAULT_CONFIG_DIR, depth=None, scale=None):
    return _load_config(config_dir, depth, scale)


def build_train_command(method, depth, gpus, data_bin, save_dir, scale=None, extra=(), max_tokens=None,
                        config_dir=DEFAULT_CONFIG_DIR):  # fmt: skip
    """(fairseq-train argv, facts for recipe.json). Pure: touches no file but the configs."""
    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if int(depth) not in DEPTHS:
        raise RecipeError(f"unknown depth {depth!r}; choose one of {', '.join(map(str, DEPTHS))}")
    if gpus < 0:
        raise RecipeError(f"--gpus must be >= 0, not {gpus}")
    if scale is not None and gpus > 0:
        raise RecipeError(f"--scale {scale} runs on the CPU; drop --gpus")
    extra = list(extra)
    check_extra(extra, RESERVED)
    config = load_config(config_dir, int(depth), scale)
    train = dict(config["train"])
    for key in ("connection", "update-freq", "cpu", "fp16", "distributed-world-size"):
        if key in train:
            raise RecipeError(f"the config sets '{key}', which the recipe derives itself; remove it from the config")
    if scale is None and int(train.get("decoder-layers", -1)) != int(depth):
        raise RecipeError(f"{depth}l.yaml must set decoder-layers: {depth}, not {train.get('decoder-layers')}")
    if max_tokens is not None:
        train["max-tokens"] = max_tokens
    if "max-tokens" not in train:
        raise RecipeError("the config sets no max-tokens; the token budget per update cannot be derived")
    workers = max(gpus, 1)
    freq = update_freq(int(config["tokens_per_update"]), int(train["max-tokens"]), workers)
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(data_bin), "--user-dir", str(PLUGIN_DIR),
           "--save-dir", str(save_dir), "--connection", method, *as_flags(train),
           "--update-freq", str(freq)]  # fmt: skip
    if gpus > 0:
        cmd += as_flags(config.get("gpu_train", {}))
        if gpus > 1:
            cmd += ["--distributed-world-size", str(gpus)]
    else:
        cmd.append("--cpu")
    cmd += extra
    info = {
        "recipe": PROG,
        "method": method,
        "depth": int(depth),
        "scale": scale,
        "gpus": gpus,
        "max_tokens": int(train["max-tokens"]),
        "update_freq": freq,
        "tokens_per_update": workers * int(train["max-tokens"]) * freq,
        "extra": extra,
        "command": shlex.join(cmd),
    }
    return cmd, info


def cmd_train(args, extra):
    cmd, info = build_train_command(
        args.method, args.depth, args.gpus, args.data_bin, args.save_dir, args.scale, extra, args.max_tokens,
        args.config_dir,
    )
    if args.dry_run:
        print(info["command"])
        return 0
    check_data_bin(args.data_bin, ("train", "valid"))
    write_recipe_facts(args.save_dir, info)
    print("+", info["command"], flush=True)
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train as fairseq_train

    # what `python -m fairseq_cli.train ...` runs, in this process (see the module docstring)
    args = options.parse_args_and_arch(options.get_training_parser(), cmd[cmd.index("fairseq_cli.train") + 1 :])
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), fairseq_train.main)
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
def _fairseq_errors(tool):
    """fairseq's tools raise plain exceptions for bad input; report them as one line naming the tool."""
    try:
        yield
    except (RecipeError, KeyboardInterrupt):
        raise
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RecipeError(f"{tool} failed: {type(e).__name__}{': ' + message if message else ''}") from e


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
    with _fairseq_errors("fairseq-eval-lm"), _log_to(log):
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
    try:
        checkpoint, inputs, state = average(save_dir, n)
    except B2TConfigError as e:
        raise RecipeError(f"{e} (the recipe averages the last {n} epoch checkpoints; --average-last N to change)")
    facts = recipe_facts(save_dir, state)
    del state
    if cpu is None:
        import torch

        cpu = scale is not None or not torch.cuda.is_available()

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f"{out.stem}.work"
    work.mkdir(exist_ok=True)
    per_subset = {}
    for subset in subsets:
        result = eval_lm(data_bin, checkpoint, subset, ev["eval_lm"], cpu, work / f"eval-lm-{subset}.log")
        print(f"{subset}: perplexity {result['ppl']:.2f} over {result['tokens']:,} tokens", flush=True)
        per_subset[subset] = result
    summary = {
        "recipe": PROG,
        "method": facts["method"],
        "depth": int(facts["depth"]) if facts["depth"] is not None else None,
        "scale": facts["scale"],
        "variant": " ".join(facts.get("extra") or []),
        "valid_ppl": per_subset.get("valid", {}).get("ppl"),
        "test_ppl": per_subset.get("test", {}).get("ppl"),
        "subsets": per_subset,
        "checkpoint": str(checkpoint),
        "averaged": [str(p) for p in inputs],
        "eval_settings": {"tool": "fairseq-eval-lm", **ev["eval_lm"], "cpu": cpu},
    }
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{facts['method']} {facts['depth']}L: valid {summary['valid_ppl']} / test {summary['test_ppl']} -> {out}")
    return summary


def cmd_evaluate(args, extra):
    if extra:
        raise RecipeError("evaluate takes no extra flags after --")
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
    ours = {}
    for r in results:
        key = (r["method"], int(r["depth"]), r.get("variant") or "")
        if key in ours:
            raise RecipeError(f"two results for {key[0]} {key[1]}L: {ours[key]['_path']} and {r['_path']}")
        ours[key] = r
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
    if extra:
        raise RecipeError("table takes no extra flags after --")
    config = load_config(args.config_dir)
    text = render_table(load_results(args.results), config)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


# ------------------------------------------------------------------ CLI
def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR, help=f"default: {DEFAULT_CONFIG_DIR}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="binarize wiki.{train,valid,test}.tokens with fairseq-preprocess --only-source")
    p.add_argument("--raw-dir", required=True, type=Path, help="directory holding wiki.{train,valid,test}.tokens")
    p.add_argument("--data-bin", required=True, type=Path, help="output directory (skipped when already complete)")
    p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess worker processes (default: 1)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train one (method, depth) row with fairseq-train")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--depth", required=True, type=int, choices=DEPTHS, help="decoder layers")
    p.add_argument("--gpus", type=int, default=0, help="GPUs on this node (0: CPU); update-freq is derived from it")
    p.add_argument("--data-bin", required=True, type=Path)
    p.add_argument("--save-dir", required=True, type=Path)
    p.add_argument("--scale", choices=("smoke",), help="smoke: tiny model, a few dozen CPU updates (tests)")
    p.add_argument("--max-tokens", type=int, help="per-GPU batch in tokens (default: the config's 3072)")
    p.add_argument("--dry-run", action="store_true", help="print the fairseq-train command and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="average, run fairseq-eval-lm on valid and test, write one JSON")
    p.add_argument("--save-dir", required=True, type=Path)
    p.add_argument("--data-bin", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="result JSON")
    p.add_argument("--scale", choices=("smoke",), help="smoke: the short context of the smoke model")
    p.add_argument("--average-last", type=int, metavar="N", help="epoch checkpoints to average (default: config's)")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("table", help="Markdown table of evaluate results beside the published numbers")
    p.add_argument("--results", required=True, nargs="+", help="result JSON files or directories holding them")
    p.add_argument("--out", type=Path, help="write the table here too")
    p.set_defaults(func=cmd_table)
    return parser


def main(argv=None):
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, extra)
    except (RecipeError, B2TConfigError, OSError) as e:
        parser.exit(1, f"{PROG}: error: {e}\n")


if __name__ == "__main__":
    # fairseq's tools configure logging when run as commands; importing the plugin got there first, unformatted
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATEFMT, level=logging.INFO, stream=sys.stdout, force=True)
    sys.exit(main())
