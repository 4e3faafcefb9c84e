"""`mtl`: the command line. Each subcommand is a small function; user mistakes print a
message that names the problem and exit 2, without a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.addresses import driver_address, jobs_address
from launcher.console import quiet_driver_libraries
from trainer.errors import RunStopped, UserError

GCS = "the Ray cluster to join as a driver: its GCS, HEAD:6379 (auto on one of its nodes; ray://HEAD:10001 for " \
      "Ray Client). Default: $RAY_ADDRESS, else an embedded local Ray"
DASHBOARD = "the Ray cluster's dashboard (Jobs API), http://HEAD:8265. Default: $RAY_API_SERVER_ADDRESS, else " \
            "$RAY_ADDRESS"

EXAMPLES = """examples:
  mtl train jobs/demo.yaml
  mtl train jobs/demo.yaml train.steps=300     # the same name resumes from its latest version
  mtl validate jobs/demo.yaml
  mtl validate jobs/demo.yaml train.steps=20 tasks.sentiment.weight=2 --print
  mtl eval jobs/demo.yaml --version best --split test
  mtl multinode jobs/demo.yaml --nodes 2          # a local 2-node Ray cluster, torn down afterwards
  mtl submit jobs/demo.yaml --address http://HEAD:8265      # follows the job's logs; --no-wait detaches
  mtl jobs logs JOB_ID --follow --address http://HEAD:8265
  mtl data jobs/demo.yaml
  mtl tasks
"""


def cmd_validate(args: argparse.Namespace) -> int:
    from launcher.jobfile import dump_job, load_job
    from launcher.validate import require_valid

    spec = load_job(args.job, args.overrides)
    report = require_valid(spec, check_files=not args.schema_only, machine=True, force=args.force)
    if args.print:
        print(dump_job(spec), end="")
    for line in report.notes:
        print(line, file=sys.stderr if args.print else sys.stdout)
    print(f"{args.job}: OK ({len(spec.tasks)} tasks{', schema only' if args.schema_only else ''})",
          file=sys.stderr if args.print else sys.stdout)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from launcher.jobfile import load_job
    from launcher.run import train
    from trainer.job_env import load_job_env

    load_job_env()  # inside a submitted job: the secrets `mtl submit` forwarded (storage needs them here too)
    address = driver_address(args.address, "train")
    spec = load_job(args.job, args.overrides)
    train(spec, address=address, on_change=change_policy(args), force=args.force)
    return 0


def change_policy(args: argparse.Namespace) -> str:
    if args.new and args.allow_changes:
        raise UserError("--new and --allow-changes exclude each other")
    return "new" if args.new else "allow" if args.allow_changes else "refuse"


def add_change_flags(p: argparse.ArgumentParser) -> None:
    group = "when the job differs from the version it would resume from in what shapes training"
    p.add_argument("--new", action="store_true", help=f"{group}: start a fresh experiment '<name>-N'")
    p.add_argument("--allow-changes", action="store_true",
                   help=f"{group}: continue it with the changes (from the next step on)")


def cmd_submit(args: argparse.Namespace) -> int:
    from launcher.jobfile import load_job
    from launcher.submit import submit

    address = jobs_address(args.address)
    spec = load_job(args.job, args.overrides)
    if args.override_credentials and not args.forward_credentials:
        raise UserError("--override-credentials goes with --forward-credentials (it says whose credentials win)")
    forward = ("override" if args.override_credentials else "missing") if args.forward_credentials else None
    _, status = submit(spec, address, wait=args.wait, on_change=change_policy(args), forward=forward)
    return status


def cmd_jobs(args: argparse.Namespace) -> int:
    from launcher import submit

    address = jobs_address(args.address)
    if args.action == "list":
        submit.list_jobs(address)
        return 0
    if not args.job_id:
        raise UserError(f"mtl jobs {args.action} needs a JOB_ID (see `mtl jobs list`)")
    if args.action == "status":
        status = submit.job_status(address, args.job_id)
        return 0 if status in ("SUCCEEDED", "RUNNING", "PENDING") else 1
    if args.action == "logs":
        return submit.job_logs(address, args.job_id, follow_logs=args.follow)
    submit.stop_job(address, args.job_id)
    return 0


def cmd_multinode(args: argparse.Namespace) -> int:
    from launcher.multinode import run_multinode

    return run_multinode(args.job, args.overrides, nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                         address=jobs_address(args.address, required=False), layout_file=args.layout)


def cmd_eval(args: argparse.Namespace) -> int:
    from launcher.evaluate import evaluate_experiment, format_table

    storage, name = experiment(args)
    versions = [v.strip() for v in args.compare.split(",") if v.strip()] if args.compare else [args.version]
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: {args.limit} rows; give 1 or more")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    options = dict(versions=versions, split=args.split, baselines=not args.no_baselines, tasks=tasks, limit=args.limit)
    address = driver_address(args.address, "eval")
    if address:
        from launcher.evaluate import evaluate_on_cluster

        report = evaluate_on_cluster(address, storage, name, gpus=args.gpus, **options)
        print(f"[mtl] evaluated as a Ray task on node {report['node']}", file=sys.stderr)
    else:
        report = evaluate_experiment(storage, name, **options)
    print(format_table(report))
    return 0


def experiment(args: argparse.Namespace):
    """(storage, name) from a job file (its storage and name, with overrides) or an experiment's
    folder or URI (trainer.versions.storage.open_experiment)."""
    from trainer.versions import open_experiment, open_storage

    target = args.target
    if target.endswith((".yaml", ".yml")):
        from launcher.jobfile import load_job

        spec = load_job(target, args.overrides)  # a missing file is named there
        return open_storage(spec.storage), spec.name
    if args.overrides:
        raise UserError(f"overrides ({' '.join(args.overrides)}) apply to a job file, not to an experiment folder")
    return open_experiment(target)


def cmd_versions(args: argparse.Namespace) -> int:
    from launcher.versions import format_versions, version_table

    storage, name = experiment(args)
    print(format_versions(version_table(storage, name)))
    return 0


def cmd_baselines(args: argparse.Namespace) -> int:
    from launcher.baselines import format_table, run_baselines
    from launcher.jobfile import load_job

    address = driver_address(args.address, "baselines")
    spec = load_job(args.job, args.overrides)
    print(format_table(run_baselines(spec, split=args.split, address=address)), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from launcher.report import write_report

    storage, name = experiment(args)
    print(f"[mtl] report of '{name}': {write_report(storage, name)}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from launcher.versions import tag_version, untag

    storage, name = experiment(args)
    if args.command == "tag":
        print(f"[mtl] {name}: '{args.tag}' -> {tag_version(storage, name, args.version, args.tag)}")
    else:
        print(f"[mtl] {name}: '{args.tag}' removed (it named {untag(storage, name, args.tag)})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from trainer.inference import MultitaskPipeline

    if (args.text is None) == (args.input is None):
        raise UserError("give --text \"...\" or --input rows.jsonl (one of them)")
    storage, name = experiment(args)
    pipe = MultitaskPipeline.from_version((storage, name), version=args.version)
    if args.text is not None:
        fields = pipe.task_type(args.task).prompt_fields
        if len([f for f in fields if f != "text_pair"]) > 1:
            raise UserError(f"{args.task} reads {', '.join(fields)}: give them as rows with --input rows.jsonl")
        rows = [{fields[0]: args.text}]
    else:
        rows = []
        with open(args.input) as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as exc:
                        raise UserError(f"--input {args.input} line {number}: {exc}") from None
    results = pipe(args.task, rows)
    lines = [json.dumps({**({"id": row["id"]} if "id" in row else {}), **result}) for row, result in zip(rows, results)]
    if args.output:
        Path(args.output).write_text("".join(line + "\n" for line in lines))
        print(f"[mtl] {len(lines)} predictions of {name}/{pipe.version} in {args.output}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from launcher.serve import ServeOptions, read_token_file, serving, token_digest, wait_for_stop
    from trainer.spec import ServeSpec

    address = driver_address(args.address, "serve")
    storage, name = experiment(args)
    limits = {name: getattr(args, name) for name in SERVE_LIMIT_FLAGS if getattr(args, name) is not None}
    try:
        ServeSpec(**limits)
    except ValidationError as exc:
        raise UserError("; ".join(f"--{e['loc'][0].replace('_', '-')}: {e['msg']}" for e in exc.errors())) from None
    token = read_token_file(args.token_file) if args.token_file else None
    options = ServeOptions(host=args.host, port=args.port, replicas=args.replicas,
                           cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                           max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, limits=limits,
                           token_sha256=token_digest(token) if token else None)
    with serving(storage, name, args.version, options, address=address) as (version, url):
        task = next(iter(_version_tasks(storage, name, version)), "TASK")
        print(f"[mtl] serving {name}/{version} at {url} (Ctrl-C stops it)\n"
              f"      curl {url}/tasks\n"
              f"      curl -X POST {url}/{task} -H 'Content-Type: application/json' -d '{{\"inputs\": [...]}}'",
              flush=True)
        wait_for_stop()
    print(f"[mtl] {name}/{version} no longer served")
    return 0


SERVE_LIMITS = (("max_new_tokens", int, "most tokens a request may generate"),
                ("max_beams", int, "widest beam search a request may ask for"),
                ("timeout_s", float, "seconds before a request gets 504 and its generation stops"),
                ("max_body_bytes", int, "largest request body"),
                ("max_inputs", int, "rows in one request"),
                ("max_input_chars", int, "characters in one field of a row"))
SERVE_LIMIT_FLAGS = tuple(name for name, _, _ in SERVE_LIMITS)


def _version_tasks(storage, name: str, version: str) -> list[str]:
    return list((storage.read_json(f"{name}/{version}/tasks.json") or {}).get("tasks", {}))


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.export import export_version

    storage, name = experiment(args)
    version = export_version(storage, name, args.version, args.out, adapter=args.adapter)
    print(f"[mtl] {name}/{version} exported to {args.out} (transformers loads it; see its README.md)")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Per-task data report: rows, bad rows, truncation, micro-batches, real vs. padded tokens."""
    from launcher.jobfile import load_job
    from launcher.validate import require_valid
    from trainer.data import column_array, epoch_padding, prepare_tasks
    from trainer.model import load_tokenizer_and_encoding

    spec = load_job(args.job, args.overrides)
    require_valid(spec)
    tokenizer, encoding = load_tokenizer_and_encoding(spec.model.name_or_path, spec.model.kind)
    tasks = prepare_tasks(spec, tokenizer, encoding, splits=("train",))
    world = spec.scaling.max_workers  # an elastic run shares its data among up to this many
    print(f"{'task':<14}{'rows':>7}{'bad':>6}{'features':>10}{'truncated':>10}{'mb/epoch':>10}"
          f"{'real tok':>11}{'padded tok':>12}{'real %':>8}{'unsorted %':>11}")
    for name, data in tasks.items():
        task = spec.tasks[name]
        enc = data.encoded["train"]
        lengths = column_array(enc.features, "length")
        common = dict(rank=0, world=world, seed=spec.train.seed, task=name, max_tokens=task.max_tokens,
                      rows=None if task.max_tokens else (task.micro_batch_size or spec.train.micro_batch_size),
                      pool=spec.train.pool_micro_batches)
        grouped = epoch_padding(lengths, by_length=spec.train.length_grouping, **common)
        shuffled = epoch_padding(lengths, by_length=False, **common)
        print(f"{name:<14}{enc.rows:>7}{data.checked.bad['train'].count:>6}{len(enc.features):>10}{enc.truncated:>10}"
              f"{grouped.micro_batches:>10}{grouped.real_tokens:>11}{grouped.padded_tokens:>12}"
              f"{100 * grouped.efficiency:>7.1f}%{100 * shuffled.efficiency:>10.1f}%")
    print(f"(train split, rank 0 of {world}, one epoch; 'unsorted' is the same shard without length grouping)")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from trainer.tasks import registry

    for name in registry.names():
        t = registry.get(name)
        print(f"{name}\n  fields: {', '.join(f + ('' if f in t.required else ' (optional)') for f in t.fields)}"
              f"\n  models: {', '.join(t.model_kinds)}\n  metrics: {', '.join(t.allowed_metrics)} "
              f"(default {', '.join(t.default_metrics)})\n  prompt: {t.default_prompt}")
        for key, f in t.options_model.model_fields.items():
            print(f"  options.{key}: {f.default!r} — {f.description}")
        if t.description:
            print(f"  {t.description}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from launcher.reference import markdown

    print(markdown(), end="")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("multitask-launcher")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


FORCE = ("run even where the memory plan says the workers do not fit this machine (it is an estimate; "
         "`mtl validate` prints it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtl", description="Distributed multitask fine-tuning: Ray Train + DeepSpeed ZeRO, one YAML job.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a job (spec, DeepSpeed config, model, every data row) before running it")
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20")
    p.add_argument("--print", action="store_true", help="print the resolved job (defaults filled in) as YAML")
    p.add_argument("--schema-only", action="store_true", help="check the spec and DeepSpeed config, not the files")
    p.add_argument("--force", action="store_true", help=FORCE)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="train a job: embedded local Ray, or a cluster with --address / RAY_ADDRESS",
                       epilog="Running the same job name again resumes from its latest version (on any number of "
                              "workers). Ctrl-C or SIGTERM writes a version at the current step, then stops (exit "
                              "130 / 143); a second Ctrl-C stops at once.")
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20")
    p.add_argument("--address", help=GCS)
    p.add_argument("--force", action="store_true", help=FORCE)
    add_change_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("baselines", help="one single-task run per task (same model, settings and examples seen), "
                                         "scored beside the multitask version: the table and the cost of N models")
    p.add_argument("job", help="the multitask job YAML file (train it first)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the job file")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="held-out split (default: test)")
    p.add_argument("--address", help=GCS)
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("submit", help="submit a job to a Ray cluster through the Jobs API (validated here first)")
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20")
    p.add_argument("--address", help=DASHBOARD)
    add_insecure_flag(p)
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="stream the job's logs until it ends and exit with its status (default; --no-wait: print "
                        "the job id and return, like `ray job submit --no-wait`)")
    p.add_argument("--forward-credentials", action="store_true",
                   help="send this shell's secrets (HF_TOKEN, AWS keys, W&B / MLflow tokens) to the job in its "
                        "package, never in its metadata; a node's own credentials win (default: not sent, the "
                        "cluster uses its own)")
    p.add_argument("--override-credentials", action="store_true",
                   help="with --forward-credentials: the forwarded ones replace the nodes' own (instance role, IRSA)")
    add_change_flags(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="jobs on a Ray cluster: list, status, logs [--follow], stop")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="job id (as `mtl submit` printed it)")
    p.add_argument("--address", help=DASHBOARD)
    add_insecure_flag(p)
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("multinode", help="train on several Ray nodes: a local multi-node cluster on this "
                                         "machine, or the cluster at --address / $RAY_ADDRESS")
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20")
    p.add_argument("--nodes", type=int, default=None, help="nodes of the local cluster (default: the layout's, 2)")
    p.add_argument("--cpus-per-node", type=float, default=None,
                   help="CPUs each local node offers (default: the layout's, else this machine's CPUs / nodes)")
    p.add_argument("--layout", default=None, help="local cluster layout (default: cluster_configs/local.yaml)")
    p.add_argument("--address", help="submit to this cluster's dashboard (http://HEAD:8265) instead of starting "
                                      "a local one (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
    add_insecure_flag(p)
    p.set_defaults(func=cmd_multinode)

    p = sub.add_parser("eval", help="evaluate a committed version per task on a held-out split, beside baselines")
    p.add_argument("target", metavar="JOB|EXP", help="a job file (its experiment and storage) or an experiment "
                                                      "folder / URI (./runs/demo); the data is the version's own job's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. storage.path=s3://b/p")
    p.add_argument("--version", default="latest", help="latest (default), best (overall), best:TASK, a tag, a version "
                                                       "name like step-000200, or untrained (the model the run started from)")
    p.add_argument("--compare", metavar="V1,V2,...", help="evaluate several versions (named as for --version) and "
                                                           "print them side by side, e.g. untrained,latest")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="held-out split (default: test)")
    p.add_argument("--tasks", metavar="A,B", help="only these tasks (default: all of the version's)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N rows of the split per task (a quick look; "
                                                          "saved as <split>-partial.json)")
    p.add_argument("--no-baselines", action="store_true", help="skip the trivial baselines")
    p.add_argument("--address", help="evaluate as a Ray task on this cluster (its GCS HEAD:6379, or auto), where its "
                                      "GPUs are; storage and data must be reachable from its nodes (default: "
                                      "$RAY_ADDRESS, else here, in this process)")
    p.add_argument("--gpus", type=float, default=None,
                   help="with --address: GPUs the task reserves (default: 1 when the cluster has GPUs, else 0)")
    p.set_defaults(func=cmd_eval)

    experiment_command(sub, "report", "write report/report.md and report/curves.png into the experiment: per-task "
                                      "curves, versions, every evaluation, single-task baselines", cmd_report)
    experiment_command(sub, "versions", "list an experiment's versions: step, validation scores, size, tags",
                       cmd_versions)
    p = experiment_command(sub, "tag", "name a version (prod, sentiment-best, ...); retention never deletes it",
                           cmd_tag)
    p.add_argument("version", help="latest, best, best:TASK, step-N or an existing tag")
    p.add_argument("tag", help="the new name")
    p = experiment_command(sub, "untag", "remove a tag (the version may then be pruned by train.keep_last)", cmd_tag)
    p.add_argument("tag", help="the tag to remove")
    p = experiment_command(sub, "predict", "a version's predictions for one task: label and score, answer span "
                                           "and offsets, or generated text (JSON Lines)", cmd_predict, version=True)
    p.add_argument("--task", required=True, help="the task to run")
    p.add_argument("--text", help="one input, for tasks that read one field (classification, generation)")
    p.add_argument("--input", help="rows as JSON Lines, with the task's fields (an `id` is copied to the output)")
    p.add_argument("--output", help="write the predictions here (JSON Lines) instead of printing them")
    p = experiment_command(sub, "serve", "serve a version over HTTP with Ray Serve: POST /TASK, POST /predict, "
                                         "GET /tasks, GET /health", cmd_serve, version=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default: 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default: 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica reserves (default: 0)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="rows of concurrent requests run through the model together (default: 16)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests (default: 10 ms)")
    p.add_argument("--token-file", help="clients must send 'Authorization: Bearer <this file's content>' (needed "
                                        "with a --host other than loopback)")
    for name, kind, what in SERVE_LIMITS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                       help=f"{what} (default: the version's job's serve.{name})")
    p.add_argument("--address", help=GCS)
    p = experiment_command(sub, "export", "write a version as a Hugging Face folder (safetensors, tokenizer, heads, "
                                          "task map, model card) that transformers loads without mtl", cmd_export,
                           version=True)
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--adapter", action="store_true", help="LoRA: keep the adapter apart instead of merging it")

    p = sub.add_parser("data", help="per-task data report: bad rows, truncation, micro-batches, padding")
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("schema", help="print the job spec reference (every field, default and meaning)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("tasks", help="list the registered task types, their fields, metrics and options")
    p.set_defaults(func=cmd_tasks)
    return parser


class _NeverRaised(Exception):
    """Stands for Ray Train's error where Ray is not installed (launcher.torchrun): nothing raises it."""


def _training_failed() -> type[Exception]:
    """Ray Train's failed-run error; imported only when an error reaches it (Ray is slow to import)."""
    try:
        from ray.train import TrainingFailedError
    except ImportError:
        return _NeverRaised
    return TrainingFailedError


def add_insecure_flag(p) -> None:
    """For the verbs that send the cluster's token to its dashboard (launcher.ray_auth.auth_headers)."""
    p.add_argument("--insecure", action="store_true", help="send the cluster's auth token over plain http to a "
                                                           "host other than this one (only on a network you trust)")


def experiment_command(sub, name: str, help: str, func, *, version: bool = False):
    """A command on an experiment's versions: JOB|EXP, the job file's overrides, and --version."""
    p = sub.add_parser(name, help=help)
    p.add_argument("target", metavar="JOB|EXP", help="a job file (its experiment and storage) or an experiment "
                                                      "folder / URI (./runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the job file")
    if version:
        p.add_argument("--version", default="latest", help="latest (default), best, best:TASK, a tag or step-N")
    p.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    quiet_driver_libraries()  # after parsing: --help and --version import no heavy library
    if getattr(args, "insecure", False):
        from launcher import ray_auth

        ray_auth.allow_plain_http = True
    return run_reporting(args.command, lambda: args.func(args))


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Overrides may come after flags (`mtl validate JOB --print train.steps=20`)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def run_reporting(command: str, call) -> int:
    """call()'s exit status, with what a person must know as one line instead of a traceback."""
    try:
        return call()
    except RunStopped as exc:
        print(f"mtl {command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"mtl {command}: error: {exc}", file=sys.stderr)
        return 2
    except _training_failed() as exc:  # what the workers said, not the driver's stack
        print(f"mtl {command}: training failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mtl {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
