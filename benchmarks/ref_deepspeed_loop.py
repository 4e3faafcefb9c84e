"""The reference a user would write instead of `mtl train`: a plain torchrun + DeepSpeed loop.

    torchrun --nproc_per_node 2 benchmarks/ref_deepspeed_loop.py --model DIR --data rows.jsonl \
        --micro-batch 8 --length 128 --steps 12 --zero 2 [--bf16]

The same model computation (benchmarks.common.ReferenceClassifier), the same rows (each rank
its own shard, in order), micro-batch, accumulation (1), ZeRO stage, clipping and AdamW as the
`mtl` job of benchmarks/bench.py; one CPU thread per rank. Rank 0 prints `first step` when its
first step is done and, at the end, the step times as JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from common import ReferenceClassifier, encoded_rows, reference_args


def main() -> None:
    import deepspeed

    parser = reference_args(__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = ReferenceClassifier(args.model).train()  # from_pretrained leaves the encoder in eval mode: no dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": args.micro_batch * world, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.zero}, "bf16": {"enabled": args.bf16}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids, mask, labels = encoded_rows(args.model, Path(args.data), args.length)
    ids, mask, labels = ids[rank::world], mask[rank::world], labels[rank::world]
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        rows = slice(step * args.micro_batch, (step + 1) * args.micro_batch)
        loss = engine(ids[rows], mask[rows], labels[rows])
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        if step == 0 and rank == 0:
            print("first step", flush=True)
    if rank == 0:
        print(json.dumps({"step_times": times}), flush=True)


if __name__ == "__main__":
    main()
