"""How prompts and answers become tokens, once for every evaluator and the zoo's training.

Prompts are encoded as the tokenizer encodes text by default, so a model whose tokenizer
adds a BOS token (its post-processor) sees one, as it did in training and as lm-eval's
``HFLM`` gives it. An answer is the continuation of its prompt, found as lm-eval finds it:
``tokens(prompt + answer)`` past the length of ``tokens(prompt)`` (a BPE vocabulary may merge
across the boundary, and a continuation encoded alone could differ), after moving a prompt's
trailing whitespace into the answer (``"A: "`` + ``"Paris"`` is ``"A:"`` + ``" Paris"``, whose
space a BPE vocabulary merges into the word). The answer's end is a stop: token ids (the
model's EOS) appended after it, or a stop string encoded with it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._common import pad_token_id

__all__ = ["encode_context", "encode_continuations", "encode_pairs", "answer_logits", "teacher_forced_correct"]


def encode_context(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the special tokens the tokenizer adds by default."""
    return tokenizer(list(texts))["input_ids"]


def encode_continuations(tokenizer, prompts: Sequence[str], answers: Sequence[str],
                         end: str | Sequence[int] = ()) -> tuple[list[list[int]], list[list[int]]]:
    """``(context ids, continuation ids)`` per pair. ``end`` ends each answer: a string
    encoded with it (e.g. ``"\\n"``), or token ids appended to it (e.g. ``[eos_id]``)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    text_end = end if isinstance(end, str) else ""
    contexts = [p.rstrip() for p in prompts]
    ctx = encode_context(tokenizer, contexts)
    whole = encode_context(tokenizer, [p + a + text_end for p, a in zip(prompts, answers)])
    tail = [] if isinstance(end, str) else [int(i) for i in end]
    cont = [w[len(c):] + tail for c, w in zip(ctx, whole)]
    return ctx, cont


def encode_pairs(tokenizer, prompts: Sequence[str], answers: Sequence[str],
                 end: str | Sequence[int] = ()) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on the
    continuation: the answer and its ``end``) for prompt + answer."""
    pad = pad_token_id(tokenizer)
    p_ids, a_ids = encode_continuations(tokenizer, prompts, answers, end)
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
