"""What both analysis tools write: the CSV of their rows and a PNG figure, in directories made as needed."""
import csv
from pathlib import Path

from b2t_fairseq.safety import atomic
from b2t_fairseq.safety.errors import B2TConfigError


def write_csv(rows, path, fields):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed), or B2TConfigError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise B2TConfigError("the plot needs matplotlib: pip install matplotlib (the CSV is written)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path):
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def run_colors(plt, runs):
    """One colour per run, all distinct: tab10 for up to 10 runs, tab20 for up to 20 (every method of the
    plugin in one figure), then cycling."""
    cmap, n = (plt.get_cmap("tab10"), 10) if len(runs) <= 10 else (plt.get_cmap("tab20"), 20)
    return {run: cmap(i % n) for i, run in enumerate(runs)}
