"""Batched teacher-forced scoring of (prompt, answer) pairs: the shared kernel of the
native evaluators and of the zoo's training loop."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["encode_pairs", "answer_logits", "teacher_forced_correct"]


def encode_pairs(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on the
    answer tokens) for prompt + answer; the answer is predicted from the prompt."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token; set one "
                         "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(a) for p, a in zip(p_ids, a_ids))
    n = len(p_ids)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(p_ids, a_ids)):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p): len(seq)] = torch.tensor(a)
    return ids, mask, labels


def answer_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits that predict each next token (position i predicts token i + 1)."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits[:, :-1]


@torch.no_grad()
def teacher_forced_correct(model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per example: whether greedy argmax predicts every answer token given the true
    prefix (the same as greedy decoding producing the answer exactly)."""
    ids, mask, labels = batch
    dev = next(model.parameters()).device
    logits = answer_logits(model, ids.to(dev), mask.to(dev))
    tgt = labels[:, 1:].to(dev)
    hit = (logits.argmax(-1) == tgt) | (tgt == -100)
    return hit.all(dim=1).cpu()
