"""The machine's own speed: a bare single-process PyTorch loop (no Ray, no DeepSpeed).

    python benchmarks/ref_bare_loop.py --model DIR --data rows.jsonl --batch 16 --length 128 \
        --steps 12 --threads 2 [--bf16 | --autocast]

The same model computation and rows as benchmarks/bench.py's `mtl` job, at its global batch
(all workers' rows in one batch), with AdamW and clipping; prints the step times as JSON.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from common import ReferenceClassifier, encoded_rows, reference_args


def main() -> None:
    parser = reference_args(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights")
    parser.add_argument("--autocast", action="store_true", help="fp32 weights, bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ReferenceClassifier(args.model).train()
    if args.bf16:
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, mask, labels = encoded_rows(args.model, Path(args.data), args.length)
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        rows = slice(step * args.batch, (step + 1) * args.batch)
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()
        with cast:
            loss = model(ids[rows], mask[rows], labels[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_times": times}), flush=True)


if __name__ == "__main__":
    main()
