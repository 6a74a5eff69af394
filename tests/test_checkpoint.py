"""Checkpoint reading, layer grouping across architectures, and the atomic writer."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    TensorEntry,
    parse_size,
    split_layer,
    tensor_group,
)
from evomerge.cli import merge_main


def _arch_models():
    from transformers import (
        BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration,
    )

    return {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32)),
        "bert": BertModel(BertConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, max_position_embeddings=32)),
        "t5": T5ForConditionalGeneration(T5Config(num_layers=3, num_decoder_layers=2, d_model=16, d_ff=32,
                                                  d_kv=8, num_heads=2, vocab_size=50)),
    }


def test_layer_names_across_architectures():
    models = _arch_models()
    expect = {
        "gpt2": {"transformer.h": 3},
        "bert": {"encoder.layer": 3},
        "t5": {"encoder.block": 3, "decoder.block": 2},
    }
    for arch, model in models.items():
        stacks: dict[str, set[int]] = {}
        groups = {}
        for name in model.state_dict():
            ln = split_layer(name)
            groups[name] = tensor_group(name)
            if ln is not None:
                stacks.setdefault(ln.stack, set()).add(ln.index)
                assert ln.with_index(ln.index) == name
        assert {k: len(v) for k, v in stacks.items()} == expect[arch], arch
    assert split_layer("model.layers.12.mlp.up_proj.weight").index == 12
    assert split_layer("model.layers.12.mlp.up_proj.weight").with_index(3) == "model.layers.3.mlp.up_proj.weight"
    # the first numeric component is the layer: experts inside a layer stay in it
    ln = split_layer("model.layers.2.block_sparse_moe.experts.5.w1.weight")
    assert (ln.stack, ln.index) == ("model.layers", 2)
    assert tensor_group("model.embed_tokens.weight") == "embed"
    assert tensor_group("transformer.wte.weight") == "embed"
    assert tensor_group("shared.weight") == "embed"
    assert tensor_group("model.norm.weight") == "head"
    assert tensor_group("lm_head.weight") == "head"
    assert tensor_group("transformer.ln_f.weight") == "head"
    assert tensor_group("encoder.layer.0.attention.self.query.weight") == "layers"


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_merge_other_architectures(tmp_path, arch):
    """Task arithmetic on GPT-2 (transformer.h.N) and T5 (two stacks, tied embeddings)."""
    model = _arch_models()[arch]
    paths = []
    for i in range(3):
        m = _arch_models()[arch] if i == 0 else model
        if i:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
        p = tmp_path / f"m{i}"
        m.save_pretrained(p)
        paths.append(p)
    rec = {"merge_method": "task_arithmetic", "base_model": str(paths[0]),
           "models": [{"model": str(paths[1]), "parameters": {"weight": [0.0, 1.0]}},
                      {"model": str(paths[2]), "parameters": {"weight": 0.0}}]}
    rf = tmp_path / "r.yaml"
    rf.write_text(yaml.safe_dump(rec))
    out = tmp_path / "out"
    assert merge_main([str(rf), str(out), "--no-progress"]) == 0
    got = Checkpoint(out)
    base, ex = Checkpoint(paths[0]), Checkpoint(paths[1])
    assert sorted(got.names()) == sorted(base.names())
    for n in got.names():
        ln = split_layer(n)
        if ln is None:  # outside the layers: t = 0, the first value (weight 0): the base
            torch.testing.assert_close(got.get(n), base.get(n))
        else:
            count = base.num_layers()[ln.stack]
            t = ln.index / (count - 1)
            want = base.get(n) + t * (ex.get(n) - base.get(n))
            torch.testing.assert_close(got.get(n), want, rtol=1e-5, atol=1e-6)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).model_type == arch


def test_writer_streams_and_is_atomic(tmp_path):
    ts = {f"t{i}": torch.full((10, 10), float(i), dtype=torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    ts["scalar"] = torch.tensor(3.5)
    ts["ints"] = torch.arange(7)
    entries = [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    out = tmp_path / "out"
    with CheckpointWriter(out, entries, shard_size=450) as w:
        for k, v in ts.items():
            w.add(k, v)
        assert not out.exists()  # nothing visible until commit
        w.commit()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(ts)
    back = {}
    for shard in set(idx["weight_map"].values()):
        back.update(load_file(str(out / shard)))
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_writer_rejects_undeclared_mismatched_or_missing_tensors(tmp_path):
    e = [TensorEntry("a", (2,), torch.float32), TensorEntry("b", (2,), torch.float32)]
    with pytest.raises(ValueError, match="not declared"):
        with CheckpointWriter(tmp_path / "x", e) as w:
            w.add("c", torch.zeros(2))
    with pytest.raises(ValueError, match="does not match"):
        with CheckpointWriter(tmp_path / "x", e) as w:
            w.add("b", torch.zeros(3))
    with pytest.raises(ValueError, match="never written"):
        with CheckpointWriter(tmp_path / "y", e) as w:
            w.add("a", torch.zeros(2))
            w.commit()
    assert list(tmp_path.iterdir()) == []


def test_writer_buffers_take_results_in_place_in_any_order(tmp_path):
    e = [TensorEntry("a", (3, 2), torch.bfloat16), TensorEntry("b", (4,), torch.float32)]
    with CheckpointWriter(tmp_path / "m", e, shard_size=16) as w:
        b = w.buffer("b")
        b.copy_(torch.arange(4.0))
        w.add("b", b)  # already in place: nothing copied
        w.add("a", torch.full((3, 2), 2.5, dtype=torch.bfloat16))
        w.commit()
    idx = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    got = {}
    for shard in set(idx["weight_map"].values()):
        got.update(load_file(str(tmp_path / "m" / shard)))
    assert torch.equal(got["b"], torch.arange(4.0))
    assert torch.equal(got["a"], torch.full((3, 2), 2.5, dtype=torch.bfloat16))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        Checkpoint.open(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(tmp_path / "empty")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("five")
