"""Tiny Llama-architecture model families for tests and examples (seconds to build).

``tiny_family(root)`` writes a base and ``n_experts`` "fine-tunes" of it (base plus a
seeded random task vector) as ordinary Hugging Face folders with a character-level
tokenizer, so every loading, merging and writing path runs without a model hub::

    from evomerge.testing import tiny_family
    paths = tiny_family("/tmp/tiny", n_experts=3)   # {"base": ..., "expert_0": ..., ...}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["tiny_config", "tiny_tokenizer", "tiny_model", "tiny_family", "CHARS"]

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz +-=:,.?>")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer():
    """A character-level fast tokenizer built locally (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tok.model_max_length = 512
    return tok


def tiny_config(hidden: int = 32, layers: int = 2, vocab: int | None = None, tie: bool = False, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab or len(SPECIAL) + len(CHARS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4 if hidden % 4 == 0 else 1,
        num_key_value_heads=2 if hidden % 4 == 0 else 1,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **kw,
    )


def tiny_model(config, seed: int = 0):
    """A randomly initialised causal LM, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _perturb(model, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.detach().abs().mean() + 1e-3))


def tiny_family(
    root: str | Path,
    n_experts: int = 3,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    tie: bool = False,
    scale: float = 0.3,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> dict[str, Path]:
    """Write ``base`` and ``expert_i`` folders under ``root``; returns their paths."""
    root = Path(root)
    cfg = tiny_config(hidden=hidden, layers=layers, tie=tie)
    tok = tiny_tokenizer()
    out: dict[str, Path] = {}
    base = tiny_model(cfg, seed)
    names = ["base"] + [f"expert_{i}" for i in range(n_experts)]
    for i, name in enumerate(names):
        m = tiny_model(cfg, seed)
        if i:
            _perturb(m, seed * 1000 + i, scale)
        m = m.to(dtype)
        path = root / name
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        m.save_pretrained(path, **kw)
        tok.save_pretrained(path)
        tc = path / "tokenizer_config.json"
        c = json.loads(tc.read_text())
        c["model_max_length"] = 512
        tc.write_text(json.dumps(c, indent=2))
        out[name] = path
    del base
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m evomerge.testing OUT [--experts N] [--layers N] [--hidden N]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m evomerge.testing",
                                 description="Write a tiny base model and its experts (seconds).")
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if (Path(a.out) / "base" / "config.json").is_file():
        print(f"{a.out}: already there")
        return 0
    paths = tiny_family(a.out, n_experts=a.experts, seed=a.seed, hidden=a.hidden, layers=a.layers)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
