"""Gigaword headline generation (Rush et al. 2015 data), the B2T paper's summarization table.

    python -m b2t_fairseq.recipes.gigaword prepare --data sumdata/train --out data/gigaword
    python -m b2t_fairseq.recipes.gigaword train --method b2t --depth 6 --gpus 8 \\
        --data-bin data/gigaword/data-bin --save-dir ckpt/b2t-6l
    python -m b2t_fairseq.recipes.gigaword evaluate --save-dir ckpt/b2t-6l --data-bin data/gigaword/data-bin \\
        --out results/b2t-6l.json
    python -m b2t_fairseq.recipes.gigaword table --results results/

prepare: raw release files -> (test split carved off valid when there is none) -> joint sentencepiece ->
fairseq-preprocess --joined-dictionary; the raw test titles and the split's provenance go into the data-bin.
train: fairseq-train with the configs/gigaword/ settings; only --connection differs between methods.
evaluate: average the last epoch checkpoints, fairseq-generate the test split, ROUGE-1/2/L F1 against the raw
titles, one JSON per run. table: Markdown table of those JSON files. Every stage skips work already done.
"""
import json
import logging
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from b2t_fairseq.safety import atomic
from b2t_fairseq.recipes.common import (
    METHODS, PLUGIN_DIR, Recipe, RecipeError, check_data_bin, fmt, run_fairseq, subset_pairs,
)  # fmt: skip
from b2t_fairseq.tools import pipeline
from b2t_fairseq.tools.pipeline import as_flags

PROG = "gigaword"
SRC, TGT = "article", "title"  # fairseq "languages" of the data-bin
RELEASE = {  # the files of Rush et al.'s release (summary.tar.gz: sumdata/train/), per split
    "train": ("train.article.txt", "train.title.txt"),
    "valid": ("valid.article.filter.txt", "valid.title.filter.txt"),
}
# Test pairs looked for when --test-article/--test-title are not given, in this order. summary.tar.gz unpacks
# to sumdata/train/ (the files above) beside sumdata/Giga/ (the standard 1951-pair test set).
TEST_CANDIDATES = (("test.article.txt", "test.title.txt"), ("Giga/input.txt", "Giga/task1_ref0.txt"),
                   ("../Giga/input.txt", "../Giga/task1_ref0.txt"))  # fmt: skip
REFERENCE = "test.reference.txt"  # raw test titles, written into the data-bin by prepare
PREPARED = "prepared.json"  # provenance of the splits, written into the data-bin by prepare
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# ------------------------------------------------------------------ prepare
def _count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)  # binary mode: only \n ends a line


def _pair_count(article, title):
    """Number of pairs of two line-aligned files, or RecipeError when they disagree."""
    n, m = _count_lines(article), _count_lines(title)
    if n != m:
        raise RecipeError(f"{article} has {n} lines but {title} has {m}; the pairs must be line-aligned")
    if n == 0:
        raise RecipeError(f"{article} is empty")
    return n


def plan_splits(data, carve, test_article=None, test_title=None):
    """Which files make train/valid/test, and where test comes from; every named file is checked to exist."""
    data = Path(data)
    if not data.is_dir():
        raise RecipeError(f"data directory {data} does not exist")
    splits = {}
    for split, names in RELEASE.items():
        for name in names:
            if not (data / name).is_file():
                raise RecipeError(
                    f"{data / name} does not exist (--data must hold the Rush et al. 2015 release files "
                    f"{', '.join(n for pair in RELEASE.values() for n in pair)}; in summary.tar.gz: sumdata/train)"
                )
        splits[split] = [str((data / n).resolve()) for n in names]
    if (test_article is None) != (test_title is None):
        raise RecipeError("pass --test-article and --test-title together (the test articles and their titles)")
    if test_article is not None:
        for path in (test_article, test_title):
            if not Path(path).is_file():
                raise RecipeError(f"test file {path} does not exist")
        candidates = [(Path(test_article), Path(test_title))]
    else:
        candidates = [(data / a, data / t) for a, t in TEST_CANDIDATES if (data / a).is_file() or (data / t).is_file()]
    if candidates:
        article, title = candidates[0]
        for path in (article, title):  # half a pair is a broken download, not a reason to carve
            if not path.is_file():
                raise RecipeError(f"{path} does not exist but {article if path == title else title} does")
        splits["test"] = [str(article.resolve()), str(title.resolve())]
        test = {"kind": "given", "article": splits["test"][0], "title": splits["test"][1]}
    else:
        test = {"kind": "carved", "from": splits["valid"], "pairs": int(carve)}
    for split, (article, title) in splits.items():
        n = _pair_count(article, title)
        if split == "valid" and test["kind"] == "carved" and n <= carve:
            raise RecipeError(
                f"{article} has {n} pairs, too few to carve {carve} test pairs off it; pass a test pair with "
                "--test-article/--test-title or lower prepare.carve_test_pairs in the config"
            )
    return {"source": str(data.resolve()), "files": splits, "test": test}


def describe_test(test):
    if test["kind"] == "carved":
        article, title = (Path(p).name for p in test["from"])
        return (
            f"NOT the standard Gigaword test set: the last {test['pairs']} pairs of {article} / {title}, carved "
            f"off as the test split (valid keeps the first {test.get('valid_pairs', '?')}); not comparable with "
            "published Gigaword ROUGE"
        )
    if test["kind"] == "given":
        return f"{test['article']} / {test['title']} ({test.get('pairs', '?')} pairs)"
    return f"{test.get('kind', 'unknown')}: {test.get('reference', '?')}"


def _link(target, link):
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def write_raw(plan, raw):
    """raw/{train,valid,test}.{article,title}: links to release files, lines copied byte for byte when carved."""
    raw.mkdir(parents=True, exist_ok=True)
    files, test = plan["files"], dict(plan["test"])
    for split, paths in files.items():
        if split == "valid" and test["kind"] == "carved":
            continue
        for lang, path in zip((SRC, TGT), paths):
            _link(path, raw / f"{split}.{lang}")
    if test["kind"] == "carved":
        n = test["pairs"]
        for lang, path in zip((SRC, TGT), files["valid"]):
            with open(path, "rb") as f:
                lines = f.readlines()
            if not lines[-1].endswith(b"\n"):
                lines[-1] += b"\n"
            (raw / f"valid.{lang}").write_bytes(b"".join(lines[:-n]))
            (raw / f"test.{lang}").write_bytes(b"".join(lines[-n:]))
        test["valid_pairs"] = len(lines) - n
    test.setdefault("pairs", _pair_count(raw / f"test.{SRC}", raw / f"test.{TGT}"))
    return test


def encode(raw, out, spec):
    """Joint sentencepiece model on train, every split encoded (pipeline's helper); returns the encoded prefix."""
    encoded = [(out / "spm" / f"{s}.{lang}", raw / f"{s}.{lang}") for s in pipeline.SPLITS for lang in (SRC, TGT)]
    for path, source in encoded:
        # The helper skips any file that exists, so one cut short by an interrupted run is redone here.
        if path.is_file() and _count_lines(path) != _count_lines(source):
            print(f"{path}: incomplete, encoding it again", flush=True)
            path.unlink()
    prefix = pipeline.prepare_sentencepiece(out, f"{raw}/", SRC, TGT, spec)[0]
    for path, source in encoded:
        if _count_lines(path) != _count_lines(source):
            raise RecipeError(f"{path} has {_count_lines(path)} lines but {source} has {_count_lines(source)} "
                              "(a carriage return inside a line?); clean the raw file")  # fmt: skip
    return prefix


def binarize(prefix, data_bin):
    """fairseq-preprocess --joined-dictionary of the sentencepiece-encoded splits (skipped when done)."""
    if (data_bin / f"test.{SRC}-{TGT}.{TGT}.idx").is_file():  # the last file fairseq-preprocess writes
        print(f"data-bin: done ({data_bin})", flush=True)
        return data_bin
    run_fairseq([
        "fairseq-preprocess", "--source-lang", SRC, "--target-lang", TGT, "--joined-dictionary", "--destdir", data_bin,
        "--trainpref", f"{prefix}train", "--validpref", f"{prefix}valid", "--testpref", f"{prefix}test",
        "--workers", min(2, os.cpu_count() or 1),
    ])  # fmt: skip
    return data_bin


def prepare(data, out, test_article=None, test_title=None, scale=None, config_dir=None):
    config = load_config(config_dir, scale=scale)["prepare"]
    out = Path(out)
    plan = plan_splits(data, int(config["carve_test_pairs"]), test_article, test_title)
    plan["sentencepiece"] = config["sentencepiece"]
    raw, marker = out / "raw", out / "raw" / "plan.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if {k: old.get(k) for k in plan} != plan:
            raise RecipeError(f"{out} was prepared from other files or settings (see {marker}); use another --out")
        test = old["test_facts"]
        print(f"raw splits: done ({raw})", flush=True)
    else:
        test = write_raw(plan, raw)
        atomic.write_text(marker, json.dumps({**plan, "test_facts": test}, indent=2) + "\n")
    if test["kind"] == "carved":
        # Loud on purpose: scores on a carved split must never pass for the standard test set.
        print(f"\n*** {PROG}: no test pair in {data}: test = {describe_test(test)}. ***\n", flush=True)
    prefix = encode(raw, out, config["sentencepiece"])
    data_bin = binarize(prefix, out / "data-bin")
    shutil.copyfile(raw / f"test.{TGT}", data_bin / REFERENCE)
    facts = {
        "prepared_by": f"{PROG} prepare",
        "source": plan["source"],
        "files": plan["files"],
        "pairs": {s: _pair_count(raw / f"{s}.{SRC}", raw / f"{s}.{TGT}") for s in ("train", "valid", "test")},
        "test": test,
        "sentencepiece": str(out / "spm" / "spm.model"),
        "sentencepiece_settings": config["sentencepiece"],
        "reference": str(data_bin / REFERENCE),
    }
    atomic.write_text(data_bin / PREPARED, json.dumps(facts, indent=2) + "\n")
    print(f"{data_bin}: {', '.join(f'{k} {v}' for k, v in facts['pairs'].items())} pairs; test = {describe_test(test)}")
    return facts


def cmd_prepare(args, extra):
    prepare(args.data, args.out, args.test_article, args.test_title, args.scale, args.config_dir)
    return 0


def read_prepared(data_bin):
    path = Path(data_bin) / PREPARED
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------ evaluate
def rouge_settings():
    try:
        version = metadata.version("rouge-score")
    except metadata.PackageNotFoundError:
        raise RecipeError("scoring needs rouge-score: pip install rouge-score==0.1.2") from None
    return (
        f"ROUGE-1/2/L F1 x 100, mean over test pairs; rouge-score {version} "
        "(rouge_scorer, use_stemmer=True: Porter stemmer on tokens of more than 3 characters) with its default "
        "tokenizer, which lowercases and turns every run of characters other than a-z0-9 into a space as "
        "ROUGE-1.5.5 does: the '#' digit masks of the Gigaword preprocessing count as nothing, '<unk>'/'UNK' as "
        "the word 'unk', '-lrb-' as 'lrb'; hypotheses = best beam with sentencepiece removed, references = raw "
        "test titles"
    )


def rouge(hyps, refs):
    """{rouge1, rouge2, rougeL}: mean per-pair F1 x 100 (what ROUGE-1.5.5 reports, without its bootstrap)."""
    from rouge_score import rouge_scorer

    if len(hyps) != len(refs):
        raise RecipeError(
            f"{len(hyps)} hypotheses but {len(refs)} references; the generate output may be incomplete (interrupted "
            "run, or a data-bin and reference of different test sets)"
        )
    if not hyps:
        raise RecipeError("nothing to score: no hypotheses and no references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hyps, refs):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: 100 * total / len(hyps) for key, total in totals.items()}


def generate(data_bin, pair, checkpoint, flags, cpu, work):
    """fairseq-generate the test subset into WORK/generate-test.txt."""
    src, tgt = pair
    output = work / "generate-test.txt"
    with atomic.atomic_path(work / "generate") as scratch:  # a directory: fairseq names the file in it
        cmd = ["fairseq-generate", data_bin, "--user-dir", PLUGIN_DIR, "--path", checkpoint, "--gen-subset", "test",
               "--source-lang", src, "--target-lang", tgt, "--results-path", scratch, *as_flags(flags)]  # fmt: skip
        if cpu:
            cmd.append("--cpu")
        run_fairseq(cmd)
        os.replace(scratch / "generate-test.txt", output)
    return output


def score_generate_output(gen_out, reference, remove_bpe, hyp_out):
    """ROUGE of fairseq-generate's H- lines (in id order, subwords removed; also written to ``hyp_out``) against
    the raw reference titles."""
    from b2t_fairseq.tools import score as scorer

    raw = scorer.read_hypotheses(scorer.read_lines(str(gen_out)))
    if not raw:
        raise RecipeError(f"no H-<id> lines in {gen_out}")
    hyps = [scorer.postprocess(h, remove_bpe) for h in raw]
    atomic.write_text(hyp_out, "".join(h + "\n" for h in hyps))
    return rouge(hyps, scorer.read_lines(str(reference)))


def _test_subset(data_bin):
    """(src, tgt, number of pairs) of the binarized test subset."""
    from fairseq.data import data_utils

    pairs = subset_pairs(data_bin, "test")
    if len(pairs) != 1:
        raise RecipeError(f"{data_bin} must hold the 'test' subset for exactly one language pair, not {sorted(pairs)}")
    src, tgt = next(iter(pairs))
    return src, tgt, len(data_utils.load_indexed_dataset(str(Path(data_bin) / f"test.{src}-{tgt}.{src}"), None))


def _test_split(data_bin, reference, ref_given):
    """Where the test articles came from: prepare's record, unless the reference was chosen by hand."""
    prepared = read_prepared(data_bin)
    if not ref_given and prepared:
        return prepared["test"]
    return {"kind": "by hand", "reference": str(Path(reference).resolve())}


class Gigaword(Recipe):
    name, doc, depths = PROG, __doc__, (6, 18)
    required = ("prepare", "train", "tokens_per_update", "evaluate")
    result_keys = ("method", "depth", *ROUGE_TYPES, "n", "test_split", "rouge_settings")
    smoke_help = "smoke: small sentencepiece vocabulary and test split, tiny model, a few dozen CPU updates (tests)"
    eval_smoke_help = "smoke: short decoding, fewer checkpoints averaged"
    evaluate_help = "average, decode the test split, score ROUGE, write one JSON"
    table_help = "Markdown table of evaluate results"
    default_max_tokens = 4096

    def train_facts(self, data_bin):
        prepared = read_prepared(data_bin)
        return {"test_split": prepared["test"] if prepared else None}

    def evaluate_inputs(self):
        return {"--ref": {"type": Path, "help": f"raw test titles (default: DATA_BIN/{REFERENCE}, written by prepare)"}}

    def plan_evaluation(self, config, data_bin, ref=None):
        from b2t_fairseq.tools.score import read_lines

        settings = rouge_settings()  # fails now, not after the decoding, when rouge-score is missing
        check_data_bin(data_bin, subsets=("test",))
        reference = Path(ref) if ref is not None else data_bin / REFERENCE
        if not reference.is_file():
            how = "pass --ref FILE (the raw test titles)" if ref is None else "check --ref"
            raise RecipeError(f"reference {reference} does not exist; {how}")
        *pair, n_test = _test_subset(data_bin)
        n_ref = len(read_lines(str(reference)))
        if n_ref != n_test:  # checked before the decoding, which takes a while on the full test set
            raise RecipeError(f"reference {reference} has {n_ref} lines but the test subset of {data_bin} {n_test} pairs")
        return {"pair": pair, "n": n_test, "reference": reference, "settings": settings,
                "test_split": _test_split(data_bin, reference, ref is not None)}  # fmt: skip

    def decode_and_score(self, plan, config, data_bin, checkpoint, cpu, work):
        ev = config["evaluate"]
        gen_out = generate(data_bin, plan["pair"], checkpoint, ev["generate"], cpu, work)
        hyp_out = work / "hyp-test.txt"
        scores = score_generate_output(gen_out, plan["reference"], ev["remove_bpe"], hyp_out)
        return {**scores, "n": plan["n"], "rouge_settings": plan["settings"], "test_split": plan["test_split"],
                "reference": str(plan["reference"]), "hypotheses": str(hyp_out), "generate": ev["generate"]}  # fmt: skip

    def headline(self, summary):
        return (f"ROUGE-1 {summary['rouge1']:.2f}, ROUGE-2 {summary['rouge2']:.2f}, ROUGE-L {summary['rougeL']:.2f} "
                f"on {summary['n']} pairs; test = {describe_test(summary['test_split'])}")  # fmt: skip

    def columns(self, config):
        return ["R-1", "R-2", "R-L"]

    def result_cells(self, result, config):
        return [fmt(result[k]) for k in ROUGE_TYPES]

    def published_cells(self, row, config):
        return [fmt(row.get(k)) for k in ROUGE_TYPES]

    def table_notes(self, results, config):
        tests = {json.dumps(r["test_split"], sort_keys=True): r["_path"] for r in results}
        if len(tests) > 1:
            raise RecipeError(f"results scored on different test sets ({', '.join(tests.values())}); table them apart")
        ns = sorted({int(r["n"]) for r in results})
        return [f"Test set ({'/'.join(map(str, ns))} pairs): {describe_test(results[0]['test_split'])}.",
                f"Scores: {'; '.join(sorted({r['rouge_settings'] for r in results}))}."]  # fmt: skip

    def add_prepare_parser(self, sub):
        p = sub.add_parser("prepare", help="release files -> sentencepiece -> data-bin (+ raw test titles)")
        p.add_argument("--data", required=True, type=Path, help="directory of train.article.txt, train.title.txt, "
                       "valid.article.filter.txt, valid.title.filter.txt (summary.tar.gz: sumdata/train)")  # fmt: skip
        p.add_argument("--out", required=True, type=Path, help="work directory; the data-bin is OUT/data-bin")
        p.add_argument("--test-article", type=Path, help="test articles (default: test.article.txt, Giga/input.txt or "
                       "../Giga/input.txt beside the release files; none: carve the test split off valid)")  # fmt: skip
        p.add_argument("--test-title", type=Path, help="their titles (default: test.title.txt or Giga/task1_ref0.txt)")
        p.add_argument("--scale", choices=("smoke",), help=self.smoke_help)
        p.set_defaults(func=cmd_prepare)


RECIPE = Gigaword()
DEFAULT_CONFIG_DIR, DEPTHS = RECIPE.config_dir, RECIPE.depths
load_config, build_train_command, evaluate = RECIPE.load_config, RECIPE.build_train_command, RECIPE.evaluate
load_results, render_table, build_parser, main = RECIPE.load_results, RECIPE.render_table, RECIPE.build_parser, RECIPE.main


if __name__ == "__main__":
    # As fairseq's own commands log (INFO, to stdout); importing the plugin left a DEBUG, unformatted root logger.
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        level=logging.INFO, stream=sys.stdout, force=True)  # fmt: skip
    sys.exit(main())
