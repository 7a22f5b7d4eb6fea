#!/usr/bin/env python
"""CPU-scale stability study of the B2T paper's claims (issues 4 and 8), results written under docs/stability/.

    python experiments/stability_study.py --work study-out --stages data train deep100 grad-norms report
    python experiments/stability_study.py --work study-out --stages train --methods b2t --seeds 1 2
    python experiments/stability_study.py --work study-out --stages train deep100 --gpu --jobs 12 --seeds 1 2
    python experiments/stability_study.py --work study-out --stages train --methods b2t post-ln --norm-types rmsnorm dyt

Stages (each skips what it already finished, so a rerun after an interruption continues):
  data        the real WMT sample in ../shared/data (10k pairs) -> joint sentencepiece 8k -> data-bin
  train       18L-18L, width 64, every method x seeds, identical flags except what a method itself requires
              (configs/study/wmt_sample_18l.yaml, `method_overrides`): json training log, last checkpoint,
              beam-4 BLEU on 1000 test lines; --norm-types adds the same runs with another --norm-type (a
              method without norms, T-Fixup or ReZero, has no such run)
  deep100     100L-100L at width 32 for 300 updates, every method (configs/study/deep100_tiny.yaml): finite,
              falling loss?
  grad-norms  per-layer gradient norms at initialization, 6L and 18L, widths 512 and 128, every method,
              several seeds (b2t-grad-norms); figure + lowest/highest layer ratio table
  report      loss-curve figure (b2t-loss-curves), docs/stability/results.json and the tables of the docs page
  base18      (only when named; issue 23) 18L-18L at transformer_wmt_en_de width, fp16 on a GPU, the paper's lr and
              warmup (configs/study/wmt_sample_18l_base.yaml): Post-LN, Pre-LN and B2T side by side for --minutes of
              training each, loss curves only (benchmarks/gpu/run.sh runs it last); --smoke checks it on a CPU.
              Its runs save no checkpoint (minutes long; ~1.5 GB each): an interrupted one starts afresh

--gpu trains and decodes on the GPU (same flags otherwise, fp32); --jobs runs that many trainings at once
(one GPU is shared; on a 2-core CPU keep 1); --deadline-minutes starts no new run after that many minutes.

The numbers come from whatever this machine produces; nothing is filled in by hand.
"""
import argparse
import concurrent.futures
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from b2t_fairseq.safety import atomic  # noqa: E402
from b2t_fairseq.analysis import loss_curves  # noqa: E402
from b2t_fairseq.modules.connections import CONNECTIONS  # noqa: E402
from b2t_fairseq.modules.norms import NORM_TYPES  # noqa: E402
from b2t_fairseq.recipes.common import method_train_options  # noqa: E402
from b2t_fairseq.tools import pipeline  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "wmt_ende_opennmt10k"
CONFIGS = REPO / "configs" / "study"
DOCS = REPO / "docs" / "stability"
METHODS = tuple(CONNECTIONS)
STAGES = ("data", "train", "deep100", "grad-norms", "report")
GPU_STAGES = ("base18",)  # only when asked for: 18L at base width needs a GPU (or --smoke, to check it on a CPU)


class StudyError(Exception):
    pass


def _config(name):
    return yaml.safe_load((CONFIGS / name).read_text())


class Runner:
    """Where and how many runs at once: the CPU (one at a time), or a GPU shared by ``jobs`` runs; no run
    starts after ``deadline`` (a time.monotonic() value)."""

    def __init__(self, gpu=False, jobs=1, deadline=None):
        self.gpu, self.jobs, self.deadline = gpu, jobs, deadline

    def train_options(self, config, method):
        """The config's train flags for ``method``: its ``method_overrides`` entry (the exceptions a method
        itself requires) on top; on the GPU without ``cpu``."""
        options = method_train_options(config, method)
        if self.gpu:
            options.pop("cpu", None)
        return options

    def map(self, fn, items):
        def guarded(item):
            if self.deadline is not None and time.monotonic() > self.deadline:
                return None
            return fn(item)

        if self.jobs <= 1:
            results = [guarded(item) for item in items]
        else:
            with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
                results = list(pool.map(guarded, items))
        return [r for r in results if r is not None]


# ------------------------------------------------------------------ data
def stage_data(work):
    """Corpus files cut from the sample, sentencepiece, binarization; returns the data-bin and raw test refs."""
    data_bin, reference = work / "data-bin", work / "corpus" / "test.de"
    if (data_bin / pipeline.COMPLETE).is_file() and reference.is_file():
        return data_bin, reference  # made earlier (here, or on the machine this work dir came from)
    if not SAMPLE.is_dir():
        raise StudyError(f"the real WMT sample {SAMPLE} is not here; the study needs it (../shared/data)")
    spec = _config("wmt_sample_18l.yaml")["corpus"]
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    limits = {"train": None, "valid": spec["valid_lines"], "test": spec["test_lines"]}
    for split, n in limits.items():
        for lang in ("en", "de"):
            target = corpus / f"{split}.{lang}"
            if not target.is_file():
                lines = (SAMPLE / f"{split}.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
                target.write_text("".join(lines[:n]), encoding="utf-8")
    prefix, src, tgt = pipeline.prepare_sentencepiece(work, f"{corpus}/", "en", "de", spec["sentencepiece"])
    data_bin = pipeline.preprocess(work, prefix, src, tgt)
    return data_bin, corpus / "test.de"


# ------------------------------------------------------------------ train
def _train_points(log):
    """(update, loss) of the train_inner and valid lines of a fairseq json log, by b2t-loss-curves' parser."""
    splits = loss_curves.parse_log(Path(log).read_text(encoding="utf-8", errors="replace"))
    return tuple([(u, v) for u, _, v in loss_curves.curve(splits.get(split, []), "loss")]
                 for split in ("train_inner", "valid"))  # fmt: skip


def _curve_record(run, method):
    """What a run's training log shows: updates, first and last train loss, whether every loss is finite, the
    validation losses by update."""
    train_pts, valid_pts = _train_points(run / "train.log")
    losses = [v for _, v in train_pts]
    return {"method": method, "updates": train_pts[-1][0] if train_pts else 0,
            "first_train_loss": losses[0] if losses else None, "last_train_loss": losses[-1] if losses else None,
            "all_finite": bool(losses) and all(map(_finite, losses)),
            "best_valid_loss": min((v for _, v in valid_pts), default=None), "valid": valid_pts,
            "log": str(run / "train.log")}  # fmt: skip


def _device_of_log(log):
    """Where a fairseq-train log's run trained: fairseq logs its CUDA environment only on a GPU."""
    return "gpu" if "CUDA enviroments" in Path(log).read_text(encoding="utf-8", errors="replace") else "cpu"


def _finite(x):
    return x is not None and math.isfinite(x)


def run_name(method, norm_type):
    """How a run is named in the tables and in its directory: the method, and the norm type where it is not
    the default (``b2t.rmsnorm``)."""
    return method if norm_type == "layernorm" else f"{method}.{norm_type}"


def _order(record):
    return (METHODS.index(record["method"]), NORM_TYPES.index(record.get("norm_type", "layernorm")),
            str(record.get("seed", "1")))  # fmt: skip


def train_one(work, data_bin, reference, method, norm_type, seed, config, runner):
    run = work / f"18l-{run_name(method, norm_type)}-seed{seed}"
    done = run / "study.json"
    if done.is_file():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    log = _start_log(run)
    started = datetime.datetime.now()
    try:
        flags = ["--connection", method, "--seed", str(seed)]
        if norm_type != "layernorm":
            flags += ["--norm-type", norm_type]
        save_dir = pipeline.train(run, data_bin, runner.train_options(config, method), flags, log=log)
        failed = None
    except pipeline.PipelineError as e:  # a diverging run (NaN loss, overflow) is a result, not a crash of the study
        save_dir, failed = run / "checkpoints", str(e)
    minutes = (datetime.datetime.now() - started).total_seconds() / 60
    train_pts, valid_pts = _train_points(log)
    result = {"method": method, "norm_type": norm_type, "seed": seed, "train_minutes": round(minutes, 1), "failed": failed,
              "final_train_loss": train_pts[-1][1] if train_pts else None,
              "final_valid_loss": valid_pts[-1][1] if valid_pts else None,
              "best_valid_loss": min((v for _, v in valid_pts), default=None),
              "updates": train_pts[-1][0] if train_pts else 0, "log": str(log)}  # fmt: skip
    if failed is None and (save_dir / "checkpoint_last.pt").is_file():
        last = config.get("average_last_epochs")
        checkpoint = pipeline.average(save_dir, last) if last else save_dir / "checkpoint_last.pt"
        generated = pipeline.generate(run, data_bin, checkpoint, config["generate"], cpu=not runner.gpu)
        score = pipeline.score(run, generated, reference, "sentencepiece")
        result.update(bleu=score["bleu"], bleu_n=score["n"], signature=score["signature"], checkpoint=str(checkpoint))
    result["device"] = "gpu" if runner.gpu else "cpu"
    atomic.write_text(done, json.dumps(result, indent=2) + "\n")
    return result


def _start_log(run):
    """The training log of ``run``, which fairseq-train appends to when it resumes from checkpoint_last.pt. A log
    without that checkpoint (a run stopped before its first save, or whose checkpoints stayed on another
    machine) would mix two runs: it is moved aside, not continued."""
    log = run / "train.log"
    if log.is_file() and not (run / "checkpoints" / "checkpoint_last.pt").is_file():
        n = 1
        while (run / f"train.log.abandoned{n}").exists():
            n += 1
        os.replace(log, run / f"train.log.abandoned{n}")
    return log


def stage_train(work, methods, seeds, runner, norm_types=("layernorm",)):
    data_bin, reference = stage_data(work)
    config = _config("wmt_sample_18l.yaml")
    items = [(m, n, s) for s in seeds for n in norm_types for m in methods
             if n == "layernorm" or CONNECTIONS[m].layer_norms]  # T-Fixup and ReZero have no norm to change
    return runner.map(lambda item: train_one(work, data_bin, reference, *item, config, runner), items)


# ------------------------------------------------------------------ deep100
def deep_one(work, data_bin, method, config, runner):
    run = work / f"100l-{method}"
    done = run / "study.json"
    if done.is_file():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    log = _start_log(run)
    started = datetime.datetime.now()
    failed = None
    try:
        flags = ["--connection", method, "--seed", "1"]
        pipeline.train(run, data_bin, runner.train_options(config, method), flags, log=log)
    except pipeline.PipelineError as e:
        failed = str(e)
    result = dict(_curve_record(run, method), layers=100, device="gpu" if runner.gpu else "cpu", failed=failed,
                  train_minutes=round((datetime.datetime.now() - started).total_seconds() / 60, 1))
    atomic.write_text(done, json.dumps(result, indent=2) + "\n")
    return result


def stage_deep100(work, methods, runner):
    data_bin, _ = stage_data(work)
    config = _config("deep100_tiny.yaml")
    return runner.map(lambda m: deep_one(work, data_bin, m, config, runner), list(methods))


# ------------------------------------------------------------------ base18
BASE18 = "wmt_sample_18l_base.yaml"


def base18_name(method, smoke):
    """A base18 run's directory: ``18lbase-b2t``; a --smoke run's ``18lsmoke-b2t``, so that a check of the script
    never stands in for a result."""
    return f"18l{'smoke' if smoke else 'base'}-{method}"


def base18_config():
    """configs/study/wmt_sample_18l_base.yaml with the train flags it names (``from_wmt_recipe``), the
    method_overrides and the GPU flags (``gpu``: fp16) taken from the WMT recipe's base.yaml, where the paper's
    optimiser is written."""
    config = _config(BASE18)
    recipe = yaml.safe_load((REPO / "configs" / "wmt_en_de" / "base.yaml").read_text())
    config["train"] = {**{k: recipe["train"][k] for k in config["from_wmt_recipe"]}, **config["train"]}
    config["method_overrides"] = recipe.get("method_overrides") or {}
    config["gpu"] = recipe.get("gpu_train") or {}  # fp16
    return config


def base18_options(config, method, runner, minutes, smoke):
    """The config's train flags for ``method``, the GPU's (fp16) or, with ``smoke``, the CPU check's on top, and
    ``stop-time-hours`` for ``minutes`` of training."""
    options = runner.train_options(config, method)
    options.update(config["smoke"] if smoke else config["gpu"] if runner.gpu else {})
    options["stop-time-hours"] = round(minutes / 60, 6)
    return options


def base18_one(work, data_bin, method, options, runner, smoke):
    run = work / base18_name(method, smoke)
    done = run / "study.json"
    if done.is_file():  # finished: kept, unless its flags differ from these (its length, --minutes, may)
        record = json.loads(done.read_text())
        if _without_length(record.get("options")) != _without_length(options):
            raise StudyError(f"{done} records a run with other flags than this one's; to train it again with these, "
                             f"delete {run} (or pass another --work)")  # fmt: skip
        return record
    run.mkdir(parents=True, exist_ok=True)
    log = _start_log(run)  # no checkpoints are saved: an interrupted run's log is moved aside, the run starts afresh
    started = datetime.datetime.now()
    failed = None
    try:
        pipeline.train(run, data_bin, options, ["--connection", method, "--seed", "1"], log=log)
    except pipeline.PipelineError as e:  # a diverging run is a result
        failed = str(e)
    record = _curve_record(run, method)
    record.update(failed=failed, interrupted=False, device="gpu" if runner.gpu and not smoke else "cpu",
                  train_minutes=round((datetime.datetime.now() - started).total_seconds() / 60, 1), options=options)
    atomic.write_text(done, json.dumps(record, indent=2) + "\n")
    return record


def _without_length(options):
    return {k: v for k, v in (options or {}).items() if k != "stop-time-hours"}


def stage_base18(work, methods, runner, minutes, smoke=False, data_bin=None):
    """``data_bin``: another binarized corpus than the WMT sample's (the CPU check of benchmarks/gpu/run.sh trains
    on its toy corpus)."""
    if not (runner.gpu or smoke):
        raise StudyError("the base18 stage trains 18L-18L models at base width: pass --gpu on a GPU machine, or "
                         "--smoke to check the stage on a CPU")  # fmt: skip
    if data_bin is None:
        data_bin, _ = stage_data(work)
    elif not any(Path(data_bin).glob("dict.*.txt")):
        raise StudyError(f"--data-bin {data_bin}: no fairseq dictionary there; pass a fairseq-preprocess output folder")
    config = base18_config()
    methods = [m for m in methods if m in config["methods"]] or list(config["methods"])
    runner = Runner(gpu=runner.gpu and not smoke, jobs=len(methods) if runner.gpu and not smoke else 1,
                    deadline=runner.deadline)  # side by side on the GPU  # fmt: skip
    return runner.map(lambda m: base18_one(work, data_bin, m, base18_options(config, m, runner, minutes, smoke),
                                           runner, smoke), methods)  # fmt: skip


def base18_records(work, smoke=False):
    """The base18 runs' records, in the config's order; a run stopped before it wrote study.json (the device's
    time ran out) from its log, marked ``interrupted``."""
    order = list(_config(BASE18)["methods"])
    out = []
    for method in order:
        run = work / base18_name(method, smoke)
        if (run / "study.json").is_file():
            record = json.loads((run / "study.json").read_text())
            record["log"] = str(run / "train.log")
        elif (run / "train.log").is_file():
            record = dict(_curve_record(run, method), failed=None, interrupted=True, train_minutes=None,
                          device=_device_of_log(run / "train.log"))
        else:
            continue
        out.append(record)
    return out


# ------------------------------------------------------------------ grad-norms
GRAD_SETTINGS = {  # name: (layers, embed, ffn, heads, extra model flags)
    "6L-d512": (6, 512, 2048, 8, []),
    "18L-d512": (18, 512, 2048, 8, []),
    "6L-d128": (6, 128, 512, 4, []),
    "18L-d128": (18, 128, 512, 4, []),
    # B2T without its N^-1/2 init scaling (the baselines have none either way): how much of B2T's smaller
    # gradients is that scaling
    "18L-d128-init-none": (18, 128, 512, 4, ["--init-scaling", "none"]),
}


def stage_grad_norms(work, methods, seeds, batches, max_tokens, settings=GRAD_SETTINGS):
    data_bin, _ = stage_data(work)
    out = work / "grad-norms"
    out.mkdir(parents=True, exist_ok=True)
    produced = {}
    for name, (layers, dim, ffn, heads, extra) in settings.items():
        csv_path, png_path = out / f"{name}.csv", out / f"{name}.png"
        if not csv_path.is_file():
            pipeline._run(pipeline._python_m(
                "b2t_fairseq.analysis.grad_norms", "--data-bin", data_bin, "--connections", *methods,
                "--seeds", *seeds, "--num-batches", batches, "--max-tokens", max_tokens,
                "--out-csv", csv_path, "--out-png", png_path, "--title", f"{name}, at initialization", "--",
                "--arch", "transformer_b2t", "--encoder-layers", layers, "--decoder-layers", layers,
                "--encoder-embed-dim", dim, "--decoder-embed-dim", dim, "--encoder-ffn-embed-dim", ffn,
                "--decoder-ffn-embed-dim", ffn, "--encoder-attention-heads", heads, "--decoder-attention-heads", heads,
                "--share-all-embeddings", "--dropout", "0.0", "--criterion", "label_smoothed_cross_entropy",
                "--label-smoothing", "0.1", *extra,
            ))  # fmt: skip
        produced[name] = (csv_path, png_path)
    return produced


def grad_ratio_table(produced):
    """Lowest-layer / highest-layer norm of the parameter gradients per stack, mean and range over seeds."""
    rows = []
    for name, (csv_path, _) in produced.items():
        per = {}  # (connection, stack, seed) -> {layer: value}
        with open(csv_path, newline="") as f:
            for rec in csv.DictReader(f):
                if rec["position"] != "params" or rec["batch"] != "mean":
                    continue
                key = (rec["connection"], rec["stack"], rec["seed"])
                per.setdefault(key, {})[int(rec["layer"])] = float(rec["value"])
        ratios = {}
        for (conn, stack, _seed), layers in per.items():
            lo, hi = min(layers), max(layers)
            # a top layer without any gradient (ReZero's encoder at init: a = 0 everywhere, so the decoder's
            # output does not depend on it) has no ratio
            ratios.setdefault((conn, stack), []).append(layers[lo] / layers[hi] if layers[hi] > 0 else None)
        for (conn, stack), values in sorted(ratios.items()):
            defined = [v for v in values if v is not None]
            row = {"setting": name, "connection": conn, "stack": stack, "ratio_mean": None, "ratio_min": None,
                   "ratio_max": None, "seeds": len(values)}  # fmt: skip
            if defined:
                row.update(ratio_mean=sum(defined) / len(defined), ratio_min=min(defined), ratio_max=max(defined),
                           seeds=len(defined))  # fmt: skip
            rows.append(row)
    return rows


# ------------------------------------------------------------------ report
def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    import torch

    return {"date": datetime.date.today().isoformat(), "commit": commit.stdout.strip() or "unknown",
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def _records(work, pattern):
    """The runs' records: study.json (result.json as earlier versions of this script named it), or, for a run
    that was stopped before it wrote one, what its training log shows, marked ``interrupted``."""
    out = []
    for run in sorted(work.glob(pattern)):
        for name in ("study.json", "result.json"):
            path = run / name
            if path.is_file() and "method" in (record := json.loads(path.read_text())):
                record["log"] = str(run / "train.log")  # where it is now, wherever it ran
                out.append(record)
                break
        else:
            if (run / "train.log").is_file():
                out.append(_interrupted_record(run))
    return out


def _interrupted_record(run):
    """A run's record from its training log alone (its process was stopped before the study recorded it)."""
    log = run / "train.log"
    kind, _, rest = run.name.partition("-")
    name, _, seed = rest.rpartition("-seed") if kind == "18l" else (rest, "", "1")
    method, _, norm_type = name.partition(".")
    record = _curve_record(run, method)
    record.update(norm_type=norm_type or "layernorm", seed=seed, layers=100 if kind == "100l" else 18,
                  device=_device_of_log(log), failed=None, interrupted=True, train_minutes=None,
                  final_train_loss=record["last_train_loss"],
                  final_valid_loss=record["valid"][-1][1] if record["valid"] else None)
    return record


def stage_report(work, methods, seeds, docs=DOCS, norm_types=("layernorm",), smoke=False):
    docs.mkdir(parents=True, exist_ok=True)
    base = base18_records(work, smoke)
    if base:
        pipeline._run(pipeline._python_m("b2t_fairseq.analysis.loss_curves",
                                         *sum((["--run", f"{r['method']}={r['log']}"] for r in base), []),
                                         "--out-png", docs / "loss_curves_18l_base.png",
                                         "--out-csv", docs / "loss_curves_18l_base.csv", "--title",
                                         "--smoke check: 2 layers at width 32 (not a result)" if smoke else
                                         "18L-18L, transformer_wmt_en_de width, real WMT sample (10k pairs)"))  # fmt: skip
    runs = [r for r in _records(work, "18l-*") if r["method"] in methods and str(r["seed"]) in map(str, seeds)
            and r.get("norm_type", "layernorm") in norm_types]  # fmt: skip
    runs.sort(key=_order)
    if runs:
        curves = [f"{run_name(r['method'], r.get('norm_type', 'layernorm'))} seed {r['seed']}={r['log']}"
                  for r in runs]  # fmt: skip
        pipeline._run(pipeline._python_m("b2t_fairseq.analysis.loss_curves", *sum((["--run", c] for c in curves), []),
                       "--out-png", docs / "loss_curves_18l.png", "--out-csv", docs / "loss_curves_18l.csv",
                       "--title", "18L-18L, d64, real WMT sample (10k pairs)"))  # fmt: skip
    deep = [r for r in _records(work, "100l-*") if r["method"] in methods]
    deep.sort(key=lambda r: METHODS.index(r["method"]))
    produced = {name: (work / "grad-norms" / f"{name}.csv", work / "grad-norms" / f"{name}.png")
                for name in GRAD_SETTINGS if (work / "grad-norms" / f"{name}.csv").is_file()}  # fmt: skip
    for name, (csv_path, png_path) in produced.items():
        (docs / png_path.name).write_bytes(png_path.read_bytes())
        (docs / csv_path.name).write_bytes(csv_path.read_bytes())
    results = {
        "machine": machine(),
        "train_18l": [{k: v for k, v in r.items() if k not in ("log", "checkpoint")} for r in runs],
        "deep100": [{k: v for k, v in r.items() if k != "log"} for r in deep],
        "grad_norm_ratios": grad_ratio_table(produced),
        "base18": [{k: v for k, v in r.items() if k != "log"} for r in base],
    }
    atomic.write_text(docs / "results.json", json.dumps(results, indent=2) + "\n")
    atomic.write_text(docs / "tables.md", render_tables(results))
    print(render_tables(results))
    return results


def _num(x, fmt="{:.3f}"):
    return "–" if x is None else fmt.format(x)


def render_tables(results):
    m = results["machine"]
    lines = [f"Generated by `experiments/stability_study.py` on {m['date']}, commit {m['commit']}, {m['cpu']} "
             f"({m['cores']} cores), Python {m['python']}, torch {m['torch']}.", ""]  # fmt: skip
    if results["train_18l"]:
        lines += ["### 18L-18L training on the WMT sample (configs/study/wmt_sample_18l.yaml)", "",
                  "| Method | Seed | Updates | Final train loss | Best valid loss | Final valid loss | BLEU | Device | "
                  "Min |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(results["train_18l"], key=_order):
            bleu = _num(r.get("bleu"), "{:.2f}") + (" (failed: " + r["failed"] + ")" if r.get("failed") else "")
            if r.get("interrupted"):
                bleu += " (stopped before decoding finished)"
            lines.append(f"| {run_name(r['method'], r.get('norm_type', 'layernorm'))} | {r['seed']} | {r['updates']} | {_num(r['final_train_loss'])} | "
                         f"{_num(r['best_valid_loss'])} | {_num(r['final_valid_loss'])} | {bleu} | "
                         f"{r.get('device', 'cpu')} | {_num(r['train_minutes'], '{}')} |")  # fmt: skip
        signatures = sorted({r["signature"] for r in results["train_18l"] if r.get("signature")})
        scored = [r for r in results["train_18l"] if r.get("bleu_n")]
        if scored:
            lines += ["", f"BLEU: SacreBLEU on the first {scored[0]['bleu_n']} lines of the sample's newstest2014 "
                      f"(tokenized text, sentencepiece removed), {'; '.join(signatures)}."]  # fmt: skip
        lines += ["", "Losses are fairseq's label-smoothed cross-entropy in base 2.", ""]
    deep = results.get("deep100") or []
    if isinstance(deep, dict):  # one run, as earlier versions of this script wrote it
        deep = [deep]
    if deep:
        lines += ["### 100L-100L, width 32 (configs/study/deep100_tiny.yaml)", "",
                  "| Method | Updates | First train loss | Last train loss | All finite | Valid loss by update | "
                  "Device | Min |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for d in deep:
            valid = ", ".join(f"{u}: {v:.3f}" for u, v in d["valid"]) or "–"
            status = "" if not d["failed"] else f" FAILED: {d['failed']}"
            if d.get("interrupted"):
                status += " (stopped early: out of time)"
            lines.append(f"| {d['method']} | {d['updates']} | {_num(d['first_train_loss'])} | "
                         f"{_num(d['last_train_loss'])} | {d['all_finite']}{status} | {valid} | "
                         f"{d.get('device', 'cpu')} | {_num(d['train_minutes'], '{}')} |")  # fmt: skip
        lines.append("")
    if results.get("base18"):
        lines += ["### 18L-18L at transformer_wmt_en_de width on the WMT sample (configs/study/wmt_sample_18l_base.yaml)",
                  "", "| Method | Updates | First train loss | Last train loss | All finite | Best valid loss | "
                  "Valid loss by update | Device | Min |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["base18"]:
            valid = ", ".join(f"{u}: {v:.3f}" for u, v in r["valid"]) or "–"
            status = ("" if not r.get("failed") else f" FAILED: {r['failed']}") + (
                " (stopped early: out of time)" if r.get("interrupted") else "")
            lines.append(f"| {r['method']} | {r['updates']} | {_num(r['first_train_loss'])} | "
                         f"{_num(r['last_train_loss'])} | {r['all_finite']}{status} | {_num(r['best_valid_loss'])} | "
                         f"{valid} | {r.get('device', 'cpu')} | {_num(r.get('train_minutes'), '{}')} |")  # fmt: skip
        lines.append("")
    if results["grad_norm_ratios"]:
        lines += ["### Gradient norms at initialization: lowest layer / highest layer (parameter gradients)", "",
                  "| Setting | Connection | Stack | Ratio (mean over seeds) | min | max | Seeds |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["grad_norm_ratios"]:
            if r["ratio_mean"] is None:
                lines.append(f"| {r['setting']} | {r['connection']} | {r['stack']} | – (no gradient at all) | – | "
                             f"– | {r['seeds']} |")  # fmt: skip
                continue
            lines.append(f"| {r['setting']} | {r['connection']} | {r['stack']} | {r['ratio_mean']:.3f} | "
                         f"{r['ratio_min']:.3f} | {r['ratio_max']:.3f} | {r['seeds']} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("study-out"), help="checkpoints, logs, data-bin")
    parser.add_argument("--stages", nargs="+", choices=STAGES + GPU_STAGES, default=list(STAGES),
                        help="default: every stage but base18 (which needs --gpu or --smoke)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", default=["1"], help="training seeds (train stage)")
    parser.add_argument("--norm-types", nargs="+", choices=NORM_TYPES, default=["layernorm"],
                        help="--norm-type of the train stage's runs (each method with norms runs once per type)")
    parser.add_argument("--grad-seeds", nargs="+", default=["1", "2", "3"], help="initialization seeds (grad-norms)")
    parser.add_argument("--grad-batches", type=int, default=2, help="batches averaged per gradient-norm measurement")
    parser.add_argument("--grad-max-tokens", type=int, default=1024, help="tokens per gradient-norm batch")
    parser.add_argument("--grad-settings", nargs="+", choices=list(GRAD_SETTINGS), default=list(GRAD_SETTINGS))
    parser.add_argument("--gpu", action="store_true", help="train and decode on the GPU (train, deep100: fp32, same flags; base18: the WMT recipe's fp16)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (train, deep100); 1 on a 2-core CPU")
    parser.add_argument("--deadline-minutes", type=float, help="start no run after this many minutes")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the report writes (default docs/stability)")
    parser.add_argument("--minutes", type=float, default=4.0,
                        help="base18: minutes of training per run (fairseq's --stop-time-hours); the runs go side by side")
    parser.add_argument("--data-bin", type=Path,
                        help="base18: train on this fairseq-preprocess folder instead of the WMT sample's data-bin")
    parser.add_argument("--smoke", action="store_true",
                        help="base18 and its report: tiny models on the CPU, runs named 18lsmoke-*, to check the stage")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if not args.minutes > 0:
        parser.error(f"--minutes must be above 0 (got {args.minutes})")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores: more threads spin against each other
    deadline = None if args.deadline_minutes is None else time.monotonic() + 60 * args.deadline_minutes
    runner = Runner(gpu=args.gpu, jobs=args.jobs, deadline=deadline)
    try:
        if "data" in args.stages:
            stage_data(args.work)
        if "grad-norms" in args.stages:
            settings = {k: GRAD_SETTINGS[k] for k in args.grad_settings}
            stage_grad_norms(args.work, args.methods, args.grad_seeds, args.grad_batches, args.grad_max_tokens,
                             settings)  # fmt: skip
        if "train" in args.stages:
            for r in stage_train(args.work, args.methods, args.seeds, runner, args.norm_types):
                print(json.dumps(r), flush=True)
        if "deep100" in args.stages:
            for r in stage_deep100(args.work, args.methods, runner):
                print(json.dumps(r), flush=True)
        if "base18" in args.stages:
            for r in stage_base18(args.work, args.methods, runner, args.minutes, args.smoke, args.data_bin):
                print(json.dumps(r), flush=True)
        if "report" in args.stages:
            stage_report(args.work, args.methods, args.seeds, args.docs, args.norm_types, args.smoke)
    except (StudyError, pipeline.PipelineError) as e:
        parser.exit(1, f"stability_study: error: {e}\n")


if __name__ == "__main__":
    main()
