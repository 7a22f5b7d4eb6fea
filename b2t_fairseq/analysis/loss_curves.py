"""Training and validation loss curves from fairseq ``--log-format json`` logs, several runs in one figure.

    b2t-loss-curves --run b2t=logs/b2t.out --run post-ln=logs/post_ln.out --run pre-ln=logs/pre_ln.out
    b2t-loss-curves --run ckpt/train.log --metric nll_loss --log-y --out-png nll.png --out-csv nll.csv
    b2t-loss-curves --run b2t=first_attempt.out --run b2t=after_resume.out      # one run, logged in two files

A log is what fairseq-train prints (stdout, or the file of --log-file) with --log-format json; the lines read
are the stats lines

    2026-01-01 12:00:00 | INFO | train_inner | {"epoch": 1, "update": 0.5, "loss": "9.1", "num_updates": "10", ...}
    2026-01-01 12:00:09 | INFO | valid | {"epoch": 1, "valid_loss": "8.8", "valid_num_updates": "20", ...}
    2026-01-01 12:00:09 | INFO | train | {"epoch": 1, "train_loss": "9.0", "train_num_updates": "20", ...}

(fairseq-hydra-train's ``[date][train_inner][INFO] - {...}`` and --log-file's bare ``{...}`` too); everything
else is skipped. The left panel shows the train_inner points (or, for a run logged without them, the per-epoch
train means), the right panel every validation subset, against num_updates, one colour per run. A run resumed
from a checkpoint logs some updates again: a point whose num_updates is not past the previous one of its series
replaces all points from that update on, so the curve follows the attempt that went on. Losses are fairseq's,
in base 2. --metric picks any other logged stat, e.g. gnorm_dec1 of --log-layer-grad-norms. The CSV has one
row per run, split (train_inner, train, valid, ...) and num_updates.
"""
import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from pathlib import Path

from b2t_fairseq.analysis.output import pyplot, run_colors, save_png, write_csv
from b2t_fairseq.safety.errors import B2TConfigError

PROG = "b2t-loss-curves"
TRAIN_SPLITS = ("train_inner", "train")
CSV_FIELDS = ("run", "split", "num_updates", "epoch", "metric", "value")
# "... | INFO | train_inner | {json}" (fairseq-train) or "[...][train_inner][INFO] - {json}" (fairseq-hydra-train)
STATS_LINE = re.compile(
    r"(?:\|\s*(?P<tag>[\w.-]+)\s*\||\[(?P<hydra_tag>[\w.-]+)\]\[[A-Z]+\] -)\s*(?P<stats>\{.*\})\s*$"
)


def _split_of(stats):
    """The split of an untagged stats line (--log-file writes bare messages): train_inner stats are unprefixed,
    the others carry their split as a prefix, e.g. valid_num_updates."""
    if "num_updates" in stats:
        return "train_inner"
    prefixes = [k[: -len("_num_updates")] for k in stats if k.endswith("_num_updates")]
    return prefixes[0] if prefixes else None


def parse_log(text):
    """{split: [stats dict, ...]} of every json stats line, in log order; keys lose their ``split_`` prefix."""
    found = defaultdict(list)
    for line in text.splitlines():
        m = STATS_LINE.search(line)
        body = m.group("stats") if m else line.strip()
        if not body.startswith("{"):
            continue
        try:
            stats = json.loads(body)
        except json.JSONDecodeError:  # e.g. fairseq_cli.train's config dump, a Python repr
            continue
        if not isinstance(stats, dict):
            continue
        split = (m.group("tag") or m.group("hydra_tag")) if m else _split_of(stats)
        if split is None:
            continue
        prefix = f"{split}_"
        found[split].append({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in stats.items()})
    return dict(found)


def curve(stats_list, metric):
    """[(num_updates, epoch, value)] of one split; a resumed run's repeated updates replace the earlier ones."""
    points = []
    for stats in stats_list:
        if metric not in stats or "num_updates" not in stats:
            continue
        update = int(float(stats["num_updates"]))
        while points and points[-1][0] >= update:
            points.pop()
        points.append((update, int(stats.get("epoch", 0)), float(stats[metric])))
    return points


def parse_run_spec(spec):
    """``LABEL=PATH`` or ``PATH`` (label: the file stem)."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        if not label or not path:
            raise B2TConfigError(f"--run {spec!r}: expected LABEL=PATH or PATH")
        return label, Path(path)
    return Path(spec).stem, Path(spec)


def read_runs(specs, metric):
    """CSV rows of every run; several files with one label are one run, in the order given."""
    texts = defaultdict(list)
    for spec in specs:
        label, path = parse_run_spec(spec)
        if not path.is_file():
            raise B2TConfigError(f"no such log file: {path}")
        text = path.read_text(errors="replace")
        if not parse_log(text):
            what = "is empty" if not text.strip() else "has no json stats lines (train_inner/train/valid)"
            raise B2TConfigError(f"{path} {what}; was it written by fairseq-train --log-format json?")
        texts[label].append(text)
    rows = []
    for label, parts in texts.items():
        splits = parse_log("\n".join(parts))
        seen = sorted({k for stats_list in splits.values() for stats in stats_list for k in stats})
        if not any(metric in stats for stats_list in splits.values() for stats in stats_list):
            raise B2TConfigError(f"run {label!r} logs no {metric!r}; it logs: {', '.join(seen)}")
        order = [s for s in TRAIN_SPLITS if s in splits] + [s for s in splits if s not in TRAIN_SPLITS]
        for split in order:
            for update, epoch, value in curve(splits[split], metric):
                rows.append(dict(run=label, split=split, num_updates=update, epoch=epoch, metric=metric, value=value))
    return rows


def plot(rows, path, log_y=False, title=None):
    plt = pyplot()

    series = defaultdict(list)
    for r in rows:
        series[r["run"], r["split"]].append((r["num_updates"], r["value"]))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    valid_splits = list(dict.fromkeys(r["split"] for r in rows if r["split"] not in TRAIN_SPLITS))
    colors = run_colors(plt, runs)
    styles = ["-", "--", ":", "-."]
    metric = rows[0]["metric"]

    fig, (train_ax, valid_ax) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    if title:
        fig.suptitle(title)
    for run in runs:
        split = "train_inner" if (run, "train_inner") in series else "train"
        if (run, split) in series:
            xs, ys = zip(*series[run, split])
            label = run if split == "train_inner" else f"{run} (epoch means)"
            train_ax.plot(xs, ys, color=colors[run], label=label)
        for i, split in enumerate(valid_splits):
            if (run, split) in series:
                xs, ys = zip(*series[run, split])
                label = run if len(valid_splits) == 1 else f"{run} ({split})"
                valid_ax.plot(xs, ys, styles[i % len(styles)], color=colors[run], marker="o", markersize=3, label=label)
    for ax, name in ((train_ax, "train"), (valid_ax, "valid" if len(valid_splits) <= 1 else "validation subsets")):
        ax.set_title(f"{name} {metric}")
        ax.set_xlabel("updates")
        ax.set_ylabel(f"{metric} (base 2)" if "loss" in metric else metric)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    save_png(fig, path)


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--run", action="append", required=True, metavar="[LABEL=]PATH",
        help="a fairseq-train log; repeat for several runs (default label: the file stem). Files given with "
        "the same label are one run, read in the order given",
    )  # fmt: skip
    parser.add_argument(
        "--metric", default="loss", help="which logged stat to plot: loss (default), nll_loss, ppl, gnorm_dec1, ..."
    )
    parser.add_argument("--out-png", type=Path, metavar="FILE", default=Path("loss_curves.png"), help="the plot")
    parser.add_argument("--out-csv", type=Path, metavar="FILE", default=Path("loss_curves.csv"), help="the points")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axes")
    parser.add_argument("--title", metavar="TEXT", help="a title over the figure")
    args = parser.parse_args(argv)
    # importing fairseq (through the package) leaves the root logger at DEBUG; matplotlib would flood it
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        rows = read_runs(args.run, args.metric)
        write_csv(rows, args.out_csv, CSV_FIELDS)
        plot(rows, args.out_png, args.log_y, args.title)
    except (B2TConfigError, OSError) as e:
        parser.exit(2, f"{PROG}: error: {e}\n")
    counts = defaultdict(int)
    for r in rows:
        counts[r["run"]] += 1
    print(f"wrote {args.out_csv} and {args.out_png}: " + ", ".join(f"{run} {n} points" for run, n in counts.items()))


if __name__ == "__main__":
    sys.exit(cli_main())
