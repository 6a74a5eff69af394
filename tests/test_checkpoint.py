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


# --------------------------------------------------------------------------------------
# Direct I/O: the same bytes as ordinary writes, whatever the sizes, order and memory
# --------------------------------------------------------------------------------------


def _takes_direct_io(folder) -> bool:
    """Whether ``folder``'s filesystem accepts an aligned O_DIRECT write (tmpfs does not)."""
    import mmap
    import os

    if not hasattr(os, "O_DIRECT"):
        return False
    p = folder / "probe"
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.pwrite(fd, mmap.mmap(-1, 4096), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        p.unlink()


_DT = [torch.bfloat16, torch.float32, torch.float16, torch.uint8, torch.int64]


def _odd_tensors(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, n in enumerate(sizes):
        dt = _DT[i % len(_DT)]
        if dt.is_floating_point:
            out[f"t{i}"] = torch.randn(n, generator=g).to(dt)
        else:
            out[f"t{i}"] = torch.randint(0, 100, (n,), generator=g).to(dt)
    return out


def _write(folder, ts, order, via_buffer, shard_size, direct_io, write_behind=True):
    entries = [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    with CheckpointWriter(folder, entries, shard_size=shard_size, direct_io=direct_io,
                          write_behind=write_behind) as w:
        for k in order:
            v = ts[k]
            if via_buffer[k]:
                b = w.buffer(k)
                b.copy_(v)
                w.add(k, b)
            else:
                # most likely out of phase with the file: one element into a larger block
                es = v.element_size()
                raw = torch.empty((v.numel() + 1) * es, dtype=torch.uint8)
                t = raw[es:].view(v.dtype)
                t.copy_(v)
                w.add(k, t)
        w.commit()
        return w.direct()  # as the files were closed


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")}


@pytest.mark.parametrize("seed", range(4))
def test_direct_writes_give_the_bytes_of_ordinary_writes(tmp_path, seed):
    import random

    rnd = random.Random(seed)
    # sizes around the 4096-byte block: inside one block, straddling two, exact blocks, large
    sizes = [rnd.choice([1, 3, 511, 1024, 2047, 2048, 4096, 5000, 12288, 40_000, 300_000])
             for _ in range(rnd.randint(3, 14))]
    ts = _odd_tensors(sizes, seed)
    order = list(ts)
    rnd.shuffle(order)
    via = {k: rnd.random() < 0.5 for k in ts}
    shard = rnd.choice([10**9, 200_000, 50_000])
    used = _write(tmp_path / "direct", ts, order, via, shard, True)
    plain = _write(tmp_path / "plain", ts, order, via, shard, False, write_behind=False)
    _write(tmp_path / "direct_sync", ts, order, via, shard, True, write_behind=False)
    _write(tmp_path / "plain_behind", ts, order, via, shard, False)
    for other in ("direct", "direct_sync", "plain_behind"):
        assert _files(tmp_path / other) == _files(tmp_path / "plain"), other
    assert plain == [False] * len(plain)
    assert used == [_takes_direct_io(tmp_path)] * len(used)
    back = {}
    for f in (tmp_path / "direct").glob("*.safetensors"):
        back.update(load_file(str(f)))
    assert set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def _refuse_direct_writes(monkeypatch, after: int) -> list[int]:
    """Make the filesystem take the first ``after`` direct writes, then refuse them (as
    EINVAL); returns the running count of direct writes tried."""
    import errno
    import os

    real_open, real_pwrite = os.open, os.pwrite
    direct_fds: set[int] = set()
    calls = [0]

    def tracking_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds:
            calls[0] += 1
            if calls[0] > after:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    return calls


@pytest.mark.parametrize("refuse_after", [None, 0, 4])
@pytest.mark.parametrize("attempt", range(3))  # the switch's races show in some runs only
def test_direct_writes_from_threads_in_any_order(tmp_path, monkeypatch, refuse_after, attempt):
    """Four threads writing at once, the filesystem taking every direct write or refusing
    them after the first few (the switch to ordinary writes then happens mid-flight)."""
    from concurrent.futures import ThreadPoolExecutor

    ts = _odd_tensors([3000, 70_001, 5, 4096, 123_457, 8191, 2, 65_536, 9999] * 3, 7)
    entries = [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in ts.items()]

    def write(folder, direct):
        with CheckpointWriter(tmp_path / folder, entries, shard_size=400_000, direct_io=direct) as w:
            def one(k):
                b = w.buffer(k)
                b.copy_(ts[k])
                w.add(k, b)

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(one, reversed(list(ts))))
            w.commit()
            return w.direct()

    write("plain", False)
    calls = [0] if refuse_after is None else _refuse_direct_writes(monkeypatch, after=refuse_after)
    used = write("direct", True)
    monkeypatch.undo()
    assert _files(tmp_path / "direct") == _files(tmp_path / "plain")
    if _takes_direct_io(tmp_path):
        assert all(used) if refuse_after is None else calls[0] > refuse_after and not all(used)
    else:
        assert not any(used)


@pytest.mark.parametrize("ok_writes", [0, 1, 2, 5])
def test_direct_io_refused_at_open_or_midway_falls_back_to_the_same_bytes(tmp_path, monkeypatch, ok_writes):
    """A filesystem that refuses O_DIRECT when the file is opened, or after taking some
    direct writes (the blocks gathered until then are written the ordinary way)."""
    import errno
    import os

    ts = _odd_tensors([100_000, 3, 50_000, 7000, 4096, 99_999, 5, 1000, 60_000], 3)
    order = list(reversed(ts))  # ragged ends wait in their blocks for their neighbours
    via = {k: i % 2 == 0 for i, k in enumerate(ts)}
    _write(tmp_path / "plain", ts, order, via, 120_000, False)

    real_open = os.open

    def no_direct_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct_open)
    refused = _write(tmp_path / "refused", ts, order, via, 120_000, True)
    assert len(refused) > 1 and refused == [False] * len(refused)
    monkeypatch.setattr(os, "open", real_open)

    calls = _refuse_direct_writes(monkeypatch, after=ok_writes)
    used = _write(tmp_path / "midway", ts, order, via, 120_000, True)
    monkeypatch.undo()
    assert _files(tmp_path / "refused") == _files(tmp_path / "plain")
    assert _files(tmp_path / "midway") == _files(tmp_path / "plain")
    if _takes_direct_io(tmp_path):
        assert calls[0] > ok_writes and False in used
        if ok_writes == 0:
            assert not any(used)


def test_direct_io_default_follows_size_and_environment(tmp_path, monkeypatch):
    big = TensorEntry("big", (17 << 20,), torch.uint8)  # over the 16 MiB threshold
    small = TensorEntry("small", (1000,), torch.uint8)
    takes = _takes_direct_io(tmp_path)

    def used(name, entries):
        with CheckpointWriter(tmp_path / name, entries) as w:
            return w.direct()  # left uncommitted: the writer removes its folder

    monkeypatch.delenv("EVOMERGE_DIRECT_IO", raising=False)
    assert used("a", [big]) == [takes]
    assert used("b", [small]) == [False]
    monkeypatch.setenv("EVOMERGE_DIRECT_IO", "1")
    assert used("c", [small]) == [takes]
    monkeypatch.setenv("EVOMERGE_DIRECT_IO", "0")
    assert used("d", [big]) == [False]
    assert list(tmp_path.iterdir()) == []


def test_direct_writer_abort_leaves_nothing(tmp_path):
    ts = _odd_tensors([70_000, 5000], 1)
    entries = [TensorEntry(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", entries, direct_io=True) as w:
            w.add("t0", ts["t0"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_write_behind_lends_two_buffers_in_turn_and_waits_for_their_writes(tmp_path, monkeypatch):
    """A thread computes into one scratch buffer while the other's bytes are written;
    a buffer is lent again only once its write has finished."""
    import threading
    import time

    import evomerge.checkpoint as ck

    real = ck._ShardFile.write
    finished: dict[int, float] = {}
    seen_threads = set()

    def slow_write(self, offset, data, address=None):
        seen_threads.add(threading.current_thread().name)
        time.sleep(0.2)
        real(self, offset, data, address)
        finished[offset] = time.perf_counter()

    ts = {k: torch.full((5000,), float(i), dtype=torch.bfloat16) for i, k in enumerate("abc")}
    entries = [TensorEntry(k, (5000,), torch.bfloat16) for k in ts]
    with CheckpointWriter(tmp_path / "m", entries) as w:
        monkeypatch.setattr(ck._ShardFile, "write", slow_write)
        a = w.buffer("a")
        a.copy_(ts["a"])
        w.add("a", a)
        assert not finished  # returned before the (slow) write finished
        b = w.buffer("b")
        assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
        b.copy_(ts["b"])
        w.add("b", b)
        c = w.buffer("c")  # a's memory again, once a's bytes are out
        got = time.perf_counter()
        assert c.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
        assert len(finished) >= 1 and min(finished.values()) <= got
        c.copy_(ts["c"])
        w.add("c", c)
        w.commit()
    assert seen_threads and all(n.startswith("evomerge-write") for n in seen_threads)
    back = load_file(str(tmp_path / "m" / "model.safetensors"))
    for k, v in ts.items():
        assert torch.equal(back[k], v), k


def test_a_failed_background_write_fails_the_merge_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import evomerge.checkpoint as ck

    real = ck._ShardFile.write
    big = 100_000

    def full_disk(self, offset, data, address=None):
        if len(data) == big * 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, offset, data, address)

    monkeypatch.setattr(ck._ShardFile, "write", full_disk)
    entries = [TensorEntry("x", (big,), torch.bfloat16), TensorEntry("y", (10,), torch.bfloat16)]
    with pytest.raises(OSError, match="No space left"):
        with CheckpointWriter(tmp_path / "out", entries) as w:
            for e in entries:
                buf = w.buffer(e.name)
                buf.fill_(1.0)
                w.add(e.name, buf)  # x's failure shows at the latest when committing
            w.commit()
    assert list(tmp_path.iterdir()) == []


def _raw_safetensors(path, header, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}


@pytest.mark.parametrize("case,header,data,needle", [
    ("overlapping offsets", {"a": GOOD["a"], "b": {**GOOD["b"], "data_offsets": [4, 12]}}, bytes(16), "overlaps"),
    ("reversed offsets", {"a": GOOD["a"], "b": {**GOOD["b"], "data_offsets": [16, 8]}}, bytes(16), "begin <= end"),
    ("a gap", {"a": GOOD["a"], "b": {**GOOD["b"], "data_offsets": [12, 20]}}, bytes(20), "gap of 4 bytes"),
    ("bytes against shape", {"a": {**GOOD["a"], "shape": [3]}, "b": GOOD["b"]}, bytes(16), "needs 12"),
    ("past the end", GOOD, bytes(12), "truncated"),
    ("trailing bytes", GOOD, bytes(20), "trailing"),
    ("header a list", [1, 2], bytes(0), "JSON list, not an object"),
    ("header not JSON", None, bytes(0), "not JSON"),
    ("unknown dtype", {"a": {**GOOD["a"], "dtype": "F8_E9"}, "b": GOOD["b"]}, bytes(16), "unknown dtype"),
    ("negative dimension", {"a": {**GOOD["a"], "shape": [-2]}, "b": GOOD["b"]}, bytes(16), "non-negative"),
])
def test_a_safetensors_header_that_lies_is_refused_naming_file_and_tensor(tmp_path, case, header, data, needle):
    """Merging from a header whose offsets overlap would read another tensor's bytes (the
    safetensors library refuses such files; so does every read here)."""
    from safetensors import safe_open

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    f = folder / "model.safetensors"
    if header is None:
        f.write_bytes((5).to_bytes(8, "little") + b"{nope")
    else:
        _raw_safetensors(f, header, data)
    with pytest.raises(CheckpointError, match=needle) as err:
        Checkpoint(folder).read("a")
    assert "model.safetensors" in str(err.value)
    with pytest.raises(Exception):  # the reference library agrees that the file is bad
        with safe_open(str(f), "pt") as g:
            [g.get_tensor(k) for k in g.keys()]
    _raw_safetensors(f, GOOD, torch.arange(4, dtype=torch.float32).numpy().tobytes())
    assert Checkpoint(folder).get("b").tolist() == [2.0, 3.0]  # the well-formed file reads
