"""Raw parallel text -> binarized data -> fairseq-train -> checkpoint averaging -> fairseq-generate -> SacreBLEU.

    b2t-pipeline --config configs/demo/toy.yaml --work-dir demo-out                 # generated toy corpus
    b2t-pipeline --config configs/demo/real.yaml --work-dir out --data DIR_OR_PREFIX # real raw text + sentencepiece
    b2t-pipeline ... -- --connection pre-ln                                          # extra fairseq-train flags

Every stage runs fairseq's (or our) console entry points as subprocesses, exactly as a user would. Stages
whose output exists are skipped, and fairseq-train resumes from checkpoint_last.pt, so rerunning the same
command after an interruption continues where it stopped instead of starting over.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from b2t_fairseq.safety import atomic

PLUGIN_DIR = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")
COMPLETE = "b2t-complete.json"  # written into a finished data-bin: its files and their sizes


class PipelineError(Exception):
    pass


def as_flags(options):
    """{"max-epoch": 3, "cpu": True, "fp16": False} -> ["--max-epoch", "3", "--cpu"]"""
    flags = []
    for key, value in options.items():
        if value is True:
            flags.append(f"--{key}")
        elif value is not False and value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def split_passthrough(argv):
    """Split ``ours -- fairseq-train flags`` into the two lists."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def find_corpus(data, src=None, tgt=None):
    """Files ``{data}{split}.{lang}``; ``data`` is a directory or a path prefix such as ``corpus/news-``."""
    prefix = str(data) + ("/" if Path(data).is_dir() and not str(data).endswith("/") else "")
    train_base = Path(prefix + "train")
    langs = sorted(p.suffix[1:] for p in train_base.parent.glob(train_base.name + ".*"))
    if src is None and tgt is None:
        raise PipelineError(
            f"say which way to translate: pass --src and --tgt (make: SRC=.. TGT=..); found {prefix}train.* "
            f"for: {', '.join(langs) or 'nothing'}"
        )
    if src is None or tgt is None:
        others = [lang for lang in langs if lang not in (src, tgt)]
        if len(others) != 1:
            raise PipelineError(f"cannot infer the other language from {prefix}train.* ({', '.join(langs)}); pass both")
        src, tgt = src or others[0], tgt or others[0]
    missing = [f"{prefix}{s}.{l}" for s in SPLITS for l in (src, tgt) if not Path(f"{prefix}{s}.{l}").is_file()]
    if missing:
        raise PipelineError(f"missing corpus files: {', '.join(missing)} (need train, valid and test for both sides)")
    return prefix, src, tgt


def _run(cmd, log=None, append=False):
    print("+", " ".join(map(str, cmd)), flush=True)
    if log is None:
        result = subprocess.run(list(map(str, cmd)))
    else:
        with open(log, "a" if append else "w") as out:
            result = subprocess.run(list(map(str, cmd)), stdout=out)
    if result.returncode != 0:
        raise PipelineError(f"{cmd[2] if cmd[1] == '-m' else cmd[0]} failed with exit code {result.returncode}")


def _python_m(module, *args):
    return [sys.executable, "-m", module, *args]


def prepare_toy(work, spec):
    from b2t_fairseq.toy import translation as toy_translation

    raw = work / "raw"
    if not (raw / "train.tgt").is_file():  # written last, each file whole or absent (toy/translation.py)
        toy_translation.write_corpus(raw, n_train=spec["train"], n_valid=spec["valid"], n_test=spec["test"], seed=spec["seed"])
    return f"{raw}/", "src", "tgt", raw / "test.tgt"


def prepare_sentencepiece(work, prefix, src, tgt, spec):
    """Learn one sentencepiece model on both sides of train, and encode every split with it. Each output appears
    whole or not at all; a rerun checks that both sides of each split have as many lines as the corpus."""
    import sentencepiece as spm

    out = work / "spm"
    out.mkdir(parents=True, exist_ok=True)
    model = out / "spm.model"
    if not model.is_file():
        for split in SPLITS:  # text is read below; check it first, so a bad byte is named before minutes of training
            for lang in (src, tgt):
                count_lines(f"{prefix}{split}.{lang}")
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            spm.SentencePieceTrainer.train(
                input=f"{prefix}train.{src},{prefix}train.{tgt}",
                model_prefix=str(Path(tmp) / "spm"),
                vocab_size=spec.get("vocab_size", 8000),
                model_type=spec.get("model_type", "unigram"),
                character_coverage=spec.get("character_coverage", 1.0),
                hard_vocab_limit=False,  # small corpora cannot always fill the requested vocabulary
                bos_id=-1,
                eos_id=-1,
                minloglevel=2,
            )
            os.replace(Path(tmp) / "spm.vocab", out / "spm.vocab")
            os.replace(Path(tmp) / "spm.model", model)  # last: its presence means both are complete
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for split in SPLITS:
        for lang in (src, tgt):
            source, target = Path(f"{prefix}{split}.{lang}"), out / f"{split}.{lang}"
            if target.is_file() and count_lines(target) == count_lines(source):
                continue
            with atomic.atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as g:
                for line in read_lines(source):
                    g.write(" ".join(sp.encode(line, out_type=str)) + "\n")
    return f"{out}/", src, tgt


def read_lines(path):
    """The lines of a UTF-8 text file without their line ends; a byte that is not UTF-8 is a PipelineError
    naming the file, line and column."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PipelineError(
                    f"{path}, line {number}, column {e.start + 1}: byte 0x{raw[e.start]:02x} is not UTF-8; "
                    "convert the corpus to UTF-8 (e.g. iconv) or remove the line, then rerun"
                ) from None
            yield line.rstrip("\r\n")


def count_lines(path):
    """Lines of a UTF-8 text file (checked for UTF-8 on the way)."""
    return sum(1 for _ in read_lines(path))


def preprocess(work, prefix, src, tgt):
    """fairseq-preprocess into a temporary directory, renamed to ``work``/data-bin when complete, with a record
    of its files' sizes that a rerun checks."""
    data_bin = work / "data-bin"
    record = data_bin / COMPLETE
    if record.is_file():
        sizes = json.loads(record.read_text())
        damaged = [name for name, size in sizes.items() if not (data_bin / name).is_file() or (data_bin / name).stat().st_size != size]
        if not damaged:
            return data_bin
        raise PipelineError(f"{data_bin} was changed since it was made ({damaged[0]}); delete it to rebuild it")
    with atomic.atomic_path(data_bin) as tmp:
        _run(
            _python_m(
                "fairseq_cli.preprocess",
                "--source-lang", src, "--target-lang", tgt,
                "--trainpref", f"{prefix}train", "--validpref", f"{prefix}valid", "--testpref", f"{prefix}test",
                "--destdir", tmp, "--joined-dictionary", "--workers", str(min(2, os.cpu_count() or 1)),
            )  # fmt: skip
        )
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        empty = [name for name, size in sizes.items() if size == 0 and name.endswith((".bin", ".idx"))]
        if empty:
            raise PipelineError(f"fairseq-preprocess wrote an empty {empty[0]}; is a split of the corpus empty?")
        (tmp / COMPLETE).write_text(json.dumps(sizes, indent=2) + "\n")
    return data_bin


def train(work, data_bin, options, extra, log=None):
    """fairseq-train into ``work``/checkpoints; ``log`` captures its stdout (where fairseq logs, e.g. json lines)."""
    save_dir = work / "checkpoints"
    _run(
        _python_m(
            "fairseq_cli.train", data_bin, "--user-dir", PLUGIN_DIR, "--save-dir", save_dir,
            *as_flags(options), *extra,
        ),  # fmt: skip
        log=log,
        append=True,  # a resumed run adds to its log instead of erasing the first part
    )
    return save_dir


def average(save_dir, last):
    epochs = sorted(save_dir.glob("checkpoint[0-9]*.pt"))
    n = min(last, len(epochs))
    if n == 0:
        raise PipelineError(f"no epoch checkpoints in {save_dir}; did training save any?")
    output = save_dir / f"averaged_last{n}.pt"
    _run(
        _python_m(
            "b2t_fairseq.tools.average_checkpoints",
            "--inputs", save_dir, "--num-epoch-checkpoints", n, "--output", output,
        )  # fmt: skip
    )
    return output


def generate(work, data_bin, checkpoint, options, cpu=True):
    output = work / "generate-test.txt"
    with atomic.atomic_path(output) as tmp:
        _run(
            _python_m(
                "fairseq_cli.generate", data_bin, "--user-dir", PLUGIN_DIR, "--path", checkpoint,
                "--gen-subset", "test", *(["--cpu"] if cpu else []), *as_flags(options),
            ),  # fmt: skip
            log=tmp,
        )
    return output


def score(work, generate_output, reference, remove_bpe):
    result = work / "result.json"
    _run(
        _python_m(
            "b2t_fairseq.tools.score", "--generate-output", generate_output, "--ref", reference,
            "--remove-bpe", remove_bpe, "--output-hyp", work / "hyp.detok.txt", "--json", result,
        )  # fmt: skip
    )
    return json.loads(result.read_text())


DEFAULT_MAX_POSITIONS = 1024  # fairseq's transformer default (DEFAULT_MAX_SOURCE_POSITIONS / _TARGET_)


def check_test_lengths(prefix, src, tgt, train_options, extra=()):
    """Every test sentence fits the model's positions: fairseq-generate would otherwise stop on the first one
    that does not, with advice (--skip-invalid-size-inputs-valid-test) that drops it from the scored output."""
    extra = [str(a) for a in extra]
    for side, lang in (("source", src), ("target", tgt)):
        key = f"max-{side}-positions"
        limit = train_options.get(key, DEFAULT_MAX_POSITIONS)
        for i, arg in enumerate(extra):  # "-- --max-source-positions N" overrides the config
            if arg == f"--{key}" and i + 1 < len(extra):
                limit = extra[i + 1]
            elif arg.startswith(f"--{key}="):
                limit = arg.split("=", 1)[1]
        limit = int(limit)
        path = f"{prefix}test.{lang}"
        for number, line in enumerate(read_lines(path), start=1):
            tokens = len(line.split()) + 1  # + end of sentence
            if tokens > limit:
                raise PipelineError(
                    f"{path}, line {number}: {tokens} tokens (end of sentence included), more than the model's "
                    f"{key} {limit}; split or remove that test line, or raise {key} in the config's train section"
                )


def record_work(work, facts):
    """``work``/pipeline.json: what the work dir was made from. A rerun with other inputs (config, corpus,
    languages, fairseq-train flags) would mix two runs in one directory, and is refused."""
    path = work / "pipeline.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in facts if old.get(k) != facts[k]]
        if changed:
            k = changed[0]
            raise PipelineError(
                f"{work} holds a run made with another {k} ({old.get(k)!r} there, {facts[k]!r} now); rerun with "
                "the same inputs to continue it, or use another --work-dir"
            )
        return
    atomic.write_text(path, json.dumps(facts, indent=2) + "\n")


def run_pipeline(config, work, data=None, src=None, tgt=None, extra=()):
    corpus = config["corpus"]
    if data is None:
        if "toy" not in corpus:
            raise PipelineError("this config has no 'corpus: toy:' section; pass --data with a real corpus")
    else:
        raw_prefix, src, tgt = find_corpus(data, src, tgt)
        if "sentencepiece" not in corpus:
            raise PipelineError("--data needs a config with a 'corpus: sentencepiece:' section (configs/demo/real.yaml)")
    work.mkdir(parents=True, exist_ok=True)
    record_work(work, {"config": config, "data": str(Path(raw_prefix).resolve()) if data else None, "src": src,
                       "tgt": tgt, "extra": list(extra)})  # fmt: skip
    if data is None:
        prefix, src, tgt, reference = prepare_toy(work, corpus["toy"])
        remove_bpe = "none"
    else:
        prefix, src, tgt = prepare_sentencepiece(work, raw_prefix, src, tgt, corpus["sentencepiece"])
        reference, remove_bpe = f"{raw_prefix}test.{tgt}", "sentencepiece"
    data_bin = preprocess(work, prefix, src, tgt)
    check_test_lengths(prefix, src, tgt, config["train"], extra)
    save_dir = train(work, data_bin, config["train"], list(extra))
    checkpoint = average(save_dir, config.get("average_last_epochs", 5))
    generate_output = generate(work, data_bin, checkpoint, config.get("generate", {}))
    result = score(work, generate_output, reference, remove_bpe)
    result.update(checkpoint=str(checkpoint), src=src, tgt=tgt)
    atomic.write_text(work / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def cli_main(argv=None):
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="b2t-pipeline", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML file under configs/ (hyperparameters)")
    parser.add_argument("--work-dir", required=True, type=Path, help="where data, checkpoints and results go")
    parser.add_argument("--data", help="real corpus: directory or prefix P with P{train,valid,test}.{src,tgt}")
    parser.add_argument("--src", help="source language suffix (default: detected from P train.*)")
    parser.add_argument("--tgt", help="target language suffix")
    parser.epilog = "Anything after `--` is passed to fairseq-train and overrides the config."
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"config {args.config} does not exist")
    try:
        result = run_pipeline(
            yaml.safe_load(args.config.read_text()), args.work_dir, args.data, args.src, args.tgt, extra
        )
    except PipelineError as e:
        parser.exit(1, f"b2t-pipeline: error: {e}\n")
    print(f"\n{args.work_dir}: BLEU {result['bleu']:.2f} on {result['n']} test sentences ({result['signature']})")


if __name__ == "__main__":
    cli_main()
