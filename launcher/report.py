"""`mtl report EXP`: one page a person can open, written into the experiment's own folder.

`<experiment>/report/report.md` holds the run's settings, its versions (step, own validation
scores, tags), every evaluation table on record (each version and split, the untrained model,
the trivial baselines) and the single-task comparison when `mtl baselines` made one;
`<experiment>/report/curves.png` draws, per task, the training loss, the validation primary
metric, the loss weight and the sampling rate over steps (read from the run's TensorBoard
events, so any run, finished or not, has its curves).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from trainer.errors import UserError
from trainer.versions import Storage

PANELS = (("loss", "training loss"), ("validation", "validation primary metric"),
          ("weight", "loss weight"), ("rate", "sampling rate"))


def curves(tb_dir: Path) -> dict[str, dict[str, dict[int, float]]]:
    """{panel: {task: {step: value}}} from the event files of one experiment (all its runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[str, dict[int, float]]] = {p: {} for p, _ in PANELS}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            parts = tag.split("/")
            if parts[0] in ("loss", "weight", "rate") and len(parts) == 2:
                panel, task = parts
            elif parts[0] == "validation" and len(parts) == 3:
                panel, task = "validation", f"{parts[1]} {parts[2]}"
            else:
                continue
            out[panel].setdefault(task, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def primary_tags(storage: Storage, name: str) -> dict[str, str]:
    """task -> its primary metric, as the latest version's evaluation recorded it."""
    state = storage.read_json(f"{name}/registry.json") or {}
    return {t: b["metric"] for t, b in state.get("best", {}).items() if "metric" in b}


def draw(data: dict, primary: dict[str, str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (panel, title) in zip(axes.flat, PANELS):
        for task, points in sorted(data[panel].items()):
            if panel == "validation" and primary and task.split(" ")[1] != primary.get(task.split(" ")[0]):
                continue  # one line per task: its primary metric
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o" if len(steps) < 30 else None, markersize=3,
                    label=task)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def eval_tables(storage: Storage, name: str) -> list[str]:
    """Markdown tables: per split, every evaluated version (and the untrained model) side by side."""
    versions = storage.list_dirs(f"{name}/evals")
    splits: dict[str, dict[str, dict]] = {}
    for version in versions:
        if version == "baselines":
            continue
        for split in ("validation", "test"):
            results = storage.read_json(f"{name}/evals/{version}/{split}.json")
            if results:
                splits.setdefault(split, {})[version] = results
    lines = []
    for split, by_version in splits.items():
        order = sorted(by_version, key=lambda v: (v != "untrained", v))
        base = storage.read_json(f"{name}/evals/baselines/{split}.json") or {}
        lines += [f"### {split} split", "", "| task | metric | " + " | ".join(order) + " | baseline |",
                  "|---|---|" + "---|" * (len(order) + 1)]
        tasks = dict.fromkeys(t for v in order for t in by_version[v])
        for task in tasks:
            metrics = dict.fromkeys(m for v in order for m in by_version[v].get(task, {}).get("metrics", {}))
            for metric in metrics:
                cells = [by_version[v].get(task, {}).get("metrics", {}).get(metric) for v in order]
                b = base.get(task, {}).get("metrics", {}).get(metric)
                lines.append(f"| {task} | {metric} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells)
                             + f" | {'' if b is None else f'{b:.3f}'} |")
        named = {t: b["baseline"] for t, b in base.items() if "baseline" in b}
        if named:
            lines += ["", "Baselines: " + "; ".join(f"{t}: {b}" for t, b in named.items()) + "."]
        lines.append("")
    return lines


def run_changes(storage: Storage, name: str, latest: str) -> list[str]:
    """What the run changed on its own (early stopping, mixture.adapt) and, for a run started from
    another version, each task's score before and after (forgetting)."""
    from trainer.versions import forgetting_table

    state = storage.read_json(f"{name}/{latest}/trainer_state.json") or {}
    lines = []
    stopped = {t: s for t, s in (state.get("early_stopping") or {}).items() if s.get("stopped_at") is not None}
    moves = (state.get("mixture_adapt") or {}).get("history", [])
    if stopped or moves:
        lines += ["## Early stopping and rebalancing", ""]
        lines += [f"- step {s['stopped_at']}: {t} stopped (best {s['best']:.4f} at step {s['best_step']})"
                  for t, s in sorted(stopped.items(), key=lambda kv: kv[1]["stopped_at"])]
        lines += [f"- step {m['step']}: {m['task']} rate x{m['from']:.3g} -> x{m['to']:.3g} of its start ({m['why']})"
                  for m in moves]
        lines.append("")
    forgetting = storage.read_json(f"{name}/forgetting.json")
    if forgetting:
        lines += ["## Before and after this run (`init_from`)", "", "```",
                  forgetting_table(forgetting, forgetting["after"], forgetting["step"]), "```", ""]
    return lines


def write_report(storage: Storage, name: str) -> str:
    """Writes report/report.md and report/curves.png into the experiment; returns where."""
    from launcher.versions import format_versions, version_table

    rows = version_table(storage, name)  # no committed version is an error a user reads
    latest = rows[-1]["version"]
    job = storage.read_text(f"{name}/{latest}/job.yaml") or ""
    with tempfile.TemporaryDirectory(prefix="mtl-report-") as tmp:
        local = Path(tmp)
        storage.download_files(f"{name}/tensorboard", str(local / "tensorboard"), keep=lambda f: True)
        data = curves(local / "tensorboard")
        if not any(data.values()):
            raise UserError(f"'{name}' has no training curves in {storage.describe(name + '/tensorboard')}")
        out = local / "report"
        out.mkdir()
        draw(data, primary_tags(storage, name), out / "curves.png")
        lines = [f"# {name}", "", "![per-task curves](curves.png)", "",
                 "Per task: training loss, validation primary metric, loss weight and sampling rate by step.", "",
                 "## Versions", "", "```", format_versions(rows), "```", ""]
        tables = eval_tables(storage, name)
        lines += ["## Evaluations", ""] + (tables or ["No evaluation on record yet (`mtl eval`).", ""])
        single = storage.read_text(f"{name}/baselines/table.md")
        if single:
            lines += ["## Multitask against single-task runs (`mtl baselines`)", "", single, ""]
        lines += run_changes(storage, name, latest)
        lines += [f"## Job ({latest})", "", "```yaml", job.rstrip(), "```", ""]
        (out / "report.md").write_text("\n".join(lines))
        storage.upload(str(out), f"{name}/report")
    return storage.describe(f"{name}/report/report.md")
