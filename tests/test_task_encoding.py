"""Task types encode rows for every model kind; QA offsets map back to the gold answer."""

from __future__ import annotations

import random

import pytest

from conftest import qa_rows
from trainer.data.check_encode import encode_split
from trainer.tasks import registry
from trainer.tasks.extractive_qa import normalize_answers
from trainer.tasks.registry import TaskContext

IGNORE = -100


def ctx(tokenizer, task_type, encoding, max_length=64, labels=(), **options):
    t = registry.get(task_type)
    return TaskContext(task="t", tokenizer=tokenizer, encoding=encoding, max_length=max_length,
                       prompt=t.default_prompt, labels=labels, options=t.options_model.model_validate(options))


def test_registry_rejects_duplicates_and_suggests():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("classification"))
    with pytest.raises(ValueError, match="did you mean 'extractive_qa'"):
        registry.get("extractive-qa")


def test_classification_heads_labels_and_truncation(tokenizer):
    c = ctx(tokenizer, "classification", "heads", max_length=8, labels=("negative", "positive"))
    rows = [{"text": "great film", "label": "positive"},
            {"text": "the film was dull and boring and tedious and bland", "label": "negative"}]
    feats, truncated = registry.get("classification").encode(rows, c)
    assert feats["labels"] == [1, 0]
    assert truncated == 1
    assert [len(x) for x in feats["input_ids"]] == [4, 8]
    assert feats["input_ids"][1][-1] == tokenizer.sep_token_id  # truncation keeps the closing [SEP]


def test_classification_text_pair(tokenizer):
    c = ctx(tokenizer, "classification", "heads", labels=("negative", "positive"))
    feats, _ = registry.get("classification").encode(
        [{"text": "great", "text_pair": "film", "label": "positive"}], c)
    assert feats["token_type_ids"][0] == [0, 0, 0, 1, 1]


def test_causal_prompt_is_masked_and_target_trained(tokenizer):
    tokenizer.eos_token = "[SEP]"
    c = ctx(tokenizer, "classification", "causal", labels=("negative", "positive"))
    feats, _ = registry.get("classification").encode([{"text": "great film", "label": "positive"}], c)
    ids, labels, plen = feats["input_ids"][0], feats["labels"][0], feats["prompt_length"][0]
    assert labels[:plen] == [IGNORE] * plen
    target = [i for i in labels if i != IGNORE]
    assert tokenizer.decode(target[:-1]) == "positive" and target[-1] == tokenizer.eos_token_id
    assert ids[plen:] == target and feats["label_id"] == [1]


def test_causal_long_prompt_keeps_head_and_tail_and_fits(tokenizer):
    tokenizer.eos_token = "[SEP]"
    c = ctx(tokenizer, "generation", "causal", max_length=40, max_target_length=8)
    source = " ".join(["people walked home"] * 30)
    feats, truncated = registry.get("generation").encode([{"source": source, "target": "news today ."}], c)
    assert truncated == 1
    assert len(feats["input_ids"][0]) <= 40
    prompt = feats["input_ids"][0][:feats["prompt_length"][0]]
    assert tokenizer.decode(prompt[:3]).startswith("[CLS] t :")  # the instruction head survives


def test_seq2seq_generation_labels(tokenizer):
    c = ctx(tokenizer, "generation", "seq2seq", max_length=16, max_target_length=5)
    feats, truncated = registry.get("generation").encode(
        [{"source": "people walked home . it rained", "target": "people walked home today it rained"}], c)
    assert truncated == 0
    assert len(feats["labels"][0]) == 5 and "prompt_length" not in feats


def test_qa_answer_normalisation():
    context = "bob lives in rome ."
    assert normalize_answers("rome.", context) == ({"text": ["rome"], "answer_start": [13]}, None)
    assert normalize_answers({"text": "rome", "answer_start": 13}, context)[0]["answer_start"] == [13]
    assert normalize_answers({"text": ["rome"], "answer_start": [0]}, context)[0]["answer_start"] == [13]
    assert normalize_answers(["bob", "rome"], context)[0]["text"] == ["bob", "rome"]
    assert normalize_answers("oslo", context)[1] == "answer not in its context: 'oslo'"


@pytest.mark.parametrize("max_length,stride", [(24, 8), (32, 4), (40, 16)])
def test_qa_offsets_recover_gold_answer_in_every_window_that_contains_it(tokenizer, max_length, stride):
    rows = qa_rows(40, random.Random(1))
    for i, r in enumerate(rows):
        r["__row__"] = i + 1
    c = ctx(tokenizer, "extractive_qa", "heads", max_length=max_length, doc_stride=stride)
    encoded = encode_split(rows, registry.get("extractive_qa"), c)
    feats = encoded.features
    by_id = {r["__row__"]: r for r in rows}
    containing = 0
    for f in feats:
        row = by_id[f["example_id"]]
        gold = row["answers"]["text"][0]
        start_char = row["answers"]["answer_start"][0]
        offsets = f["offset_mapping"]
        inside = [o for o in offsets if o is not None]
        window_has_answer = inside[0][0] <= start_char and inside[-1][1] >= start_char + len(gold)
        if window_has_answer:
            containing += 1
            s, e = f["start_positions"], f["end_positions"]
            assert row["context"][offsets[s][0]:offsets[e][1]] == gold
        else:
            assert f["start_positions"] == f["end_positions"] == 0
    assert containing >= len(rows)  # every example has at least one window with its answer
    assert len(feats) > len(rows) and encoded.truncated > 0  # long contexts were windowed


def test_qa_text2text_target_is_answer(tokenizer):
    c = ctx(tokenizer, "extractive_qa", "seq2seq")
    row = {"question": "where does bob live ?", "context": "bob lives in rome .",
           "answers": {"text": ["rome"], "answer_start": [13]}, "__row__": 1}
    feats, _ = registry.get("extractive_qa").encode([row], c)
    assert tokenizer.decode(feats["labels"][0], skip_special_tokens=True) == "rome"


def test_rank_score_counts_label_tokens_but_not_the_end_token():
    import torch

    from trainer.evaluation.per_task import _sequence_nll

    logits = torch.zeros(1, 4, 5)
    logits[0, 1, 2] = 10.0  # position 1 is sure of token 2 (the label)
    labels = torch.tensor([[-100, 2, 3, -100]])  # label token 2, then end token 3, then padding
    nll = _sequence_nll(logits, labels, causal=False)
    assert nll.item() == pytest.approx(-torch.log_softmax(logits[0, 1], -1)[2].item())  # the end token is not ranked


@pytest.mark.parametrize("lora", [False, True])
def test_rank_classification_runs_the_prompt_once_and_scores_as_one_pass_per_label(causal_dir, lora):
    """The shared-prompt path (a cache, left padding, labels of one and several tokens) gives the
    scores of one full forward per label, which ZeRO-3 evaluation still uses."""
    import torch
    from transformers import AutoTokenizer

    from trainer.evaluation.per_task import EvalSet, _rank_labels
    from trainer.model.models import build_model

    tok = AutoTokenizer.from_pretrained(causal_dir)
    torch.manual_seed(0)
    lora_cfg = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]} if lora else None
    model = build_model(kind="text2text", encoding="causal", name_or_path=str(causal_dir), heads=[], lora=lora_cfg)
    model.eval()
    labels = ("bad", "very good indeed", "so so")
    c = ctx(tok, "classification", "causal", labels=labels)
    texts = ["a fine film", "dull", "the plot goes nowhere and the actors know it", "warm and clever and long"]
    rows = {i: {"text": t, "label": labels[i % 3]} for i, t in enumerate(texts)}
    es = EvalSet("t", registry.get("classification"), c, None, rows, ["accuracy"])
    ids = list(rows)
    with torch.no_grad():
        shared = _rank_labels(model, es, ids, tok.pad_token_id, "causal", synced=False, device="cpu")
        per_label = _rank_labels(model, es, ids, tok.pad_token_id, "causal", synced=True, device="cpu")
    assert [p for _, _, p in shared] == [p for _, _, p in per_label]
    assert [s for _, s, _ in shared] == pytest.approx([s for _, s, _ in per_label], abs=1e-4)
    assert len({len(tok(" " + label, add_special_tokens=False)["input_ids"]) for label in labels}) > 1


@pytest.mark.parametrize("encoding", ["causal", "seq2seq"])
def test_a_generated_answer_scores_the_mean_likelihood_of_its_tokens(causal_dir, seq2seq_dir, encoding):
    """A text2text QA answer's score is exp(mean log p) of the tokens generated up to and with the
    end token, as one teacher-forced pass over prompt and answer computes it (prompts of different
    lengths, so a causal batch is left-padded)."""
    import torch
    from transformers import AutoTokenizer

    from trainer.evaluation.per_task import EvalSet, _generate
    from trainer.model.models import build_model

    folder = causal_dir if encoding == "causal" else seq2seq_dir
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = build_model(kind="text2text", encoding=encoding, name_or_path=str(folder), heads=[])
    model.eval()
    c = ctx(tok, "extractive_qa", encoding, max_length=64, max_new_tokens=6)
    rows = {1: {"question": "where does bob live ?", "context": "bob lives in rome .",
                "answers": {"text": ["rome"], "answer_start": [13]}, "__row__": 1},
            2: {"question": "who lives in a very long and winding city by the sea ?", "context": "ann does .",
                "answers": {"text": ["ann"], "answer_start": [0]}, "__row__": 2}}
    features = encode_split(list(rows.values()), registry.get("extractive_qa"), c).features
    es = EvalSet("t", registry.get("extractive_qa"), c, features, rows, [])
    chunk = features[[0, 1]]
    config = model.lm.generation_config
    with torch.no_grad():  # a random model rarely ends on its own: row 1's third token ends generations here
        first = torch.tensor([chunk["input_ids"][0][:chunk["prompt_length"][0]] if encoding == "causal"
                              else chunk["input_ids"][0]])
        made = model.lm.generate(input_ids=first, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        generated = made[0, first.shape[1]:] if encoding == "causal" else made[0, 1:]
        config.eos_token_id = generated[min(2, len(generated) - 1)].item()
    eos, start, ended = config.eos_token_id, config.decoder_start_token_id, 0
    with torch.no_grad():
        got = _generate(model, es, chunk, tok.pad_token_id, encoding, synced=False, device="cpu")
        for number, (_, score, _) in enumerate(got):
            ids = chunk["input_ids"][number]
            prompt = ids[:chunk["prompt_length"][number]] if encoding == "causal" else ids
            out = model.lm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                    pad_token_id=tok.pad_token_id)[0].tolist()
            answer = out[len(prompt):] if encoding == "causal" else out[1:]
            ended += eos in answer
            answer = answer[:answer.index(eos) + 1] if eos in answer else answer
            if encoding == "causal":
                logits = model.lm(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
            else:
                logits = model.lm(input_ids=torch.tensor([prompt]),
                                  decoder_input_ids=torch.tensor([[start] + answer[:-1]])).logits[0]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
            assert 0.0 < score <= 1.0
            assert score == pytest.approx(logp.mean().exp().item(), rel=1e-4), number
    assert ended  # and the batch padded that row after its end token
