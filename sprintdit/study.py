"""`sprintdit study`: training runs compared at one budget, evaluated alike, with a table, claims and plots.

A study file (`sprintdit/configs/studies/NAME.yaml`) names a base config and lists runs (overrides on top of it, how the
budget is shared among the stages, optionally a SparseDiT built from another run), one evaluation for every run
(sampler, steps, guidance, number of samples, points along the run) with optional sweeps of sampling settings
at the end, and the claims to check. Each size (`cpu`, `gpu`) is a partial study merged over the top level (its
`overrides` are appended to the study's).

Budgets are training FLOPs (`tflops`, the trainer's analytic count), wall-clock seconds (`seconds`, converted to
steps with step times measured on this machine) or optimizer steps, either given or matched to what an earlier
run of the same seed used (`match`). Every (run, seed) is an ordinary run folder under DIR/runs/RUN/seedK:
re-running the command resumes unfinished runs and skips finished ones; the step counts a run was planned with
are kept in DIR/plan.json, so a resumed study trains exactly what it started. DIR/results.md, results.json and
the plots are rewritten after every run.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import CONFIG_DIR, RunConfig, compose_config, explain, find_config, find_shipped, read_yaml, validate
from .data import build_dataset
from .density import SparseConfig
from .errors import UserError
from .files import atomic_write_text
from .flops import TERA, train_step_flops
from .plots import read_metrics
from .sampling import SampleConfig
from .sampling_run import SamplingRun

STUDY_DIR = CONFIG_DIR / "studies"
BUDGET_KINDS = ("tflops", "seconds", "steps")
CLAIM_KINDS = ("less", "best")
CLAIM_METRICS = ("fid", "train_tflops", "train_seconds", "sample_gflops", "sample_ms")  # lower is better for each
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CALIBRATION_STEPS = (3, 8)  # untimed, then timed steps per stage when converting a seconds budget to steps


@dataclass
class BudgetSpec:
    kind: str = "tflops"  # tflops (training model FLOPs) | seconds (training wall-clock) | steps (optimizer steps)
    value: Optional[float] = None
    match: Optional[str] = None  # instead of value: what this earlier run (same seed) used, in this kind
    scale: float = 1.0  # multiplies the value (e.g. 0.5: half of the matched run's budget)


@dataclass
class SparsifySpec(SparseConfig):
    """A SparseDiT layout (model.sparse's fields and defaults: grid, pool_depth, modules, ...) made from another run."""

    source: str = ""  # the earlier run (same seed) whose final EMA weights become a SparseDiT
    # > 0: fine-tune towards the source run's predictions with this weight (train.distill_from, train.distill_weight)
    distill: float = 0.0


@dataclass
class SweepSpec:
    """A sampling setting evaluated at the end of a run besides the study's evaluation (unset: the evaluation's)."""

    name: str = ""
    guidance: Optional[str] = None
    scale: Optional[float] = None
    interval: Optional[List[float]] = None
    sampler: Optional[str] = None
    steps: Optional[int] = None
    middle_keep: Optional[str] = None  # SPRINT: the middle blocks' keep schedule (sample.middle_keep)
    middle_mask: Optional[str] = None
    middle_interval: Optional[List[float]] = None


@dataclass
class RunSpec:
    name: str = ""
    base: Optional[str] = None  # config of this run (default: the study's base)
    overrides: List[str] = field(default_factory=list)
    split: Optional[List[float]] = None  # share of the budget per stage (default: the base config's step proportions)
    budget: Optional[BudgetSpec] = None  # default: the study's
    sparsify: Optional[SparsifySpec] = None  # fine-tune a SparseDiT made from another run (its model comes from there)
    sweep: List[SweepSpec] = field(default_factory=list)
    curve: bool = True  # evaluate at evaluation.points along the run (otherwise at its end only)


@dataclass
class EvaluationSpec:
    num_samples: int = 1000  # labels cycle through the classes; sample i has seed seed_start + i
    seed_start: int = 0
    sampler: str = "euler"
    steps: int = 16
    guidance: str = "none"
    scale: float = 1.0
    interval: List[float] = field(default_factory=lambda: [0.0, 1.0])
    points: int = 4  # evaluations along each run, evenly spaced in steps, the last at its end
    grid_columns: int = 4  # samples per class in the side-by-side grid of the runs


@dataclass
class ClaimSpec:
    text: str = ""  # the ordering in words
    kind: str = "less"  # less: a < factor * b (lower is better) | best: a is the lowest among `among`
    a: str = ""  # a row: RUN or RUN/SWEEP; a glob matching several rows takes the one best in `select_by`
    b: Optional[str] = None
    among: List[str] = field(default_factory=list)
    metric: str = "fid"
    select_by: Optional[str] = None  # default: metric
    factor: float = 1.0
    inclusive: bool = False  # <= instead of <


@dataclass
class StudySpec:
    description: str = ""
    base: str = ""  # config name or path every run starts from
    seeds: int = 2  # training seeds 0..seeds-1 for every run
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    overrides: List[str] = field(default_factory=list)  # for every run (model.* and objective.* not for sparsify runs)
    run_overrides: Dict[str, List[str]] = field(default_factory=dict)  # per run name, after the run's own
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    runs: List[RunSpec] = field(default_factory=list)
    claims: List[ClaimSpec] = field(default_factory=list)


# ----------------------------------------------------------------------------------- study files


def find_study(name: str) -> Path:
    return find_shipped(name, STUDY_DIR, "study")


def load_study(path: str | Path, size: str) -> StudySpec:
    """The study in `path` with its `sizes.SIZE` section merged over the top level, type-checked and validated."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"study file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"study file {path} must be a mapping of keys (description, base, runs, ...)")
    sizes = raw.pop("sizes", None) or {}
    if not isinstance(sizes, dict) or size not in sizes:
        raise UserError(
            f"study {path.stem} has no size {size!r}; sizes: {', '.join(sizes) if isinstance(sizes, dict) else 'none'}"
        )
    section = dict(sizes[size] or {})
    extra = section.pop("overrides", [])  # a size's overrides come after the study's (other lists replace the study's)
    if not isinstance(extra, list):
        raise UserError(f"study file {path}: sizes.{size}.overrides must be a list of key=value strings")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudySpec), OmegaConf.create(raw), OmegaConf.create(section))
        merged.overrides = list(merged.overrides) + list(extra)
        spec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        if key and not re.search(r"[.\[]", key):  # an error inside a list entry names the key without its path
            err.full_key = locate({**raw, **(sizes[size] or {})}, key) or key
        raise explain(err, f"study file {path}", StudySpec) from None
    validate_study(spec, path.stem)
    return spec


def locate(node, key: str, prefix: str = "") -> str | None:
    """Dotted path (list indices as numbers) of the first mapping entry named `key` in parsed YAML, or None."""
    if isinstance(node, dict):
        if key in node:
            return prefix + key
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return None
    for name, child in items:
        found = locate(child, key, f"{prefix}{name}.")
        if found:
            return found
    return None


def validate_study(spec: StudySpec, name: str) -> None:
    where = f"study {name}"
    if not spec.base or not spec.runs or spec.seeds < 1:
        raise UserError(f"{where} needs a base config, at least one run and seeds >= 1")
    seen: list[str] = []
    for run in spec.runs:
        if not NAME.match(run.name) or run.name in seen:
            raise UserError(f"{where}: run name {run.name!r} is empty, repeated or not made of letters, digits, _ . -")
        for budget in (run.budget or spec.budget,):
            check_budget(budget, f"{where}, run {run.name}", seen)
        if run.sparsify is not None and run.sparsify.source not in seen:
            raise UserError(
                f"{where}, run {run.name}: sparsify.source {run.sparsify.source!r} must name an earlier run"
            )
        if run.sparsify is not None and not 0.0 <= run.sparsify.distill <= 1.0:
            raise UserError(
                f"{where}, run {run.name}: sparsify.distill is {run.sparsify.distill}; give a weight in [0, 1] (0: no "
                f"distillation)"
            )
        if run.split is not None and (
            any(s < 0 for s in run.split) or not math.isclose(sum(run.split), 1.0, abs_tol=1e-6)
        ):
            raise UserError(
                f"{where}, run {run.name}: split {list(run.split)} must be non-negative shares that sum to 1"
            )
        sweeps = [s.name for s in run.sweep]
        if any(not NAME.match(s) for s in sweeps) or len(set(sweeps)) != len(sweeps):
            raise UserError(f"{where}, run {run.name}: sweep names {sweeps} must be unique names")
        seen.append(run.name)
    unknown = set(spec.run_overrides) - set(seen)
    if unknown:
        raise UserError(f"{where}: run_overrides names unknown runs {sorted(unknown)}; runs: {', '.join(seen)}")
    ev = spec.evaluation
    # its checks
    SampleConfig(sampler=ev.sampler, steps=ev.steps, guidance=ev.guidance, scale=ev.scale, interval=list(ev.interval))
    if ev.num_samples < 2 or ev.points < 1 or ev.grid_columns < 1:
        raise UserError(f"{where}: evaluation needs num_samples >= 2, points >= 1 and grid_columns >= 1")
    rows = row_ids(spec)
    for claim in spec.claims:
        if claim.kind not in CLAIM_KINDS:
            raise UserError(
                f"{where}: claim {claim.text!r} has kind {claim.kind!r}; choose one of {', '.join(CLAIM_KINDS)}"
            )
        for metric in (claim.metric, claim.select_by or claim.metric):
            if metric not in CLAIM_METRICS:
                raise UserError(
                    f"{where}: claim {claim.text!r} compares {metric!r}; choose one of {', '.join(CLAIM_METRICS)} "
                    f"(lower is better)"
                )
        selectors = [claim.a] + ([claim.b] if claim.kind == "less" else list(claim.among))
        if claim.kind == "less" and claim.b is None or claim.kind == "best" and not claim.among:
            raise UserError(f"{where}: claim {claim.text!r} needs b (kind less) or among (kind best)")
        for sel in selectors:
            if not fnmatch.filter(rows, sel):
                raise UserError(
                    f"{where}: claim {claim.text!r} names {sel!r}, which matches no row ({', '.join(rows)})"
                )


def check_budget(budget: BudgetSpec, where: str, earlier: list[str]) -> None:
    if budget.kind not in BUDGET_KINDS:
        raise UserError(f"{where}: budget kind {budget.kind!r}; choose one of {', '.join(BUDGET_KINDS)}")
    if (budget.value is None) == (budget.match is None):
        raise UserError(f"{where}: a budget needs exactly one of value and match")
    if budget.match is not None and budget.match not in earlier:
        raise UserError(f"{where}: budget match {budget.match!r} must name an earlier run")
    if (budget.value is not None and budget.value <= 0) or budget.scale <= 0:
        raise UserError(f"{where}: budget value and scale must be positive")


def row_ids(spec: StudySpec) -> list[str]:
    """Result rows: one per run (the study's evaluation) and one per sweep setting, RUN/SWEEP."""
    return [r for run in spec.runs for r in [run.name] + [f"{run.name}/{s.name}" for s in run.sweep]]


# ----------------------------------------------------------------------------------- planning


def stage_steps_for_budget(
    cfg: RunConfig, kind: str, value: float, split: list[float] | None, step_seconds: list[float] | None = None
) -> list[int]:
    """Steps per stage that spend `value` (TFLOP, seconds or steps) on `cfg`'s stages (its model resolved).

    split: the budget's share per stage; None keeps the config's step proportions, scaled to fit the budget."""
    n = len(cfg.stages)
    if split is not None and len(split) != n:
        raise UserError(f"split {list(split)} has {len(split)} shares but the config has {n} stages")
    cost = {
        "tflops": [train_step_flops(cfg, i) / TERA for i in range(n)],
        "seconds": step_seconds,
        "steps": [1.0] * n,
    }[kind]
    if split is None:  # scale the recipe: steps_i = k * base_i with sum_i steps_i cost_i = value
        k = value / sum(s.steps * c for s, c in zip(cfg.stages, cost))
        return [max(1, round(k * s.steps)) for s in cfg.stages]
    return [max(1, round(share * value / c)) for share, c in zip(split, cost)]


def with_steps(cfg: RunConfig, steps: list[int]) -> RunConfig:
    """`cfg` with these stage lengths; each warm-up keeps its share of its stage (a 30-step warm-up of a 180-step
    fine-tune stays a sixth of it, rather than most of a 40-step one)."""
    stages = [
        replace(s, steps=n, warmup_steps=min(n, round(s.warmup_steps * n / s.steps))) for s, n in zip(cfg.stages, steps)
    ]
    return replace(cfg, stages=stages)


def eval_every(total: int, points: int) -> int:
    """The eval.every that evaluates a run of `total` steps at most `points` times, evenly, the last at its end
    (the trainer evaluates at multiples of eval.every and at the last step)."""
    return -(-total // points)


def measure_step_seconds(cfg: RunConfig) -> list[float]:
    """Median wall-clock of one training step in each stage of `cfg` on this machine (a scratch run per stage)."""
    from .training import Trainer

    warmup, timed = CALIBRATION_STEPS
    out = []
    for stage in cfg.stages:
        probe = replace(
            cfg,
            stages=[replace(stage, steps=warmup + timed)],
            train=replace(cfg.train, log_every=1, ckpt_every=10**9, sample_every=0, init_from=None),
            eval=replace(cfg.eval, every=0),
        )
        with tempfile.TemporaryDirectory() as scratch:
            Trainer(probe, Path(scratch) / "probe", progress=False).fit()
            seconds = [r["train_seconds"] for r in read_metrics(Path(scratch) / "probe") if "loss" in r]
        out.append(statistics.median(b - a for a, b in zip(seconds[warmup - 1 :], seconds[warmup:])))
    return out


# ----------------------------------------------------------------------------------- records


def row_values(scores: dict, record: dict, sample_gflops: float) -> dict:
    """The numbers a result row shows for one seed."""
    metrics = {k.split("/", 1)[1]: v for k, v in scores.items() if "/" in k}
    return {
        "fid": metrics.get("fid"),
        "class_agreement": metrics.get("class_agreement"),
        "precision": metrics.get("precision"),
        "recall": metrics.get("recall"),
        "train_tflops": record["train_flops"] / TERA,
        "train_seconds": record["train_seconds"],
        "steps": record["step"],
        "sample_gflops": sample_gflops,
        "sample_ms": 1000 * scores["sample_seconds"] / scores["eval_samples"],
        "provenance": scores.get("provenance"),  # how the row's scores were made (sprintdit.evaluate)
    }


# ----------------------------------------------------------------------------------- running


@dataclass
class Study:
    spec: StudySpec
    name: str
    size: str
    out: Path
    progress: bool = True
    log: Callable[[str], None] = print

    @property
    def plan_path(self) -> Path:
        return self.out / "plan.json"

    def run_dir(self, run: str, seed: int) -> Path:
        return self.out / "runs" / run / f"seed{seed}"

    def load_plan(self) -> dict:
        return json.loads(self.plan_path.read_text()) if self.plan_path.is_file() else {}

    def check_folder(self) -> None:
        """A study folder holds one study: the same file (seeds aside) on every re-run."""
        saved = self.out / "study.yaml"
        text = OmegaConf.to_yaml(OmegaConf.structured(replace(self.spec, seeds=0)))
        if saved.is_file() and saved.read_text() != text:
            raise UserError(f"{self.out} holds another study (or this one changed since it started); use a new --out")
        atomic_write_text(saved, text)

    def base_config(self, run: RunSpec, seed: int) -> RunConfig:
        """The run's config before its stage lengths are set: base and the study's overrides (as written), then the
        seed, the evaluation settings and a sparsify run's source and teacher, set on the typed config."""
        ev = self.spec.evaluation
        shared = [o for o in self.spec.overrides if run.sparsify is None or not o.startswith(("model.", "objective."))]
        try:
            cfg = compose_config(
                find_config(run.base or self.spec.base),
                shared + list(run.overrides) + list(self.spec.run_overrides.get(run.name, [])),
            )
            train = {"seed": seed, "sample_every": 0}
            if run.sparsify is not None:
                train["init_from"] = str(self.sparsify_source(run, seed))
                if run.sparsify.distill > 0:
                    train.update(
                        distill_from=str(self.run_dir(run.sparsify.source, seed)), distill_weight=run.sparsify.distill
                    )
            cfg = replace(
                cfg,
                train=replace(cfg.train, **train),
                eval=replace(cfg.eval, num_samples=ev.num_samples, seed_start=ev.seed_start),
                sample=replace(
                    cfg.sample,
                    sampler=ev.sampler,
                    steps=ev.steps,
                    guidance=ev.guidance,
                    scale=ev.scale,
                    interval=list(ev.interval),
                ),
            )
            validate(cfg)
            return cfg
        except UserError as err:
            raise UserError(f"study {self.name}, run {run.name}: {err}") from None

    def sparsify_source(self, run: RunSpec, seed: int) -> Path:
        """The SparseDiT init folder of a sparsify run, written from its source run's final EMA on first use."""
        from .sparsify import sparsify

        folder = self.run_dir(run.name, seed).parent / f"seed{seed}.init"
        if not folder.is_dir():
            sp = run.sparsify
            layout = SparseConfig(**{f.name: getattr(sp, f.name) for f in fields(SparseConfig)})
            sparsify(self.run_dir(sp.source, seed), folder, layout)
        return folder

    def measured(self, run: str, seed: int, kind: str) -> float:
        record = self.final_record(self.run_dir(run, seed))
        return {"tflops": record["train_flops"] / TERA, "seconds": record["train_seconds"], "steps": record["step"]}[
            kind
        ]

    @staticmethod
    def final_record(run_dir: Path) -> dict:
        evals = [r for r in read_metrics(run_dir) if "eval_samples" in r]
        if not evals:
            raise UserError(f"{run_dir} has no evaluation yet; run the study again to finish it")
        return evals[-1]

    def plan(self, run: RunSpec, seed: int) -> RunConfig:
        """The run's full config; its stage lengths are computed once and then read from plan.json."""
        from .training import resolve_run

        cfg = self.base_config(run, seed)
        key = f"{run.name}/seed{seed}"
        plans = self.load_plan()
        if key not in plans:
            budget = run.budget or self.spec.budget
            value = budget.scale * (
                budget.value if budget.match is None else self.measured(budget.match, seed, budget.kind)
            )
            resolved = resolve_run(cfg, build_dataset(cfg.data))
            step_seconds = measure_step_seconds(resolved) if budget.kind == "seconds" else None
            steps = stage_steps_for_budget(resolved, budget.kind, value, run.split, step_seconds)
            plans[key] = {"steps": steps, "budget": {"kind": budget.kind, "value": value}, "step_seconds": step_seconds}
            atomic_write_text(self.plan_path, json.dumps(plans, indent=2) + "\n")
        steps = plans[key]["steps"]
        points = self.spec.evaluation.points if run.curve else 1
        cfg = with_steps(cfg, steps)
        return replace(cfg, eval=replace(cfg.eval, every=eval_every(sum(steps), points)))

    def done_path(self, run: str, seed: int) -> Path:
        return self.run_dir(run, seed) / "study_result.json"

    def run_one(self, run: RunSpec, seed: int, index: str) -> dict:
        """Train (or resume) one (run, seed), then evaluate its sweeps and the grid; returns its result record."""
        from .training import Trainer

        done = self.done_path(run.name, seed)
        if done.is_file():
            result = json.loads(done.read_text())
            if (
                result["run"] != run.name or result["seed"] != seed
            ):  # its rows and grid are keyed by the run it was written for
                raise UserError(
                    f"{done} was written for run {result['run']} seed {result['seed']}, not {run.name} seed {seed} "
                    f"(a copied run folder?); delete that file to evaluate the folder as {run.name} (its config must "
                    f"be the one the study gives {run.name})"
                )
            self.log(f"{index} {run.name} seed {seed}: finished earlier, skipped")
            return result
        tic = time.perf_counter()
        cfg = self.plan(run, seed)
        self.log(f"{index} {run.name} seed {seed}: {' + '.join(f'{s.steps} {s.name}' for s in cfg.stages)} steps")
        trainer = Trainer(cfg, self.run_dir(run.name, seed), progress=self.progress)
        trainer.fit()
        final = self.final_record(trainer.run_dir)
        sampler = trainer.sampling_run()  # the final EMA, with the evaluator the run built
        rows = {run.name: row_values(final, final, sampler.sampling_gflops())}
        for sweep in run.sweep:
            scfg = sampler.sample_config(**{k: v for k, v in asdict(sweep).items() if k != "name"})
            scores = self.sweep_scores(sampler, trainer.run_dir, scfg, sweep.name)
            rows[f"{run.name}/{sweep.name}"] = row_values(scores, final, sampler.sampling_gflops(scfg))
        grid = self.sample_grid(sampler, trainer.run_dir)
        result = {
            "run": run.name,
            "seed": seed,
            "rows": rows,
            "grid": grid,
            "overrides": self.describe(run),
            "wall_seconds": time.perf_counter() - tic,
        }
        atomic_write_text(done, json.dumps(result, indent=2) + "\n")
        self.log(
            f"{index} {run.name} seed {seed}: FID {rows[run.name]['fid']:.2f} after {final['train_flops'] / TERA:.1f} "
            f"TFLOP, "
            f"{final['train_seconds']:.0f} s of training ({result['wall_seconds']:.0f} s with evaluation)"
        )
        return result

    def sweep_scores(self, sampler: SamplingRun, run_dir: Path, scfg: SampleConfig, name: str) -> dict:
        """Scores of the final EMA with other sampling settings, cached in the run folder."""
        from .evaluate import flatten

        path = run_dir / "sweep" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        scored = sampler.score(scfg=scfg)
        scores = {
            **flatten(scored.results),
            "sample_seconds": scored.sample_seconds,
            "eval_samples": len(scored.labels),
            "provenance": scored.results["provenance"],
        }
        atomic_write_text(path, json.dumps(scores, indent=2) + "\n")
        return scores

    def sample_grid(self, sampler: SamplingRun, run_dir: Path) -> str:
        """grid_columns samples per class from the final EMA (the evaluation's settings and first seeds), as a PNG."""
        from .images import save_grid

        classes, columns = sampler.config.model.num_classes, self.spec.evaluation.grid_columns
        labels = [c for c in range(classes) for _ in range(columns)]
        seeds = [self.spec.evaluation.seed_start + i for i in range(len(labels))]
        images, _ = sampler.generate(labels, seeds)
        path = save_grid(images, run_dir / "study_grid.png", columns=columns)
        return str(path.relative_to(self.out))

    def describe(self, run: RunSpec) -> str:
        parts = list(run.overrides) + list(self.spec.run_overrides.get(run.name, []))
        if run.base:
            parts.insert(0, f"base {run.base}")
        if run.sparsify is not None:
            sp = run.sparsify
            parts.insert(
                0,
                f"SparseDiT of {sp.source}: grid {sp.grid}, layout "
                f"{sp.pool_depth}+{sp.modules}x(1+{sp.sparse_depth}+1+{sp.dense_depth}), recover {sp.recover}"
                + (f", distilled from it (weight {sp.distill:g})" if sp.distill else ""),
            )
        budget = run.budget or self.spec.budget
        parts.append(
            f"budget {'matched to ' + budget.match + ' ' if budget.match else ''}{budget.kind}"
            + (f" x{budget.scale:g}" if budget.scale != 1 else "")
            + (f", split {list(run.split)}" if run.split else "")
        )
        return "; ".join(parts)

    def run(self, seeds: int | None = None) -> dict:
        """Every (seed, run) in order, then the report; returns the results."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_folder()
        n = seeds or self.spec.seeds
        total = n * len(self.spec.runs)
        for seed in range(n):
            for i, run in enumerate(self.spec.runs):
                self.run_one(run, seed, f"[{seed * len(self.spec.runs) + i + 1}/{total}]")
                self.report(n)
        return self.report(n)

    def results(self, seeds: int) -> list[dict]:
        return [
            json.loads(self.done_path(run.name, s).read_text())
            for s in range(seeds)
            for run in self.spec.runs
            if self.done_path(run.name, s).is_file()
        ]

    def report(self, seeds: int) -> dict:
        from .report import write_report

        return write_report(self, self.results(seeds), seeds, row_ids(self.spec), machine())


def machine() -> str:
    """The device in words: GPU name, or the CPU with its core count; and the torch version."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return f"{device}; torch {torch.__version__}"


def run_study(
    name: str,
    size: str = "cpu",
    out: str | Path | None = None,
    seeds: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run (or resume) the study `name` (a file or a shipped study) at `size` into `out` (default
    runs/studies/NAME-SIZE)."""
    path = find_study(name)
    spec = load_study(path, size)
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    folder = Path(out) if out is not None else Path("runs") / "studies" / f"{path.stem}-{size}"
    return Study(spec, path.stem, size, folder, progress, log).run(seeds)
