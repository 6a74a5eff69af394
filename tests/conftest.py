"""Fixtures shared by several test files: the second model family (see ``evomerge.testing``)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def words(tmp_path_factory):
    """A GPT-2 family with a byte-level BPE tokenizer (BOS added, no pad), EOS-terminated
    answers and its own data layout, trained once per test session (about 25 s)."""
    import torch

    from evomerge.testing import word_family

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return word_family(tmp_path_factory.mktemp("words") / "family")
    finally:
        torch.set_num_threads(before)
