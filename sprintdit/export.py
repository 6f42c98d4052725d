"""`sprintdit export`: a checkpoint's weights as a Hugging Face Hub-style folder, or as a diffusers model folder.

    sprintdit export --checkpoint RUN --out DIR                     # config.json, model.safetensors, README.md
    sprintdit export --checkpoint RUN --out DIR --format diffusers  # config.json, diffusion_pytorch_model.safetensors

The Hub-style folder follows huggingface_hub's conventions (weights in model.safetensors, a config.json, a model
card README.md with YAML metadata), so it can be uploaded as it is; `Pipeline.from_pretrained(DIR)`, `sample` and
`evaluate` load it (the safetensors metadata carries the run config, as in every sprintdit checkpoint). The model
card states the architecture, the training recipe and every evaluation stored beside the checkpoint
(eval_*.json). The diffusers folder loads with DiTTransformer2DModel.from_pretrained (dense DiT-style models only,
see convert.export_diffusers); nothing is uploaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from . import __version__
from .checkpoint import FILES, load_weights, resolve_weights, write_error
from .config import RunConfig, to_yaml
from .convert import DIFFUSERS_WEIGHTS, export_diffusers
from .errors import UserError
from .files import atomic_folder, check_new_folder, synced

FORMATS = ("sprintdit", "diffusers")


def evaluation_lines(evals: dict[str, dict]) -> list[str]:
    """The model card's evaluation section: one line per stored eval_*.json."""
    if not evals:
        return [
            "No evaluation was stored with this checkpoint (run `sprintdit evaluate --checkpoint ...` before "
            "exporting)."
        ]
    lines = []
    for name, result in evals.items():
        setting = (result.get("provenance") or result).get("setting", {}).get("sample", {})  # older files: top level
        lines.append(
            f"- `{name}` ({result.get('num_samples', '?')} samples, {setting.get('guidance', '?')} scale "
            f"{setting.get('scale', '?')}, "
            f"{setting.get('sampler', '?')} {setting.get('steps', '?')} steps): "
            + "; ".join(
                f"{net}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(vals.items()) if isinstance(v, (int, float)))
                for net, vals in result.get("metrics", {}).items()
            )
        )
    return lines


def model_card(run: RunConfig, evals: dict[str, dict], source: Path) -> str:
    """README.md of an exported folder: the architecture, the training recipe, the stored evaluations, how to use it."""
    m, t = run.model, run.train
    sp = m.sprint
    split = (
        f"; SPRINT split {sp.encoder_depth}/{m.middle_depth}/{sp.decoder_depth} blocks, fusion {sp.fusion}, path-drop "
        f"{sp.path_drop_prob:g}"
        if sp.fusion != "none"
        else ""
    )
    stages = "\n".join(
        f"| {s.name} | {s.steps} | {s.mask_ratio:g} ({s.mask_type}) | {s.lr:g} | {s.batch_size or t.batch_size} |"
        for s in run.stages
    )
    lines = [
        "---",
        "library_name: sprintdit",
        "tags: [diffusion, diffusion-transformer, class-conditional, sprintdit]",
        "---",
        "",
        f"# {m.preset or 'sprintdit model'} ({m.arch})",
        "",
        f"Exported by sprintdit {__version__} from `{source}`.",
        "",
        "## Architecture",
        "",
        f"{m.arch} with {m.depth} blocks, width {m.hidden_size}, {m.num_heads} heads, patch {m.patch_size} on a "
        f"{'x'.join(map(str, [m.in_channels, *m.input_size]))} "
        f"input ({'x'.join(map(str, m.grid))} tokens), {m.num_classes} classes, {m.pos_embed} positions, qk-norm "
        f"{m.qk_norm}{split}. Objective: "
        f"{run.objective.kind}; parameters: see model.safetensors.",
        "",
        "## Training recipe",
        "",
        f"Data: {run.data.name} at {run.data.resolution} px; global batch {t.batch_size}, {t.precision}, AdamW (betas "
        f"{list(t.optim.betas)}, "
        f"weight decay {t.optim.weight_decay:g}, clip {t.optim.grad_clip:g}), EMA decay {t.ema_decay:g}, seed "
        f"{t.seed}.",
        "",
        "| stage | steps | mask ratio | lr | batch |",
        "|---|---|---|---|---|",
        stages,
        "",
        "## Evaluation",
        "",
    ]
    lines += evaluation_lines(evals)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import sprintdit",
        "",
        'pipe = sprintdit.Pipeline.from_pretrained("THIS_FOLDER", device="cuda")',
        f"images = pipe(labels=[0, 1], seeds=[0, 1], guidance={run.sample.guidance!r}, scale={run.sample.scale:g})",
        "```",
        "",
    ]
    return "\n".join(lines)


def export(checkpoint: str | Path, out: str | Path, fmt: str = "sprintdit", use_ema: bool = True) -> Path:
    """Write the export folder `out` (it must not exist) from a run folder, checkpoint folder or .safetensors file."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = check_new_folder(out, "--out")
    path = resolve_weights(checkpoint, use_ema)
    weights, run = load_weights(path)
    files: dict[str, object] = {}
    if fmt == "diffusers":
        tensors, config = export_diffusers(weights, run.model)
        files[DIFFUSERS_WEIGHTS] = (tensors, None)
        files["config.json"] = json.dumps({**config, "_sprintdit_version": __version__}, indent=2)
    else:
        evals = {p.name: json.loads(p.read_text()) for p in sorted(path.parent.glob("eval_*.json"))}
        files[FILES[0]] = (
            {k: v.contiguous() for k, v in weights.items()},
            {"config": to_yaml(run), "step": "0", "format": "sprintdit"},
        )
        files["config.json"] = json.dumps(
            {
                "library_name": "sprintdit",
                "sprintdit_version": __version__,
                "weights": "ema" if use_ema else "raw",
                "run": asdict(run),
            },
            indent=2,
        )
        files["README.md"] = model_card(run, evals, path)
    try:
        with atomic_folder(out) as tmp:
            for name, content in files.items():
                if isinstance(content, tuple):
                    synced(tmp / name, lambda p, c=content: save_file(c[0], str(p), metadata=c[1]))
                else:
                    synced(tmp / name, lambda p, c=content: p.write_text(c))
    except OSError as err:
        raise write_error(
            err, out.name, out.parent, sum(t.numel() * t.element_size() for t in weights.values())
        ) from None
    return out
