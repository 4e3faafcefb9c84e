"""A ZeRO-3 version's whole weights: written one parameter at a time, read as one safetensors file.

Under ZeRO-3 no rank holds the model whole, and a version must still hold weights that eval,
predict and export read without the optimizer shards. DeepSpeed's `save_16bit_model` gathers
the whole state dict into rank 0's memory first: a second model on top of a rank that was
sized to hold a fraction of one (a 0.7B fp32 model: 2.9 GB more on rank 0, which a partitioned
run on 2 ranks cannot spare; 140 GB for a 70B model). Here every rank gathers one parameter at
a time and rank 0 streams it into a safetensors file whose header it writes first (the shapes
are known without gathering), so the extra memory is the largest parameter.

Names that share a tensor (tied embeddings) are stored once; the file's metadata maps each
other name to the one stored, and `read_whole_weights` gives every name back.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

FILE = "model.safetensors"
LEGACY_FILE = "model.pt"  # versions written before the streamed file: DeepSpeed's save_16bit_model
ALIASES = "mtl_aliases"  # metadata key: {name: the stored name whose tensor it shares}

# safetensors' names for torch's dtypes (https://github.com/huggingface/safetensors, format)
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def _full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))  # a ZeRO-3 partition knows its whole shape


def write_gathered(module: torch.nn.Module, path: Path, rank: int, trained_only: bool = False) -> int:
    """Every rank calls this (each gather is a collective); rank 0 writes `path`. Returns its bytes
    (0 on the other ranks). trained_only: no frozen parameters (a LoRA version's base)."""
    import deepspeed

    frozen = frozen_names(module) if trained_only else set()
    entries, stored, aliases = {}, {}, {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name in frozen:
            continue
        if id(tensor) in stored:
            aliases[name] = stored[id(tensor)]
            continue
        stored[id(tensor)] = name
        entries[name] = tensor
    header, offset = {}, 0
    for name, tensor in entries.items():
        size = torch.Size(_full_shape(tensor)).numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(_full_shape(tensor)),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", ALIASES: json.dumps(aliases)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    out = None
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "wb")
        out.write(struct.pack("<Q", len(raw)) + raw)
    try:
        for name, tensor in entries.items():
            partitioned = hasattr(tensor, "ds_id")
            with deepspeed.zero.GatheredParameters([tensor] if partitioned else [], modifier_rank=None):
                if out is not None:
                    whole = tensor.detach().to("cpu").contiguous()
                    assert tuple(whole.shape) == tuple(header[name]["shape"]), f"{name}: gathered {tuple(whole.shape)}"
                    if whole.numel():  # written from the tensor's own memory, not a bytes copy of it
                        out.write(memoryview(whole.reshape(-1).view(torch.uint8).numpy()))
    finally:
        if out is not None:
            out.close()
    return len(raw) + 8 + offset if rank == 0 else 0


def frozen_names(module: torch.nn.Module) -> set[str]:
    """Every name of a frozen parameter, tied ones included (named_parameters gives a tied weight
    once: a LoRA model's lm_head, tied to the frozen embeddings, would be kept whole otherwise)."""
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def read_whole_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A version's `weights/` file as a state dict (every name, tied ones included)."""
    path = folder / FILE
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            weights = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads((f.metadata() or {}).get(ALIASES, "{}"))
        weights.update({name: weights[stored] for name, stored in aliases.items()})
        return weights
    return torch.load(folder / LEGACY_FILE, map_location="cpu", weights_only=True)


def has_whole_weights(folder: Path) -> bool:
    return (folder / FILE).exists() or (folder / LEGACY_FILE).exists()
