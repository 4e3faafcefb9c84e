"""fp32 vs bf16: time of one forward+backward of a model on one CPU thread (median of repeats).

    .venv/bin/python benchmarks/precision_step.py data/demo/smollm2 --rows 8 --length 128

Prints a table; it is a measurement, not a test (nothing here runs in `make test`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_step(model, ids: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocators and kernels
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder (causal or seq2seq LM)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    ids = torch.randint(1000, min(config.vocab_size if hasattr(config, "vocab_size") else 20000, 20000),
                        (args.rows, args.length))
    print(f"{args.model}: {args.rows} x {args.length} tokens, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'precision':<10}{'fwd+bwd s':>10}{'tokens/s':>10}")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = auto.from_pretrained(args.model).to(dtype).train()
        seconds = time_step(model, ids, args.repeats)
        print(f"{name:<10}{seconds:>10.2f}{args.rows * args.length / seconds:>10.0f}")


if __name__ == "__main__":
    main()
