"""``python -m neo.plot RUN_DIR... -o curves.png``: a run's curves, from its metrics.jsonl, in one picture.

Four panels: training loss (with the validation loss as dashed markers), learning rate, gradient norm and
tokens/s. Several runs overlay, one colour each, labelled by their folder, to compare them. A run that was
stopped and resumed appended to the same metrics.jsonl; for a step logged twice (the steps between the
last checkpoint and a kill) the later launch's record is drawn, as it is the one the run continued from.
Reads files only (no torch); matplotlib is an optional extra (``pip install 'neo[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from neo.errors import NeoError

PANELS = (  # (title, metrics.jsonl keys drawn in it)
    ("loss", ("loss", "valid_loss")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("tokens/s", ("tokens_per_s",)),
)


def read_run(path: str) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for every numeric key of a run folder's metrics.jsonl (or that file)."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise NeoError(f"{path}: no metrics.jsonl here. Fix: give a run folder (logging.dir of a neo run).")
    latest: dict[str, dict[int, float]] = {}
    with open(file) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if "step" not in record or "event" in record:
                continue
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    latest.setdefault(key, {})[int(record["step"])] = float(value)
    if not latest:
        raise NeoError(f"{file} holds no step records yet.")
    return {key: sorted(values.items()) for key, values in latest.items()}


def labels(paths: list[str]) -> list[str]:
    """Each run's folder name; the whole path where two folders share a name."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [p if names.count(n) > 1 else n for p, n in zip(paths, names)]


def draw(runs: dict[str, dict[str, list[tuple[int, float]]]], output: str, title: str | None = None) -> str:
    """Draw ``{label: read_run(...)}`` into one PNG at ``output``; returns its path."""
    try:
        import matplotlib
    except ImportError:
        raise NeoError(
            "neo.plot needs matplotlib. Fix: pip install matplotlib (or pip install 'neo[plot]')."
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, keys) in zip(axes.flat, PANELS):
        for i, (label, curves) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            for key in keys:
                if key not in curves:
                    continue
                steps, values = zip(*curves[key])
                if key.startswith("valid_"):
                    ax.plot(steps, values, "o--", color=color, markersize=4, label=f"{label} (validation)")
                else:
                    ax.plot(steps, values, "-", color=color, linewidth=1.2, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neo.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders (logging.dir) or metrics.jsonl files"
    )
    parser.add_argument("-o", "--output", default="curves.png", help="the PNG to write (default curves.png)")
    parser.add_argument("--title", default=None, help="a title above the panels")
    args = parser.parse_args(argv)
    from neo.cli.common import guarded

    def body() -> int:
        runs = dict(zip(labels(args.runs), (read_run(p) for p in args.runs)))
        print(
            f"neo.plot: wrote {draw(runs, args.output, args.title)} ({len(runs)} run{'s' * (len(runs) > 1)})"
        )
        return 0

    return guarded("neo.plot", body)


if __name__ == "__main__":
    sys.exit(main())
