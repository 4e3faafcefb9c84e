"""`make bench` (its serve part): `mtl serve` under a burst of concurrent requests, good and bad.

    .venv/bin/python benchmarks/serve_load.py [--requests 200] [--update BENCHMARKS.md]

Trains the demo's heads job (MiniLM, sentiment + SQuAD QA; `make demo-data`) for one step, serves
that version with `mtl serve --token-file` as a user would (its own process, an embedded Ray, one
replica of 1 CPU), and sends `--requests` requests at once: good ones of both tasks with 1 to 16
rows of the demo's test data, and bad ones of every kind the server refuses — a body over
serve.max_body_bytes, too many rows, malformed JSON, decoding options over the caps, an unknown
task, no token. Every good request must be answered with one output per row, every bad one
refused with its own status, and the server must answer /health afterwards; the script exits 1
otherwise. Prints (and with --update puts into BENCHMARKS.md) p50/p99 latency and throughput.
Bounded: each request waits at most 180 s, the server is stopped by its PID.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, put_marked  # noqa: E402

from launcher.local_cluster import free_port  # noqa: E402

MTL = str(Path(sys.executable).parent / "mtl")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
       "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
# kind -> (share of the burst, the status it must get)
MIX = {"sentiment": (0.40, 200), "qa": (0.30, 200), "oversized": (0.05, 413), "too_many_rows": (0.05, 413),
       "malformed": (0.05, 400), "over_cap": (0.05, 422), "unknown_task": (0.05, 404), "no_token": (0.05, 401)}
BEGIN, END = "<!-- BEGIN serve-load -->", "<!-- END serve-load -->"


def rows_of(path: Path, fields: tuple[str, ...]) -> list[dict]:
    return [{f: row[f] for f in fields} for row in map(json.loads, path.read_text().splitlines())]


def train_version(work: Path) -> Path:
    """One step of the demo's heads job: a committed version to serve."""
    runs = work / "runs"
    cmd = [MTL, "train", "jobs/demo_heads.yaml", "name=serve-load", f"storage.path={runs}", "train.steps=1",
           "train.warmup_steps=0", "train.eval_every=0", "train.checkpoint_every=0", "train.precision=fp32"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"serve-load: training the version failed:\n{done.stderr[-3000:]}")
    return runs / "serve-load"


def requests_for(count: int, sentiment: list[dict], qa: list[dict], seed: int = 0) -> list[dict]:
    """The burst, shuffled: each item says what to send and what must come back."""
    rng = random.Random(seed)
    kinds = [kind for kind, (share, _) in MIX.items() for _ in range(round(share * count))]
    kinds = (kinds + ["sentiment"] * count)[:count]
    rng.shuffle(kinds)
    burst = []
    for kind in kinds:
        item = {"kind": kind, "status": MIX[kind][1], "path": "/sentiment", "auth": True, "rows": 0}
        if kind == "sentiment":
            rows = rng.sample(sentiment, rng.randint(1, 16))
            item.update(body=json.dumps({"inputs": rows}).encode(), rows=len(rows))
        elif kind == "qa":
            rows = rng.sample(qa, rng.randint(1, 8))
            item.update(path="/qa", body=json.dumps({"inputs": rows}).encode(), rows=len(rows))
        elif kind == "oversized":
            item["body"] = json.dumps({"inputs": [{"text": "word " * 400_000}]}).encode()  # 2 MB
        elif kind == "too_many_rows":
            item["body"] = json.dumps({"inputs": [sentiment[0]] * 65}).encode()
        elif kind == "malformed":
            item["body"] = b'{"inputs": [{"text": "unfinished'
        elif kind == "over_cap":
            item.update(path="/qa", body=json.dumps({"inputs": qa[:1], "options": {"max_new_tokens": 1_000_000}}).encode())
        elif kind == "unknown_task":
            item.update(path="/translation", body=json.dumps({"inputs": sentiment[:1]}).encode())
        else:  # no_token
            item.update(body=json.dumps({"inputs": sentiment[:2]}).encode(), auth=False)
        burst.append(item)
    return burst


def send(url: str, token: str, item: dict) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if item["auth"] else {})}
    request = urllib.request.Request(url + item["path"], data=item["body"], headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=180) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except OSError as exc:  # a connection the server dropped
        return {**item, "got": None, "seconds": time.perf_counter() - started, "problem": str(exc)}
    answer = json.loads(body) if body else {}
    problem = None
    if status != item["status"]:
        problem = f"got {status}: {str(answer)[:200]}"
    elif status == 200 and len(answer.get("outputs", [])) != item["rows"]:
        problem = f"{len(answer.get('outputs', []))} outputs for {item['rows']} rows"
    elif status != 200 and "error" not in answer:
        problem = f"{status} without a JSON error"
    return {**item, "got": status, "seconds": time.perf_counter() - started, "problem": problem}


def wait_healthy(url: str, token: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve-load: mtl serve exited with {server.returncode}")
        try:
            request = urllib.request.Request(url + "/health", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"serve-load: the server did not answer /health within {timeout:g}s")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM (mtl serve shuts its Ray down), then SIGKILL of its process group after 60 s."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--update", help="put the table into this Markdown file between its serve-load markers")
    args = parser.parse_args()
    demo = REPO / "data" / "demo"
    if not (demo / "minilm").exists():
        sys.exit("serve-load: the demo data is missing (make demo-data)")
    sentiment = rows_of(demo / "sentiment" / "test.jsonl", ("text",))
    qa = rows_of(demo / "qa" / "test.jsonl", ("question", "context"))
    with tempfile.TemporaryDirectory(prefix="mtl-serve-load-") as tmp:
        work = Path(tmp)
        experiment = train_version(work)
        token = secrets.token_urlsafe(32)
        (work / "token").write_text(token)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([MTL, "serve", str(experiment), "--port", str(port), "--token-file",
                                   str(work / "token")], cwd=REPO, env=ENV, stdout=open(work / "serve.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, token, server)
            burst = requests_for(args.requests, sentiment, qa)
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(burst)) as pool:
                results = list(pool.map(lambda item: send(url, token, item), burst))
            wall = time.perf_counter() - started
            alive = send(url, token, {"kind": "health", "status": 200, "path": "/tasks", "auth": True, "rows": 0,
                                      "body": None})
        finally:
            stop(server)
    report(results, wall, alive, args)


def report(results: list[dict], wall: float, alive: dict, args) -> None:
    good = [r for r in results if r["status"] == 200]
    problems = [r for r in results if r["problem"]]
    latency = [r["seconds"] for r in good if not r["problem"]]
    rows = sum(r["rows"] for r in good)
    by_kind = {kind: sum(1 for r in results if r["kind"] == kind and not r["problem"]) for kind in MIX}
    totals = {kind: sum(1 for r in results if r["kind"] == kind) for kind in MIX}
    lines = ["| measure | value |", "|---|---|",
             f"| requests at once | {len(results)} ({len(good)} good, {len(results) - len(good)} bad) |",
             *(f"| {kind} → {MIX[kind][1]} | {by_kind[kind]} of {totals[kind]} as expected |" for kind in MIX),
             f"| server alive after the burst | {'yes' if alive['got'] == 200 else 'NO'} |",
             f"| good requests: p50 / p99 latency | {percentile(latency, 0.5):.2f} s / {percentile(latency, 0.99):.2f} s |"
             if latency else "| good requests: latency | none answered |",
             f"| throughput | {len(good) / wall:.1f} good requests/s, {rows / wall:.0f} rows/s "
             f"({rows} rows in {wall:.1f} s) |"]
    command = " ".join(["benchmarks/serve_load.py", *sys.argv[1:]])
    text = (f"`{command}` on {os.cpu_count()} CPUs, one replica of 1 CPU, the demo's heads version (MiniLM, "
            f"fp32):\n\n" + "\n".join(lines) + "\n")
    print(text)
    for r in problems[:10]:
        print(f"  problem: {r['kind']} {r['path']}: {r['problem']}", file=sys.stderr)
    if args.update:
        put_marked(Path(args.update), BEGIN, END, text)
    if problems or alive["got"] != 200:
        sys.exit(1)


if __name__ == "__main__":
    main()
