"""What both analysis tools write: the CSV of their rows and a PNG figure, in directories made as needed."""
import csv
from pathlib import Path

from b2t_fairseq.errors import B2TConfigError


def write_csv(rows, path, fields):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
