"""The training loss as a picture, reports/training_loss.png, drawn from dvclive's loss.tsv when a run succeeds.

`dvc plots show` draws the same series in an HTML page that loads Vega from a public CDN: offline (and behind many
company firewalls) that page shows no curve. A PNG reads anywhere.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from tasks.common.artifacts import write_bytes


def read_loss(tsv: Path) -> tuple[list[int], list[float]]:
    """(optimizer steps, loss) from dvclive's loss.tsv."""
    with open(tsv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [int(float(r["step"])) for r in rows], [float(r["loss"]) for r in rows]


def save_loss_curve(tsv: Path, png: Path) -> Path:
    """Draw the loss per optimizer step into png, replacing it whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss = read_loss(tsv)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(steps, loss, color="#4c72b0", marker="o", markersize=3, linewidth=1.5)
    ax.set_title(f"Training loss on answer tokens ({len(steps)} log lines)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(png, buf.getvalue())
    return png
