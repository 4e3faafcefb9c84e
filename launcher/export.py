"""`mtl export`: a version as a Hugging Face folder that `transformers` loads without mtl.

    <out>/config.json, model.safetensors   the LM (text2text) or the shared encoder (heads), fp32,
                                           consolidated from any ZeRO stage; LoRA merged into it,
                                           or kept apart with --adapter (<out>/adapter/, peft's format)
    tokenizer files, generation_config.json
    heads/<task>.safetensors               heads models: one linear layer per task (`out.weight`, `out.bias`)
    tasks.json                             task -> type, labels, prompt, max_length (the version's own)
    README.md                              a model card: the tasks and how to load and call each
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from trainer.errors import UserError
from trainer.versions import pick_version

HEAD_SNIPPET = {
    "classification": "logits = hidden[:, 0] @ head['out.weight'].T + head['out.bias']   # first token; argmax -> labels[i]",
    "extractive_qa": "start, end = (hidden @ head['out.weight'].T + head['out.bias']).unbind(-1)   # span logits per token",
}


def export_version(storage, name: str, version: str, out: Path, *, adapter: bool = False) -> str:
    """Writes the version into `out` (which must not exist or be empty); returns the version's name."""
    from trainer.inference import load_from_storage

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: the folder is not empty; give a new one")
    chosen = pick_version(storage, name, version)
    with tempfile.TemporaryDirectory(prefix="mtl-export-") as tmp:
        local = Path(tmp) / chosen
        loaded = load_from_storage(storage, name, chosen, local)
        out.mkdir(parents=True, exist_ok=True)
        core = loaded.model.lm if loaded.model.lm is not None else loaded.model.backbone
        if hasattr(core, "merge_and_unload"):  # a peft LoRA wrapper
            if adapter:
                core.save_pretrained(str(out / "adapter"))
            core = core.unload() if adapter else core.merge_and_unload()  # unload: the base weights, LoRA layers out
        core.save_pretrained(str(out), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(out))
        _save_heads(loaded.model, out)
        manifest = loaded.manifest
        (out / "tasks.json").write_text(json.dumps(manifest, indent=1))
        (out / "README.md").write_text(model_card(name, chosen, manifest, adapter))
    return chosen


def _save_heads(model, out: Path) -> None:
    from safetensors.torch import save_file

    for task, head in model.heads.items():
        (out / "heads").mkdir(exist_ok=True)
        tensors = {k: v.detach().float().contiguous() for k, v in head.state_dict().items()}
        save_file(tensors, str(out / "heads" / f"{task}.safetensors"))


def model_card(name: str, version: str, manifest: dict, adapter: bool) -> str:
    kind, encoding = manifest["kind"], manifest["encoding"]
    lines = [f"# {name} ({version})", "", f"Exported by `mtl export` from experiment `{name}`, version `{version}`.",
             "", "| task | type | labels | prompt |", "|---|---|---|---|"]
    for task, t in manifest["tasks"].items():
        prompt = (t.get("prompt") or "").replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| {task} | {t['type']} | {', '.join(t.get('labels') or []) or '-'} | "
                     f"{f'`{prompt}`' if kind == 'text2text' else '-'} |")
    lines += ["", "## Loading", "", "```python", "import json", "from transformers import AutoTokenizer"]
    if kind == "text2text":
        auto = "AutoModelForSeq2SeqLM" if encoding == "seq2seq" else "AutoModelForCausalLM"
        lines += [f"from transformers import {auto}", "",
                  f"model = {auto}.from_pretrained(FOLDER)", "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
                  "tasks = json.load(open(f'{FOLDER}/tasks.json'))['tasks']",
                  "prompt = tasks[TASK]['prompt'].format(task=TASK, **fields)   # e.g. fields = {'text': ...}",
                  "ids = tokenizer(prompt, return_tensors='pt')",
                  "answer = tokenizer.decode(model.generate(**ids, max_new_tokens=32)[0][ids['input_ids'].shape[1]:]"
                  if encoding == "causal" else
                  "answer = tokenizer.decode(model.generate(**ids, max_new_tokens=32)[0], skip_special_tokens=True)"]
        if encoding == "causal":
            lines[-1] += ", skip_special_tokens=True)"
        lines += ["# classification tasks were trained to answer with the label word (scored by rank in mtl eval)"]
    else:
        lines += ["from safetensors.torch import load_file", "from transformers import AutoModel", "",
                  "encoder = AutoModel.from_pretrained(FOLDER)", "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
                  "tasks = json.load(open(f'{FOLDER}/tasks.json'))['tasks']",
                  "head = load_file(f'{FOLDER}/heads/{TASK}.safetensors')",
                  "hidden = encoder(**tokenizer(texts, return_tensors='pt', padding=True)).last_hidden_state"]
        for task_type in sorted({t["type"] for t in manifest["tasks"].values()}):
            lines.append(f"# {task_type}: {HEAD_SNIPPET.get(task_type, 'see tasks.json')}")
    if adapter:
        lines += ["# LoRA kept apart: peft.PeftModel.from_pretrained(model, f'{FOLDER}/adapter')"]
    lines += ["```", ""]
    return "\n".join(lines)
