"""A study's report: rows aggregated over seeds, the claims judged, results.md / results.json and the plots."""

from __future__ import annotations

import fnmatch
import json
import statistics
from dataclasses import asdict
from datetime import date
from pathlib import Path

from . import plots
from .files import atomic_write_text

NUMBERS = (
    "fid",
    "class_agreement",
    "precision",
    "recall",
    "train_tflops",
    "train_seconds",
    "steps",
    "sample_gflops",
    "sample_ms",
)
COLUMNS = (  # (key, header, format)
    ("steps", "steps", "{:.0f}"),
    ("train_tflops", "train TFLOP", "{:.1f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("fid", "FID", "{:.2f}"),
    ("class_agreement", "class agr.", "{:.3f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("sample_gflops", "sample GFLOP/img", "{:.3f}"),
    ("sample_ms", "sample ms/img", "{:.2f}"),
)


def aggregate(results: list[dict], order: list[str]) -> dict[str, dict]:
    """row id -> {"seeds": [...], "values": {key: [per seed]}, "mean": {...}, "spread": {...}} (spread: half the
    range)."""
    rows: dict[str, dict] = {}
    for result in results:
        for row_id, values in result["rows"].items():
            row = rows.setdefault(
                row_id, {"seeds": [], "values": {k: [] for k in NUMBERS}, "overrides": result["overrides"]}
            )
            row["seeds"].append(result["seed"])
            for k in NUMBERS:
                row["values"][k].append(values.get(k))
    for row in rows.values():
        known = {k: [v for v in vs if v is not None] for k, vs in row["values"].items()}
        row["mean"] = {k: statistics.fmean(vs) if vs else None for k, vs in known.items()}
        row["spread"] = {k: (max(vs) - min(vs)) / 2 if vs else None for k, vs in known.items()}
    return {r: rows[r] for r in order if r in rows}


def select(rows: dict[str, dict], selector: str, by: str) -> str | None:
    """The row matching the glob that is best (lowest mean) in `by`; None when no matching row has it."""
    candidates = [r for r in fnmatch.filter(list(rows), selector) if rows[r]["mean"][by] is not None]
    return min(candidates, key=lambda r: rows[r]["mean"][by]) if candidates else None


def shown(rows: dict, row: str, metric: str) -> str:
    mean, spread, n = rows[row]["mean"][metric], rows[row]["spread"][metric], len(rows[row]["seeds"])
    return f"{row} {mean:.3g}" + (f" ± {spread:.2g}" if n > 1 and spread else "") + f" ({n} seed{'s' if n > 1 else ''})"


def judge(claim, rows: dict[str, dict]) -> tuple[str, str]:
    """(verdict, evidence) of a claim: 'holds' (beyond the seed spread), 'holds on the mean' (within the spread),
    'tied' (best-of claims within the spread of the best), 'does not hold', or 'not measured yet'."""
    by = claim.select_by or claim.metric
    a = select(rows, claim.a, by)
    others = [select(rows, sel, by) for sel in ([claim.b] if claim.kind == "less" else claim.among)]
    if a is None or None in others or any(rows[r]["mean"][claim.metric] is None for r in [a, *others]):
        return "not measured yet", ""
    av = [v for v in rows[a]["values"][claim.metric] if v is not None]
    if claim.kind == "less":
        b = others[0]
        bv = [v for v in rows[b]["values"][claim.metric] if v is not None]
        ok = (lambda x, y: x <= y) if claim.inclusive else (lambda x, y: x < y)
        bound = (
            f"{'<=' if claim.inclusive else '<'} {claim.factor:g} x "
            if claim.factor != 1
            else ("<= " if claim.inclusive else "< ")
        )
        evidence = f"{claim.metric}: {shown(rows, a, claim.metric)} {bound}{shown(rows, b, claim.metric)}"
        if ok(max(av), claim.factor * min(bv)) and (len(av) > 1 or len(bv) > 1 or by != claim.metric):
            return "holds", evidence
        if ok(statistics.fmean(av), claim.factor * statistics.fmean(bv)):
            return ("holds on the mean" if max(av) != min(av) or max(bv) != min(bv) else "holds"), evidence
        return "does not hold", evidence
    field = list(dict.fromkeys(others + [a]))
    values = {r: [v for v in rows[r]["values"][claim.metric] if v is not None] for r in field}
    best = min(field, key=lambda r: statistics.fmean(values[r]))
    evidence = f"{claim.metric}: " + ", ".join(shown(rows, r, claim.metric) for r in field)
    if best == a:
        beyond = all(max(av) < min(values[r]) for r in field if r != a)
        return ("holds" if beyond else "holds on the mean"), evidence
    if min(av) <= max(values[best]):  # a's seed range reaches into the best one's
        return "tied", evidence
    return "does not hold", evidence


def cell(row: dict, key: str, fmt: str) -> str:
    mean, spread = row["mean"][key], row["spread"][key]
    if mean is None:
        return "-"
    text = fmt.format(mean)
    return text + (
        " ± " + fmt.format(spread) if len(row["seeds"]) > 1 and spread and key not in ("sample_gflops",) else ""
    )


def sweep_of(spec, row_id: str):
    """The SweepSpec behind a RUN/SWEEP row."""
    run, name = row_id.split("/", 1)
    return next(s for r in spec.runs if r.name == run for s in r.sweep if s.name == name)


def describe_sweep(sweep) -> str:
    return "sampling " + ", ".join(f"{k} {v}" for k, v in asdict(sweep).items() if k != "name" and v is not None)


def markdown(
    study, rows: dict[str, dict], claims: list[tuple], seeds: int, charts: list[Path], wall: float, device: str
) -> str:
    spec, ev = study.spec, study.spec.evaluation
    lines = [
        f"# Study `{study.name}`, size `{study.size}`",
        "",
        spec.description.strip(),
        "",
        f"- command: `sprintdit study {study.name} --size {study.size} --seeds {seeds}`",
        f"- device: {device}; date: {date.today().isoformat()}; wall-clock of the finished runs (training and "
        f"evaluation): {wall / 60:.1f} min",
        f"- evaluation: {ev.num_samples} samples per row (labels cycling through the classes, seeds "
        f"{ev.seed_start}..{ev.seed_start + ev.num_samples - 1}), "
        f"{ev.sampler} {ev.steps} steps, guidance {ev.guidance}"
        + (f" scale {ev.scale:g}" if ev.guidance != "none" else "")
        + ", EMA weights; FID, class agreement, precision and recall from the run's feature network against its "
        "reference",
        "- values: mean ± half the range over the seeds (per-seed values in results.json)",
        "",
        "| row | what differs | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row_id, row in rows.items():
        what = row["overrides"] if "/" not in row_id else describe_sweep(sweep_of(spec, row_id))
        lines.append(f"| {row_id} | {what} | " + " | ".join(cell(row, k, f) for k, _, f in COLUMNS) + " |")
    if claims:
        lines += ["", "## Claims", ""]
        lines += [f"- **{verdict}**: {claim.text}. {evidence}" for claim, verdict, evidence in claims]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in charts]
    return "\n".join(lines) + "\n"


def write_report(study, results: list[dict], seeds: int, row_names: list[str], machine: str) -> dict:
    """results.md, results.json and the plots in the study folder, from the finished (run, seed) results; `row_names`
    in table order, `machine` describing where they ran."""
    out, spec = study.out, study.spec
    rows = aggregate(results, row_names)
    claims = [(c, *judge(c, rows)) for c in spec.claims]
    charts = report_charts(study, results, rows, seeds)
    wall = sum(r["wall_seconds"] for r in results)
    atomic_write_text(out / "results.md", markdown(study, rows, claims, seeds, charts, wall, machine))
    data = {
        "study": study.name,
        "size": study.size,
        "folder": str(out),
        "seeds": seeds,
        "rows": rows,
        "wall_seconds": wall,
        "claims": [{**asdict(c), "verdict": v, "evidence": e} for c, v, e in claims],
        "runs": results,
    }
    atomic_write_text(out / "results.json", json.dumps(data, indent=2) + "\n")
    return data


def report_charts(study, results: list[dict], rows: dict, seeds: int) -> list[Path]:
    """The study's charts: FID against training TFLOP and seconds, the final FID per run, the sample grids side by
    side and, with sweeps or SparseDiT runs, FID against sampling cost."""
    out, spec = study.out, study.spec
    charts = []
    series = [(r.name, s, plots.read_metrics(study.run_dir(r.name, s))) for s in range(seeds) for r in spec.runs]
    if any(records for _, _, records in series):
        for axis, what in (("tflops", "training compute"), ("seconds", "training wall-clock")):
            title = f"{study.name}: FID against {what} (line style: seed)"
            charts.append(plots.curve_chart(series, axis, out / f"fid_vs_{axis}.png", title))
    bars = [(row_id, [v for v in row["values"]["fid"] if v is not None]) for row_id, row in rows.items()]
    bars = [(row_id, values) for row_id, values in bars if values and "/" not in row_id]
    if bars:
        charts.append(plots.bars_chart(bars, out / "fid_final.png", f"{study.name}: final FID per run (dots: seeds)"))
    grids = [(r["run"], out / r["grid"]) for r in results if r["seed"] == 0]
    for run, path in grids:
        if not path.is_file():  # a run folder copied, renamed or cleaned by hand: the report is still written
            study.log(f"note: {run}'s sample grid {path} is missing; samples.png leaves it out")
    grids = [(run, path) for run, path in grids if path.is_file()]
    if grids:
        charts.append(plots.grids_chart(grids, out / "samples.png"))
    if any(run.sweep or run.sparsify for run in spec.runs):
        axes = ("sampling GFLOP per image", "sampling ms per image (this machine)")
        charts.append(plots.tradeoff_chart(tradeoff_series(spec, rows), out / "fid_vs_sampling.png", axes))
    return charts


def tradeoff_series(spec, rows: dict) -> dict[str, tuple]:
    """FID against sampling cost: one series per run and guidance of the sweeps, one of the runs themselves."""
    tradeoff: dict[str, tuple] = {}
    for row_id, row in rows.items():
        if "/" in row_id:  # a sweep: one series per run and guidance
            sweep = sweep_of(spec, row_id)
            name = f"{row_id.split('/')[0]}: {sweep.guidance or spec.evaluation.guidance}"
            label = row_id.split("/", 1)[1]
        else:
            name, label = "runs (the study's evaluation)", row_id
        mean = row["mean"]
        point = (mean["sample_gflops"], mean["sample_ms"], mean["fid"], row["spread"]["fid"] or 0.0, label)
        tradeoff.setdefault(name, ([], "/" in row_id))[0].append(point)
    return tradeoff
