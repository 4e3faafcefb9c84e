"""Which precision a run trains in, decided where it runs.

bf16 pays only on hardware with bf16 arithmetic: CUDA GPUs from Ampere on, and CPUs with AMX
or AVX512-BF16. Elsewhere PyTorch emulates it: on an AVX2-only CPU a bf16 matmul ran at
1.3 GFLOP/s against 85 GFLOP/s in fp32 (one thread, 512×576 @ 576×1536), so a bf16 run is
dozens of times slower than the same run in fp32. `train.precision: auto` takes bf16 where
it is fast and fp32 otherwise; an explicit bf16 on slow hardware trains as asked, with a
warning. Every rank must use the same precision (DeepSpeed's configs must agree), so
`auto` is bf16 only if it is fast on every rank.
"""

from __future__ import annotations

import torch

from trainer.collectives import all_reduce_sum

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 (pre-Ampere) is slow
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


def agreed_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """(the precision every rank trains in, a warning for the user or None)."""
    if requested not in ("auto", "bf16"):
        return requested, None
    local = torch.tensor([1.0 if fast_bf16(device) else 0.0])
    ranks = all_reduce_sum(torch.tensor([1.0]), device).item()
    fast_everywhere = all_reduce_sum(local, device).item() == ranks
    where = "these GPUs" if device.type == "cuda" else "this CPU (no AMX / AVX512-BF16)"
    if requested == "auto":
        return ("bf16", None) if fast_everywhere else ("fp32", f"train.precision auto: fp32, since bf16 is "
                                                              f"emulated on {where}")
    if fast_everywhere:
        return "bf16", None
    return "bf16", (f"train.precision bf16 on {where}: PyTorch emulates bf16 there, dozens of times slower "
                    f"than fp32; use train.precision: fp32 or auto")
