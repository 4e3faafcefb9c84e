"""The memory plan (trainer.model.memory_plan) for Llama-shaped 1B, 8B and 70B models on 8x80 GB GPU
nodes: what docs/scaling.md quotes. Nothing is downloaded or allocated: the models are counted
on PyTorch's meta device from their published shapes.

    .venv/bin/python benchmarks/scaling_plan.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.model import GIB, model_size, plan_memory  # noqa: E402

# Published shapes of Llama 3.2 1B, Llama 3.1 8B and Llama 3.1 70B.
SHAPES = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}
SETUPS = [  # (label, stage, offload optimizer, gradient checkpointing)
    ("ZeRO-0", 0, False, False), ("ZeRO-1", 1, False, False), ("ZeRO-2", 2, False, False),
    ("ZeRO-3", 3, False, False), ("ZeRO-3 + checkpointing", 3, False, True),
    ("ZeRO-3 + offload + checkpointing", 3, True, True),
]
GPU_GIB, HOST_GIB, GPUS_PER_NODE = 80, 1024, 8


def main() -> None:
    from transformers import LlamaConfig

    print(f"bf16, AdamW, micro-batch 1 x 4096 tokens; GPU {GPU_GIB} GiB, host {HOST_GIB} GiB per node of "
          f"{GPUS_PER_NODE} GPUs\n")
    print("| model | nodes | setup | GPU GiB per rank | host GiB per node | fits |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        size = model_size(LlamaConfig(**shape), "text2text", "causal")
        for nodes in (1, 4):
            world = nodes * GPUS_PER_NODE
            for label, stage, offload, checkpointing in SETUPS:
                plan = plan_memory(size, stage=stage, world=world, precision="bf16", offload_optimizer=offload,
                                   on_gpu=True, tokens=4096, sequence=4096, checkpointing=checkpointing)
                gpu, host = plan.device_bytes / GIB, plan.host_bytes * GPUS_PER_NODE / GIB
                fits = gpu <= GPU_GIB * 0.95 and host <= HOST_GIB * 0.95
                print(f"| {name} ({size.params / 1e9:.2f}B) | {nodes} | {label} | {gpu:.1f} | {host:.0f} | "
                      f"{'yes' if fits else 'no'} |")


if __name__ == "__main__":
    main()
