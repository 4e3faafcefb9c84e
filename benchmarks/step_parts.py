"""Where a step's time goes as the number of tasks grows: one process, a MiniLM-shaped heads
model with 8 and with 256 heads, ZeRO-2, 1 thread, 4 micro-batches of 8x128 tokens of 4 tasks a
step; medians of steps 2-5 of forward+backward, DeepSpeed's step, and HeadGuard's hold and restore.

    benchmarks/step_parts.py      # prints a line per number of tasks
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import build_model  # noqa: E402

from trainer.control import HeadGuard  # noqa: E402
from trainer.loop_setup import skip_inference_comm_op  # noqa: E402
from trainer.model import HeadSpec  # noqa: E402
from trainer.model import build_model as build  # noqa: E402

torch.set_num_threads(1)
folder = Path(tempfile.mkdtemp(prefix="mtl-step-parts-")) / "model"
build_model(folder)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
skip_inference_comm_op()
dist.init_process_group("gloo")
import deepspeed  # noqa: E402

for n in (8, 256):
    torch.manual_seed(0)
    model = build(kind="heads", encoding="heads", name_or_path=str(folder),
                  heads=[HeadSpec(f"t{i}", "classification", 2) for i in range(n)])
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4, "train_batch_size": 32,
           "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
           "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=cfg)
    guard = HeadGuard(engine.module.heads)
    batch = {"input_ids": torch.randint(5, 100, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=torch.long),
             "labels": torch.randint(0, 2, (8,))}
    parts = {"fwd+bwd": [], "step": [], "guard": []}
    for step in range(5):
        tasks = [f"t{(step * 4 + k) % n}" for k in range(4)]
        t0 = time.perf_counter()
        held = guard.hold([t for t in guard.params if t not in tasks])
        t1 = time.perf_counter()
        fb = st = 0.0
        for k, task in enumerate(tasks):
            a = time.perf_counter()
            loss, weighted = engine(task, batch, weight=1.0, touch_heads=k == 0)  # as trainer.loop.run_plan
            engine.backward(weighted)
            b = time.perf_counter()
            engine.step()
            c = time.perf_counter()
            fb += b - a
            st += c - b
        d = time.perf_counter()
        HeadGuard.restore(held)
        e = time.perf_counter()
        if step >= 1:
            parts["fwd+bwd"].append(fb)
            parts["step"].append(st)
            parts["guard"].append((t1 - t0) + (e - d))
    params = sum(p.numel() for p in model.parameters())
    print(n, "tasks", f"{params / 1e6:.1f}M params", {k: round(statistics.median(v), 3) for k, v in parts.items()},
          flush=True)
