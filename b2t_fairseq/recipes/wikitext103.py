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
import logging
import re
import shlex
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from b2t_fairseq.safety import atomic
from b2t_fairseq.modules.connections import CONNECTIONS
from b2t_fairseq.recipes.common import (
    METHODS, PLUGIN_DIR, RESERVED_EXTRA, Recipe, RecipeError, fairseq_errors, fmt, run_fairseq,
)  # fmt: skip
from b2t_fairseq.tools.pipeline import as_flags

PROG = "wikitext103"
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


def _settings(result):
    s = dict(result["eval_settings"])
    return f"{s.pop('tool', 'fairseq-eval-lm')} {shlex.join(as_flags({k: v for k, v in s.items() if k != 'cpu'}))}"


class WikiText103(Recipe):
    name, doc, depths = PROG, __doc__, (16, 32)
    depth_help = "decoder layers"
    eval_smoke_help = "smoke: the short context of the smoke model"
    evaluate_help = "average, run fairseq-eval-lm on valid and test, write one JSON"
    device = "evaluate"
    default_max_tokens = 3072
    result_keys = ("method", "depth", "valid_ppl", "test_ppl", "eval_settings")
    reserved = RESERVED

    def check_data(self, data_bin, subsets):
        check_data_bin(data_bin, subsets)

    def check_row(self, config, method, depth, scale):
        if method in CONNECTIONS and not CONNECTIONS[method].decoder_only:
            raise RecipeError(
                f"--method {method} defines its initialisation for encoder-decoder models only, so the language-model "
                "recipe cannot train it; choose another --method"
            )
        train = config["train"]
        if scale is None and int(train.get("decoder-layers", -1)) != int(depth):
            raise RecipeError(f"{depth}l.yaml must set decoder-layers: {depth}, not {train.get('decoder-layers')}")

    def plan_evaluation(self, config, data_bin):
        subsets = list(config["evaluate"]["subsets"])
        check_data_bin(data_bin, subsets)
        return subsets

    def decode_and_score(self, subsets, config, data_bin, checkpoint, cpu, work):
        ev = config["evaluate"]
        per_subset = {}
        for subset in subsets:
            result = eval_lm(data_bin, checkpoint, subset, ev["eval_lm"], cpu, work / f"eval-lm-{subset}.log")
            print(f"{subset}: perplexity {result['ppl']:.2f} over {result['tokens']:,} tokens", flush=True)
            per_subset[subset] = result
        return {
            "valid_ppl": per_subset.get("valid", {}).get("ppl"),
            "test_ppl": per_subset.get("test", {}).get("ppl"),
            "subsets": per_subset,
            "eval_settings": {"tool": "fairseq-eval-lm", **ev["eval_lm"], "cpu": cpu},
        }

    def headline(self, summary):
        return f"valid {summary['valid_ppl']} / test {summary['test_ppl']}"

    def columns(self, config):
        return ["Valid PPL", "Test PPL"]

    def result_cells(self, result, config):
        return [fmt(result["valid_ppl"]), fmt(result["test_ppl"])]

    def published_cells(self, row, config):
        # published values as printed in the source, without padding them to a precision it does not give
        return ["–" if row.get(k) is None else str(row[k]) for k in ("valid", "test")]

    def layers(self, depth):
        return f"{depth}L"

    def table_notes(self, results, config):
        return [f"Perplexity (ours): {'; '.join(sorted({_settings(r) for r in results}))}"]

    def add_prepare_parser(self, sub):
        p = sub.add_parser("prepare", help="binarize wiki.{train,valid,test}.tokens with fairseq-preprocess --only-source")
        p.add_argument("--raw-dir", required=True, type=Path, help="directory holding wiki.{train,valid,test}.tokens")
        p.add_argument("--data-bin", required=True, type=Path, help="output directory (skipped when already complete)")
        p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess worker processes (default: 1)")
        p.set_defaults(func=cmd_prepare)


RECIPE = WikiText103()
DEFAULT_CONFIG_DIR, DEPTHS = RECIPE.config_dir, RECIPE.depths
load_config, build_train_command, evaluate = RECIPE.load_config, RECIPE.build_train_command, RECIPE.evaluate
load_results, render_table, build_parser, main = RECIPE.load_results, RECIPE.render_table, RECIPE.build_parser, RECIPE.main


if __name__ == "__main__":
    # fairseq's tools configure logging when run as commands; importing the plugin got there first, unformatted
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATEFMT, level=logging.INFO, stream=sys.stdout, force=True)
    sys.exit(main())
