"""Per-task evaluation on a held-out split, by every rank together.

Each rank predicts a round-robin share of the split's features (padded to the same count, so
ZeRO-3's per-layer gathers stay in lockstep), the candidates are gathered, and every rank
computes the same metrics. Heads models decode their logits with the task type's `decode`;
text2text models either generate (QA, generation) or rank the label words by likelihood
(classification).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from trainer import metrics
from trainer.collectives import all_gather_objects, to_device
from trainer.data import IGNORE_INDEX, collate
from trainer.model import forward_accepts
from trainer.tasks import TaskContext, TaskType

SAMPLES = 3  # predictions kept per task for logs and TensorBoard
# When generation must end (time.monotonic()), set by a caller that answers within a time (mtl serve).
GENERATION_DEADLINE: ContextVar[float | None] = ContextVar("mtl_generation_deadline", default=None)


class DeadlineExceeded(TimeoutError):
    """The time a caller gave generation (GENERATION_DEADLINE) ran out before it began."""


@contextmanager
def generation_deadline(seconds: float):
    """Generation in this block (this thread and threads started with its context) stops by then."""
    token = GENERATION_DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        GENERATION_DEADLINE.reset(token)


def _time_left() -> dict:
    """generate()'s max_time for the deadline in force; none without one."""
    deadline = GENERATION_DEADLINE.get()
    if deadline is None:
        return {}
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("no time left to generate")
    return {"max_time": left}


@dataclass
class EvalSet:
    task: str
    task_type: TaskType
    ctx: TaskContext
    features: object  # datasets.Dataset
    rows_by_id: dict
    metric_names: list[str]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[dict]
    predictions: dict[int, str]


def build_eval_set(spec, name: str, data, tokenizer, encoding: str, split: str) -> EvalSet:
    """The evaluation of one task on one split, read from the job (`data` is a TaskData)."""
    from trainer.data import task_context, task_metrics
    from trainer.tasks import registry

    return EvalSet(name, registry.get(spec.tasks[name].type), task_context(spec, name, tokenizer, encoding, data.labels),
                   data.encoded[split].features, {r["__row__"]: r for r in data.checked.splits[split]},
                   task_metrics(spec, name))


def baseline_metrics(es: EvalSet, train_rows: list[dict]) -> dict[str, float]:
    """The task type's trivial predictor on the same rows, scored with the same metrics."""
    predict = es.task_type.baseline(train_rows)
    ids = sorted(es.rows_by_id)
    preds = [predict(es.rows_by_id[i]) for i in ids]
    refs = [es.task_type.reference(es.rows_by_id[i]) for i in ids]
    return metrics.compute(es.metric_names, preds, refs)


def _my_indices(n: int, rank: int, world: int) -> list[int]:
    mine = list(range(rank, n, world))
    share = -(-n // world)
    return mine + [mine[-1] if mine else 0] * (share - len(mine))


@torch.no_grad()
def evaluate_task(model, es: EvalSet, *, rank: int, world: int, batch_size: int, pad_id: int,
                  encoding: str, synced: bool, device="cpu", by_length: bool = True) -> EvalResult:
    candidates = predict_features(model, es, _my_indices(len(es.features), rank, world), batch_size=batch_size,
                                  pad_id=pad_id, encoding=encoding, synced=synced, device=device,
                                  by_length=by_length)
    if world > 1:
        candidates = [c for part in all_gather_objects(candidates) for c in part]
    best = best_per_example(candidates)
    ids = sorted(best)
    preds = [best[i][1] for i in ids]
    refs = [es.task_type.reference(es.rows_by_id[i]) for i in ids]
    values = metrics.compute(es.metric_names, preds, refs)
    samples = [{"id": i, "prediction": p, "reference": r} for i, p, r in list(zip(ids, preds, refs))[:SAMPLES]]
    return EvalResult(values, samples, dict(zip(ids, preds)))


@torch.no_grad()
def predict_features(model, es: EvalSet, indices: list[int], *, batch_size: int, pad_id: int, encoding: str,
                     synced: bool = False, device="cpu", by_length: bool = True) -> list[tuple]:
    """(example_id, score, prediction) for the features at `indices`, in eval mode.

    by_length: batches of features of similar length (longest first), so little of a batch is
    padding; what a feature scores does not depend on its batch-mates."""
    if by_length:
        indices = length_order(es.features, indices)
    with eval_mode(model):
        candidates: list[tuple] = []
        for chunk in _chunks(es, indices, batch_size):
            candidates.extend(_predict(model, es, chunk, pad_id, encoding, synced, device))
        return candidates


def length_order(features, indices: list[int]) -> list[int]:
    """`indices`, longest first by what the model reads: a causal prompt (generation and ranking
    run on it alone), else the whole input."""
    column = "prompt_length" if "prompt_length" in features.column_names else "length"
    lengths = features[column]
    return sorted(indices, key=lambda i: -lengths[i])


@contextmanager
def eval_mode(model):
    """The model in eval mode for the block, then back in the mode it was in (training goes on after)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _chunks(es: EvalSet, indices: list[int], batch_size: int):
    """The features at `indices`, `batch_size` at a time."""
    for start in range(0, len(indices), batch_size):
        yield es.features[indices[start:start + batch_size]]


def best_per_example(candidates: list[tuple]) -> dict[int, tuple[float, str]]:
    """An example's best-scoring prediction over its features (a long QA context has several windows)."""
    best: dict[int, tuple[float, str]] = {}
    for example_id, score, prediction in candidates:
        if example_id not in best or score > best[example_id][0]:
            best[example_id] = (score, prediction)
    return best


def _predict(model, es: EvalSet, chunk: dict, pad_id: int, encoding: str, synced: bool, device) -> list[tuple]:
    if encoding == "heads":
        batch = to_device(collate(chunk, pad_id), device)
        _, logits = model.head_outputs(es.task, batch)
        return es.task_type.decode(logits.float().cpu(), batch, es.rows_by_id, es.ctx)  # collate made ids a tensor
    if es.task_type.text2text_eval == "rank":
        return _rank_labels(model, es, chunk["example_id"], pad_id, encoding, synced, device)
    return _generate(model, es, chunk, pad_id, encoding, synced, device)


def _sequence_nll(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Negative log-likelihood of each row's target tokens, without the closing end token.

    The end token is trained (generation must stop) but not ranked: as in common LM evaluation,
    a label is scored by the likelihood of its own words.
    """
    if causal:  # position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE_INDEX
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # the closing token of each row
    mask = mask.clone()
    mask[torch.arange(mask.shape[0]), last] = False
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(-1)


def label_probabilities(model, es: EvalSet, indices: list[int], *, batch_size: int, pad_id: int, encoding: str,
                        device="cpu") -> dict[int, list[float]]:
    """Classification: every label's probability per example, in the order of `es.ctx.labels`.

    Heads models: the softmax of the head's logits. Text2text models: the softmax of each label's
    log-likelihood (rank classification's scores), so the most likely label is the one eval picks.
    """
    out: dict[int, list[float]] = {}
    with eval_mode(model), torch.no_grad():
        for chunk in _chunks(es, indices, batch_size):
            if encoding == "heads":
                batch = to_device(collate(chunk, pad_id), device)
                scores = model.head_outputs(es.task, batch)[1]
                ids = batch["example_id"].tolist()
            else:
                ids = list(chunk["example_id"])
                scores = _label_loglik(model, es, ids, pad_id, encoding, False, device)
            out.update(zip(ids, scores.float().softmax(-1).cpu().tolist()))
    return out


def _rank_labels(model, es: EvalSet, ids: list[int], pad_id: int, encoding: str, synced: bool, device) -> list[tuple]:
    """Rank classification: the label whose words the model finds most likely as the target."""
    best, index = _label_loglik(model, es, ids, pad_id, encoding, synced, device).max(-1)
    return [(i, float(s), es.ctx.labels[int(k)]) for i, s, k in zip(ids, best.tolist(), index.tolist())]


def _label_loglik(model, es: EvalSet, ids: list[int], pad_id: int, encoding: str, synced: bool,
                  device) -> torch.Tensor:
    """[rows, labels]: each label's log-likelihood as the target of each row's prompt."""
    rows = [es.rows_by_id[i] for i in ids]
    encoded = [es.task_type.encode([{**r, "label": label} for r in rows], es.ctx)[0] for label in es.ctx.labels]
    if encoding == "causal" and not synced and _prompts_agree(encoded):
        stacked = _rank_causal_shared_prompt(model.lm, encoded, pad_id, device)
    else:  # ZeRO-3 ranks must make the same forward calls, whatever their rows: one per label
        scores = []
        for feats in encoded:
            batch = to_device(collate({k: feats[k] for k in ("input_ids", "attention_mask", "labels")}, pad_id),
                              device)
            logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).logits
            scores.append(-_sequence_nll(logits, batch["labels"], causal=encoding == "causal").cpu())
        stacked = torch.stack(scores, dim=-1)
    return stacked


def _prompts_agree(encoded: list[dict]) -> bool:
    """Every label's rows start with the same prompt (truncation for a longer label could cut it)."""
    first = encoded[0]
    return all(f["prompt_length"] == first["prompt_length"]
               and all(a[:n] == b[:n] for a, b, n in zip(f["input_ids"], first["input_ids"], f["prompt_length"]))
               for f in encoded[1:])


def _rank_causal_shared_prompt(lm, encoded: list[dict], pad_id: int, device) -> torch.Tensor:
    """Each label's log-likelihood with the prompt run once for all labels (a decoder's cache).

    The same scores as one forward per label (up to float rounding), at the cost of one prompt
    pass plus, for labels longer than one token, a pass over the label's own tokens; only the
    last prompt position's logits are computed where the model allows it. Prompts are padded on
    the left so every label continues right after its prompt.
    """
    import copy

    lengths = encoded[0]["prompt_length"]
    width = max(lengths)
    prompts = [ids[:n] for ids, n in zip(encoded[0]["input_ids"], lengths)]
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if forward_accepts(lm, "logits_to_keep") else {}
    cache_arg = "cache" if forward_accepts(lm, "cache") else "past_key_values"  # transformers 5 renamed it
    out = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    cache = getattr(out, "cache", None) or out.past_key_values
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = []
    for feats in encoded:
        # The label's tokens; the closing end token is trained but not ranked (see _sequence_nll).
        targets = [ids[n:] for ids, n in zip(feats["input_ids"], lengths)]
        targets = [t[:-1] if len(t) > 1 else t for t in targets]
        score = first.gather(-1, torch.tensor([[t[0]] for t in targets], device=device)).squeeze(-1)
        longest = max(len(t) for t in targets)
        if longest > 1:  # the rest of the label, read on from the prompt's cache
            rest = [t[:-1] + [pad_id] * (longest - len(t)) for t in targets]
            rest_mask = torch.tensor([[1] * (len(t) - 1) + [0] * (longest - len(t)) for t in targets], device=device)
            step = lm(input_ids=torch.tensor(rest, device=device), attention_mask=torch.cat([mask, rest_mask], 1),
                      position_ids=positions[:, -1:] + 1 + torch.arange(longest - 1, device=device),
                      use_cache=True, **{cache_arg: copy.deepcopy(cache)})
            logp = torch.log_softmax(step.logits.float(), dim=-1)
            following = torch.tensor([t[1:] + [0] * (longest - len(t)) for t in targets], device=device)
            picked = logp.gather(-1, following.unsqueeze(-1)).squeeze(-1)
            score = score + (picked * rest_mask).sum(-1)
        scores.append(score.cpu())
    return torch.stack(scores, dim=-1)


def _generate(model, es: EvalSet, chunk: dict, pad_id: int, encoding: str, synced: bool, device) -> list[tuple]:
    """(example_id, score, text) per feature: the text generated and, for an answer (extractive QA),
    its score: the geometric mean of its tokens' probabilities, the end token included. Other
    generations score 0.0: keeping every step's logits costs batch x new tokens x vocabulary, and
    only an answer's score is returned (trainer.inference.pipeline)."""
    options = es.ctx.options
    scored = es.task_type.name == "extractive_qa"
    kwargs = {"max_new_tokens": getattr(options, "max_new_tokens", 32), "num_beams": getattr(options, "num_beams", 1),
              "do_sample": False, "synced_gpus": synced, "pad_token_id": pad_id,
              "return_dict_in_generate": True, "output_scores": scored, **_time_left()}
    tok = es.ctx.tokenizer
    if encoding == "seq2seq":
        batch = to_device(collate({k: chunk[k] for k in ("input_ids", "attention_mask")}, pad_id), device)
        out = model.lm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        start = 1  # the decoder's start token
    else:  # causal: the prompt alone, padded on the left so generation continues from its end
        prompts = [ids[:n] for ids, n in zip(chunk["input_ids"], chunk["prompt_length"])]
        start = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad_id] * (start - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (start - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.lm.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    generated = out.sequences[:, start:]
    texts = tok.batch_decode(generated, skip_special_tokens=True)
    scores = (_generated_scores(model.lm, out, generated, model.lm.generation_config.eos_token_id) if scored
              else [0.0] * len(texts))
    return [(i, score, t.strip()) for i, score, t in zip(chunk["example_id"], scores, texts)]


def _generated_scores(lm, out, generated: torch.Tensor, eos) -> list[float]:
    """exp(mean log-probability) of each row's generated tokens, up to and with its first end token
    (after it a finished row is only padded)."""
    logp = lm.compute_transition_scores(out.sequences, out.scores, getattr(out, "beam_indices", None),
                                        normalize_logits=True).float()[:, :generated.shape[1]]
    ends = [eos] if isinstance(eos, int) else list(eos or [])
    is_end = torch.isin(generated, torch.tensor(ends, dtype=generated.dtype, device=generated.device)).long()
    keep = (is_end.cumsum(-1) - is_end) == 0  # no end token before this one
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    return torch.exp(logp.sum(-1) / keep.sum(-1).clamp(min=1)).tolist()
