"""Charts of runs (matplotlib, PNG): loss and FID against steps, training TFLOP and wall-clock; sample grids side
by side; FID against sampling cost. `sprintdit plot` and the study report draw with these."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .files import read_jsonl  # noqa: E402

TERA = 1e12
AXES = {  # x axis name -> (record key, scale, label)
    "step": ("step", 1.0, "optimizer step"),
    "tflops": ("train_flops", 1 / TERA, "training model TFLOP"),
    "seconds": ("train_seconds", 1.0, "training wall-clock (s)"),
}
LINESTYLES = ("-", "--", ":", "-.")
DPI = 110


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (an empty list when it has none)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def fid_key(records: list[dict]) -> str | None:
    """The record key of the Frechet distance the run logged (e.g. fmnist/fid), or None."""
    keys = sorted({k for r in records for k in r if k.endswith("/fid")})
    return keys[0] if keys else None


def points(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    key, scale, _ = AXES[x]
    rows = [r for r in records if y in r and key in r and r[y] is not None]
    return [r[key] * scale for r in rows], [r[y] for r in rows]


def draw_series(ax, series: list[tuple[str, int, list[dict]]], x: str, y: str | None) -> bool:
    """series: (label, style index, records); one colour per label, one line style per style index. y None: the FID."""
    colours: dict[str, str] = {}
    drawn = False
    for label, style, records in series:
        key = y or fid_key(records)
        xs, ys = points(records, x, key) if key else ([], [])
        if not xs:
            continue
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        ax.plot(
            xs,
            ys,
            LINESTYLES[style % len(LINESTYLES)],
            color=colour,
            marker="o" if y is None else None,
            markersize=3,
            label=label if first else None,
        )
        drawn = True
    ax.set_xlabel(AXES[x][2])
    ax.grid(alpha=0.3)
    return drawn


def curve_chart(
    series: list[tuple[str, int, list[dict]]],
    x: str,
    path: str | Path,
    title: str,
    y: str | None = None,
    ylabel: str = "FID",
) -> Path:
    """One chart of y (default the FID) against `x` for every series; line style tells seeds apart."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if draw_series(ax, series, x, y):
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def runs_chart(run_dirs: list[Path], path: str | Path) -> Path:
    """`sprintdit plot`: loss against step, and the FID against step, training TFLOP and seconds, for every run."""
    series = [(Path(d).name, 0, read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    draw_series(axes[0, 0], series, "step", "loss")
    axes[0, 0].set_ylabel("training loss")
    axes[0, 0].set_yscale("log")
    for ax, x in zip(axes.flat[1:], ("step", "tflops", "seconds")):
        draw_series(ax, series, x, None)
        ax.set_ylabel("FID")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def grids_chart(grids: list[tuple[str, Path]], path: str | Path) -> Path:
    """Sample grids (PNG files of the same seeds and labels) side by side, titled."""
    from PIL import Image

    images = [(title, Image.open(p)) for title, p in grids]
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 5.2), squeeze=False)
    for ax, (title, img) in zip(axes[0], images):
        ax.imshow(img, cmap="gray" if img.mode == "L" else None, vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return save(fig, path)


def tradeoff_chart(
    series: dict[str, tuple[list[tuple[float, float, float, float, str]], bool]],
    path: str | Path,
    xlabels: tuple[str, str],
) -> Path:
    """FID against sampling cost, two panels: series name -> ([(GFLOP per image, ms per image, FID, FID's half-range
    over the seeds (drawn as an error bar), point label)], whether its points are one model's settings and so joined
    by a line)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, (pts, joined)) in enumerate(series.items()):
        pts = sorted(pts)
        for ax, column in zip(axes, (0, 1)):
            ax.errorbar(
                [p[column] for p in pts],
                [p[2] for p in pts],
                yerr=[p[3] for p in pts],
                fmt="o-" if joined else "o",
                color=f"C{i % 10}",
                label=name,
                markersize=4,
                capsize=2,
                elinewidth=0.8,
            )
            for p in pts:
                ax.annotate(p[4], (p[column], p[2]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    for ax, label in zip(axes, xlabels):
        ax.set_xlabel(label)
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def bars_chart(bars: list[tuple[str, list[float]]], path: str | Path, title: str, ylabel: str = "final FID") -> Path:
    """One bar per run at the mean of its seeds' values, each seed's value as a dot and the range as an error bar:
    the chart to read when runs are compared at their final evaluation only."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(bars) + 1.5), 4.2))
    for i, (label, values) in enumerate(bars):
        mean = sum(values) / len(values)
        ax.bar(i, mean, color=f"C{i % 10}", alpha=0.6, yerr=[[mean - min(values)], [max(values) - mean]], capsize=3)
        ax.plot([i] * len(values), values, "k.", markersize=5)
        ax.annotate(
            f"{mean:.1f}", (i, mean), ha="right", fontsize=7, xytext=(-4, 2), textcoords="offset points"
        )  # clear of the error bar
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save(fig, path)


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
