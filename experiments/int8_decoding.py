"""What --int8-decoding costs in BLEU and gains in speed, on a model trained by `make demo` (toy or real data).

    .venv/bin/python experiments/int8_decoding.py --work demo-out/real            # after make demo DATA=...
    .venv/bin/python experiments/int8_decoding.py --work demo-out/toy --rounds 3

For each variant (float32; --int8-decoding decoder; --int8-decoding all; all with the attention queries and keys
left in float32, as the option did before 2026-12-06) it decodes the demo's test set with
fairseq-generate exactly as the demo did (its checkpoint, data-bin and generate options, --cpu), scores it with
the demo's scorer against the raw references, and times the decoding in alternating rounds (F D A F D A ...):
the time fairseq-generate reports for translating ("Translated N sentences ... in Xs", model loading excluded).
Results: WORK/int8/results.json, and a section appended to benchmarks/RESULTS.md (commit, machine, date).
A rerun redoes only the rounds whose output is missing, and only for the same checkpoint and plugin code (else it
stops and says what to delete); outputs appear whole or not at all.
"""
import argparse
import datetime
import hashlib
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from b2t_fairseq.safety import atomic  # noqa: E402
from b2t_fairseq.tools.pipeline import as_flags, find_corpus  # noqa: E402

# name: (--int8-decoding scope, Linear layers left float32 by name ending, or None for the option's own choice)
VARIANTS = {"float32": (None, None), "int8-decoder": ("decoder", None), "int8-all": ("all", None),
            "int8-all, q/k float32": ("all", ("q_proj", "k_proj"))}  # fmt: skip
# fairseq-generate in this interpreter with b2t_fairseq.fast_paths.int8.KEEP_FLOAT set (comma-separated argument)
KEEP = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import b2t_fairseq.fast_paths.int8 as q; "
        "q.KEEP_FLOAT = tuple(filter(None, sys.argv.pop(1).split(','))); "
        "from fairseq_cli.generate import cli_main; sys.argv[0] = 'fairseq-generate'; cli_main()")
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s")


def demo_facts(work):
    """(checkpoint, data-bin, generate options, reference, remove_bpe) of a finished `make demo` work dir."""
    pipeline, result = work / "pipeline.json", work / "result.json"
    for path in (pipeline, result):
        if not path.is_file():
            sys.exit(f"int8_decoding: {path} is missing; run make demo (DATA=...) with --work-dir {work} first")
    facts, scored = json.loads(pipeline.read_text()), json.loads(result.read_text())
    config = facts["config"]
    if facts.get("data"):
        # the pipeline records a corpus directory without its trailing slash: find_corpus gives the file prefix
        prefix, _, tgt = find_corpus(facts["data"], facts["src"], facts["tgt"])
        reference, remove_bpe = Path(f"{prefix}test.{tgt}"), "sentencepiece"
    else:
        reference, remove_bpe = work / "raw" / "test.tgt", "none"
    return Path(scored["checkpoint"]), work / "data-bin", config.get("generate", {}), reference, remove_bpe, scored


def decode(work, out, checkpoint, data_bin, options, scope, keep=None):
    """fairseq-generate into ``out`` (whole or absent); returns (sentences, seconds fairseq reports)."""
    if keep is None:
        start = [sys.executable, "-m", "fairseq_cli.generate"]
    else:
        start = [sys.executable, "-c", KEEP, str(REPO), ",".join(keep)]
    cmd = [*start, str(data_bin), "--user-dir", str(REPO / "b2t_fairseq"), "--path", str(checkpoint),
           "--gen-subset", "test", "--cpu", *as_flags(options)]  # fmt: skip
    if scope:
        cmd += ["--model-overrides", repr({"int8_decoding": scope})]
    if not out.is_file():
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"int8_decoding: fairseq-generate failed:\n{proc.stderr[-3000:]}")
        with atomic.atomic_path(out) as tmp:
            Path(tmp).write_text(proc.stdout + proc.stderr)
    found = TRANSLATED.findall(out.read_text())
    if len(found) != 1:
        sys.exit(f"int8_decoding: {out} has no 'Translated N sentences ... in Xs' line; delete it and rerun")
    sentences, _, seconds = found[0]
    return int(sentences.replace(",", "")), float(seconds)


def output(out_dir, name, r):
    """Where round ``r`` of variant ``name`` writes its fairseq-generate output."""
    return out_dir / f"{name.replace(', ', '-').replace('/', '').replace(' ', '-')}.round{r}.txt"


def score(out, reference, remove_bpe):
    result = out.with_suffix(".json")
    if not result.is_file():
        subprocess.run([sys.executable, "-m", "b2t_fairseq.tools.score", "--generate-output", str(out), "--ref",
                        str(reference), "--remove-bpe", remove_bpe, "--json", str(result)], check=True, cwd=REPO)  # fmt: skip
    return json.loads(result.read_text())


def hypotheses(out):
    """{sentence id: hypothesis tokens} (the score column left out: it differs in the last digits anyway)."""
    found = {}
    for line in out.read_text().splitlines():
        if line.startswith("H-"):
            sid, _, tokens = line.split("\t", 2)
            found[sid] = tokens
    return found


def code_digest():
    """A digest of the plugin's Python sources: what decodes (and quantizes) the model."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "b2t_fairseq").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def check_earlier_outputs(out_dir, checkpoint):
    """Outputs of an earlier run are reused (a rerun redoes only the missing rounds) only where they came from the
    same checkpoint and the same plugin code: a new `make demo`, or decoding code changed since (a new commit or
    an uncommitted edit), would mix two runs in one table, so the run stops and says what to delete."""
    stamp = {"checkpoint": str(checkpoint.resolve()), "mtime": checkpoint.stat().st_mtime,
             "size": checkpoint.stat().st_size, "code": code_digest()}  # fmt: skip
    stamp_file = out_dir / "checkpoint.json"
    if stamp_file.is_file():
        earlier = json.loads(stamp_file.read_text())
        if {k: earlier.get(k) for k in ("checkpoint", "mtime", "size")} != {k: stamp[k] for k in ("checkpoint", "mtime", "size")}:
            sys.exit(f"int8_decoding: {out_dir} holds outputs of another checkpoint; delete {out_dir} and rerun")
        if earlier.get("code") != stamp["code"]:
            sys.exit(f"int8_decoding: {out_dir} holds outputs made with other b2t_fairseq code than this checkout's; "
                     f"delete {out_dir} and rerun")  # fmt: skip
    atomic.write_text(stamp_file, json.dumps(stamp) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="a finished make demo work dir (demo-out/toy, demo-out/real)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default 3)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    checkpoint, data_bin, options, reference, remove_bpe, demo = demo_facts(args.work)
    out_dir = args.work / "int8"
    out_dir.mkdir(exist_ok=True)
    check_earlier_outputs(out_dir, checkpoint)
    times = {name: [] for name in VARIANTS}
    for r in range(1, args.rounds + 1):
        for name, (scope, keep) in VARIANTS.items():
            out = output(out_dir, name, r)
            sentences, seconds = decode(args.work, out, checkpoint, data_bin, options, scope, keep)
            times[name].append(sentences / seconds)
            print(f"round {r} {name}: {sentences / seconds:.2f} sentences/s", flush=True)
    results = {}
    for name in VARIANTS:
        first = output(out_dir, name, 1)
        scored = score(first, reference, remove_bpe)
        stable = all(hypotheses(first) == hypotheses(output(out_dir, name, r)) for r in range(2, args.rounds + 1))
        ratios = [x / y for x, y in zip(times[name], times["float32"])]
        results[name] = {"bleu": scored["bleu"], "signature": scored["signature"], "n": scored["n"],
                         "sentences_per_s": times[name], "ratio_per_round": ratios,
                         "ratio_median": statistics.median(ratios), "same_output_every_round": stable}  # fmt: skip
    fp32, int8 = hypotheses(output(out_dir, "float32", 1)), hypotheses(output(out_dir, "int8-decoder", 1))
    changed = sum(fp32[sid] != int8.get(sid) for sid in fp32)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),  # fmt: skip
        "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "torch": __import__("torch").__version__,
        "work": str(args.work), "checkpoint": str(checkpoint), "generate": options, "demo_bleu": demo["bleu"],
        "results": results, "int8_decoder_hypotheses_changed": changed,
    }  # fmt: skip
    atomic.write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")
    rows = [f"| {name} | {v['bleu']:.2f} | {v['bleu'] - results['float32']['bleu']:+.2f} | "
            f"{statistics.median(v['sentences_per_s']):.2f} | **{v['ratio_median']:.3f}** "
            f"[{min(v['ratio_per_round']):.3f}–{max(v['ratio_per_round']):.3f}] |" for name, v in results.items()]  # fmt: skip
    n = results["float32"]["n"]
    text = (
        f"\n## int8 decoding — {report['date']} — commit {report['commit']}\n\n"
        f"- machine: {report['machine']}; torch {report['torch']}; fairseq-generate --cpu, default threads\n"
        f"- command: `.venv/bin/python experiments/int8_decoding.py --work {args.work} --rounds {args.rounds}`\n"
        f"- model: `make demo` checkpoint {checkpoint} ({args.work}); its test set, {n} sentences, generate "
        f"options {json.dumps(options)}; BLEU by the demo's scorer ({results['float32']['signature']})\n\n"
        "| variant | BLEU | change | sentences/s (median) | ×float32 per round: median [min–max] |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"int8-decoder changed {changed} of {n} hypotheses. Speed is fairseq-generate's own translation time "
        f"(model loading excluded), {args.rounds} alternating rounds.\n"
    )
    print(text)
    if not args.no_record:  # the log grows by one whole section or not at all
        old = args.results.read_text() if args.results.is_file() else ""
        atomic.write_text(args.results, old + text)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"runtime {time.time() - t0:.0f} s", file=sys.stderr)
