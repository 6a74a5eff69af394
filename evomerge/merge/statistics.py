"""Statistics from data, for the merges that need them: computed once per model and data,
cached on disk.

A data-aware merge (Fisher-weighted averaging, RegMean) reads, besides the weights, a
statistic of each model on data. A ``Statistic`` computes one from a live model and batches
of ``(input_ids, attention_mask)`` or ``(input_ids, attention_mask, scored)``, where
``scored`` marks the tokens whose log-likelihood (given their prefix) a Fisher sums
(``examples(spec, tokenizer)`` makes them from a recipe's ``data`` file, the ``target``
field's tokens scored; ``batches(evaluator, tokenizer, split)`` from an evaluator's
unlabeled inputs, encoded as every evaluator encodes prompts), as tensors keyed by the
model's own tensor names:

- ``gram``: for every linear layer (``nn.Linear``, and GPT-2's ``Conv1D``), the Gram
  matrix ``X^T X`` of the inputs it sees over every real (unpadded) token, collected by
  forward hooks in one pass, with the number of tokens and the weight's layout (RegMean's
  statistic; Jin et al. 2023, https://arxiv.org/abs/2212.09849);
- ``fisher``: the diagonal of the Fisher information, the mean over sequences of the
  squared gradient of each sequence's log-likelihood of its scored tokens: the data's own
  tokens (the empirical Fisher) or tokens sampled from the model's predictions (Matena &
  Raffel 2022, https://arxiv.org/abs/2111.09832).

``compute(statistic, model, batches, cache=..., model_key=...)`` returns a statistic, read
from the cache when one was made for the same statistic (and settings), model and data:
the key hashes the statistic's name and settings, ``model_key`` (``model_fingerprint`` of
its folder: file names, sizes, modification times and safetensors headers, so a rewritten
checkpoint is a new model) and every token id and mask bit. Entries are a safetensors file
and a JSON record, written atomically; nothing is read back through pickle. A merge
method names the statistics it needs in its registry entry (``MethodSpec.statistics``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor

__all__ = ["Statistic", "GramMatrix", "FisherDiagonal", "STATISTICS", "SEQUENTIAL", "StatisticCache", "compute",
           "batches", "examples", "records", "model_fingerprint", "TensorMap", "load_streamed"]

Batch = tuple[Tensor, ...]  # (input_ids, attention_mask[, scored]), right-padded


class Statistic(Protocol):
    """Per-tensor data of one model on batches of inputs."""

    name: str

    def settings(self) -> dict: ...

    def __call__(self, model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, Tensor]: ...


def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear layers by the name of their weight: ``nn.Linear`` (weight ``[out, in]``) and
    transformers' ``Conv1D`` (GPT-2; weight ``[in, out]``)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            out[f"{name}.weight" if name else "weight"] = mod
    return out


class GramMatrix:
    """``X^T X`` of each linear layer's inputs over the real tokens of every batch, in
    float64 (``dtype``), with the number of tokens under ``<weight name>:tokens`` and the
    weight's layout under ``<weight name>:in_first`` (1 for ``Conv1D``'s ``[in, out]``, 0
    for ``nn.Linear``'s ``[out, in]``).

    A layer reached twice in one forward pass (a tied head, a shared block) adds both."""

    name = "gram"
    forward_only = True  # (its model may be streamed block by block: ``load_streamed``)

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype

    def settings(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "layout": 1}

    @torch.no_grad()
    def __call__(self, model, batches):
        layers = _linear_layers(model)
        if not layers:
            raise ValueError("the model has no linear layers to collect Gram matrices from")
        grams: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        mask_now: list[Tensor] = []
        last: dict[str, object] = {}  # the input the previous hook saw, and its Gram matrix

        def hook(name):
            def fn(module, args):
                x = args[0]
                if last.get("x") is x:  # q, k and v (gate and up) read one tensor: one product
                    g, rows = last["g"], last["rows"]
                else:
                    flat = x.reshape(-1, x.shape[-1])
                    keep = mask_now[0].reshape(-1).bool()
                    if keep.numel() == flat.shape[0]:  # one row per token: the padding's rows go
                        flat = flat[keep]
                    flat = flat.to(self.dtype)
                    g, rows = (flat.T @ flat).cpu(), flat.shape[0]  # (summed on the CPU: a GPU holds no sums)
                    last.update(x=x, g=g, rows=rows)
                grams[name] = g.clone() if name not in grams else grams[name] + g
                counts[name] = counts.get(name, 0) + rows
            return fn

        handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in layers.items()]
        try:
            dev = next(model.parameters()).device
            for ids, mask, *_ in batches:
                mask_now[:] = [mask.to(dev)]
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        finally:
            last.clear()
            for h in handles:
                h.remove()
        out = dict(grams)
        out.update({f"{n}:tokens": torch.tensor(c, dtype=torch.int64) for n, c in counts.items()})
        out.update({f"{n}:in_first": torch.tensor(int(not isinstance(layers[n], torch.nn.Linear)), dtype=torch.int64)
                    for n in grams})
        return out


class FisherDiagonal:
    """The Fisher information's diagonal: for each floating-point parameter, the mean over
    sequences of ``(d log p / d theta)^2``, where ``log p`` sums the log probabilities of a
    sequence's scored tokens given their prefix (a batch's ``scored`` mask; without one,
    every real token after the first). ``kind="empirical"`` scores the data's own tokens;
    ``kind="sampled"`` scores, at each scored position, a token drawn from the model's own
    prediction there (seeded by ``seed`` and the sequence's position in the data). One
    backward pass per sequence (padding stripped), so the value does not depend on how
    sequences were batched."""

    name = "fisher"
    forward_only = False  # (a backward pass reads every weight again)

    def __init__(self, kind: str = "empirical", seed: int = 0):
        if kind not in ("empirical", "sampled"):
            raise ValueError(f"fisher: kind must be 'empirical' or 'sampled', not {kind!r}")
        self.kind, self.seed = kind, int(seed)

    def settings(self) -> dict:
        return {"kind": self.kind, **({"seed": self.seed} if self.kind == "sampled" else {})}

    def __call__(self, model, batches):
        params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        was_training = model.training
        model.eval()
        requires = {n: p.requires_grad for n, p in params.items()}
        seen = rows = 0
        grad_was = torch.is_grad_enabled()
        torch.set_grad_enabled(True)  # also when called under no_grad (a merge into a live model)
        try:
            for p in params.values():
                p.requires_grad_(True)
            dev = next(model.parameters()).device
            for batch in batches:
                ids, mask = batch[0], batch[1]
                scored = batch[2] if len(batch) > 2 else mask
                for row, m, sc in zip(ids, mask, scored):
                    keep = m.bool()
                    tokens = row[keep].to(dev)
                    pick = sc[keep].bool().to(dev)[1:]  # the first token has no prefix
                    rows += 1
                    if not bool(pick.any()):
                        continue  # nothing to score
                    model.zero_grad(set_to_none=True)
                    out = model(input_ids=tokens[None], use_cache=False)
                    logits = out.logits if hasattr(out, "logits") else out
                    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)[pick]
                    if self.kind == "sampled":
                        g = torch.Generator().manual_seed(self.seed * 1_000_003 + rows)
                        targets = torch.multinomial(logp.detach().exp().cpu(), 1, generator=g).to(dev)
                    else:
                        targets = tokens[1:][pick, None]
                    logp.gather(1, targets).sum().backward()
                    for n, p in params.items():
                        if p.grad is not None:
                            acc[n] += p.grad.detach().to(torch.float64) ** 2
                    seen += 1
        finally:
            torch.set_grad_enabled(grad_was)
            model.zero_grad(set_to_none=True)
            for n, p in params.items():
                p.requires_grad_(requires[n])
            model.train(was_training)
        if not seen:
            raise ValueError("no sequence with a token to score (two or more tokens, or a target) to compute a "
                             "Fisher information from")
        out = {n: a / seen for n, a in acc.items()}
        out["sequences"] = torch.tensor(seen, dtype=torch.int64)
        return out


STATISTICS = {"gram": GramMatrix, "fisher": FisherDiagonal}


def batches(evaluator, tokenizer, split: str = "search", batch_size: int = 16) -> list[Batch]:
    """An evaluator's unlabeled inputs of ``split`` (``evaluator.inputs``), encoded as every
    evaluator encodes prompts, in right-padded batches."""
    from ..evaluate.entropy import encode_prompts

    if not hasattr(evaluator, "inputs"):
        raise ValueError(f"{type(evaluator).__name__} offers no unlabeled inputs (evaluator.inputs)")
    prompts = list(evaluator.inputs(split))
    if not prompts:
        raise ValueError(f"no unlabeled inputs in split {split!r}")
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(encode_prompts(tokenizer, prompts[i:i + batch_size]))
    return out


def records(spec) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each example of a recipe's ``data`` (``recipe.DataSpec``):
    the lines of its JSON-lines file (``where`` is ``path:line``), or the rows of its
    ``datasets`` dataset, streamed (``where`` names the dataset, split and row). A source
    that cannot be read is a ``ValueError`` naming it."""
    from ..evaluate._common import jsonl_records

    if spec.path is not None:
        path = Path(spec.path)
        if not path.exists():
            raise ValueError(f"data file '{path}' not found")
        if not path.is_file():
            raise ValueError(f"data file '{path}' is not a file")
        for lineno, rec in jsonl_records(path):
            yield f"{path}:{lineno}", rec
        return
    import datasets

    what = spec.describe()
    try:  # streamed: only the rows read are fetched; no dataset script runs
        rows = datasets.load_dataset(spec.dataset, spec.subset, split=spec.split, revision=spec.revision,
                                     streaming=True)
        it = iter(rows)
    except Exception as e:  # noqa: BLE001 - not found, offline, a bad split or subset
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{what} cannot be read: {type(e).__name__}: {first}") from None
    i = 0
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a file of it that does not parse
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"{what}, row {i}: {type(e).__name__}: {first}") from None
        yield f"{what}, row {i}", dict(rec)
        i += 1


def examples(spec, tokenizer, max_length: int | None = None) -> list[Batch]:
    """A recipe's ``data`` (``recipe.DataSpec``) as right-padded batches ``(input_ids,
    attention_mask, scored)``: the first ``spec.limit`` records of its JSON-lines file or
    dataset (``records``), each ``spec.text`` followed by ``spec.target`` when given, encoded
    as the evaluators encode a prompt and its answer; ``scored`` marks the target's tokens
    (without a target, every token). A missing file or field, a record that is not an
    object, an empty text, a record longer than ``max_length`` tokens (the model's
    positions), a file that is not UTF-8: a ``ValueError`` naming the file (or dataset), line
    (or row) and field."""
    from ..evaluate._batch import encode_continuations
    from ..evaluate._common import pad_token_id

    texts, targets, lines = [], [], []
    for where, rec in records(spec):  # (read no further than the limit-th record)
        for field, what in ((spec.text, "text"), (spec.target, "target")):
            if field is None:
                continue
            if field not in rec:
                raise ValueError(f"{where}: no field {field!r} (the data's {what}); fields: "
                                 f"{', '.join(map(repr, rec)) or '(none)'}")
            if not isinstance(rec[field], str) or (what == "text" and not rec[field]):
                raise ValueError(f"{where}: field {field!r} must be "
                                 f"{'a non-empty string' if what == 'text' else 'a string'}")
        texts.append(rec[spec.text])
        targets.append(rec[spec.target] if spec.target is not None else "")
        lines.append(where)
        if len(texts) >= spec.limit:
            break
    if not texts:
        raise ValueError(f"{spec.describe()} has no records")
    ctx, cont = encode_continuations(tokenizer, texts, targets)
    if spec.target is None:  # every token is scored, the first having no prefix
        ctx, cont = [c[:1] for c in ctx], [c[1:] + t for c, t in zip(ctx, cont)]
    for c, t, where in zip(ctx, cont, lines):
        if max_length is not None and len(c) + len(t) > max_length:
            raise ValueError(f"{where}: {len(c) + len(t)} tokens, more than the model's {max_length} "
                             "positions; shorten the record")
    pad = pad_token_id(tokenizer)
    out = []
    for i in range(0, len(texts), spec.batch_size):
        rows = [(c, t) for c, t in zip(ctx[i:i + spec.batch_size], cont[i:i + spec.batch_size])]
        width = max(len(c) + len(t) for c, t in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (c, t) in enumerate(rows):
            ids[r, :len(c) + len(t)] = torch.tensor(c + t, dtype=torch.long)
            mask[r, :len(c) + len(t)] = 1
            scored[r, len(c):len(c) + len(t)] = 1
        out.append((ids, mask, scored))
    return out


def model_fingerprint(folder: str | Path, contents: bool = False) -> str:
    """A key for a model folder's weights: each weight file's name, size, modification time
    and (for safetensors) header, and the config; with ``contents``, every weight byte too
    (BLAKE2b, about a second per GB read), so that two checkpoints of the same names, sizes
    and times (copies with fixed timestamps) never share a key."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise ValueError(f"model '{folder}': no weight files to fingerprint")
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100_000_000)))
        elif p.name == "config.json":
            h.update(p.read_bytes())
        if contents and p.suffix in (".safetensors", ".bin"):
            h.update(_file_digest(p).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    d = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            d.update(chunk)
    return d.hexdigest()


def _data_key(data: Sequence[Batch]) -> str:
    h = hashlib.sha256()
    for batch in data:
        h.update(str(len(batch)).encode())
        for t in batch:
            t = t.detach().to("cpu", torch.int64).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


class StatisticCache:
    """Statistics on disk under ``root``: one folder per (statistic, settings, model, data)
    key, holding ``values.safetensors`` and ``record.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, stat: Statistic, model_key: str, data: Sequence[Batch]) -> str:
        what = {"statistic": stat.name, "settings": stat.settings(), "model": model_key, "data": _data_key(data)}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def _dir(self, stat: Statistic, key: str) -> Path:
        return self.root / f"{stat.name}-{key[:24]}"

    def get(self, stat: Statistic, key: str, lazy: bool = False) -> Mapping[str, Tensor] | None:
        """The cached values, or None (absent, or unreadable: then it is made again); with
        ``lazy``, a ``TensorMap`` that reads each tensor from the file when asked for."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = self._dir(stat, key)
        try:
            record = json.loads((d / "record.json").read_text())
            if record.get("key") != key or record.get("digest") != _file_digest(d / "values.safetensors"):
                return None  # another entry, or values changed since they were written: made again
            return TensorMap.of_file(d / "values.safetensors") if lazy else load_file(d / "values.safetensors")
        except (OSError, ValueError, SafetensorError):
            return None

    def put(self, stat: Statistic, key: str, values: dict[str, Tensor], record: dict) -> None:
        """Write an entry atomically: a temporary folder, renamed into place."""
        import shutil
        import tempfile

        from safetensors.torch import save_file

        from ..trials import atomic_write

        self.root.mkdir(parents=True, exist_ok=True)
        d = self._dir(stat, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-{os.getpid()}-", dir=self.root))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, tmp / "values.safetensors")
            record = {**record, "key": key, "digest": _file_digest(tmp / "values.safetensors")}
            atomic_write(tmp / "record.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(d, ignore_errors=True)  # a damaged entry of the same key
            try:
                os.replace(tmp, d)
            except OSError:  # another process wrote the same entry meanwhile: theirs stays
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class TensorMap(Mapping):
    """Named tensors made when asked for (``get(name)``), none held: the statistics of a
    merge read tensor by tensor from the cache's file (``of_file``), or another map's values
    through a function (``through``)."""

    def __init__(self, names: Iterable[str], get: Callable[[str], Tensor]):
        self._names = list(names)
        self._set = set(self._names)
        self._get = get

    @classmethod
    def of_file(cls, path: str | Path) -> "TensorMap":
        """A safetensors file's tensors, each read by positional reads into memory of its
        own when asked for (no mapping of the file, whose pages would stay with the process)."""
        from ..checkpoint import _SafetensorsFile

        handle = _SafetensorsFile(Path(path))
        return cls(list(handle.keys()), handle.read)

    def through(self, fn: Callable[[str, Tensor], Tensor]) -> "TensorMap":
        """The map of ``fn(name, value)``."""
        return TensorMap(self._names, lambda n: fn(n, self[n]))

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._set:
            raise KeyError(name)
        return self._get(name)

    def __contains__(self, name) -> bool:
        return name in self._set

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def compute(stat: Statistic, model, data: Sequence[Batch], *, cache: StatisticCache | None = None,
            model_key: str | None = None, dtypes: Sequence[str] | None = None,
            lazy: bool = False) -> Mapping[str, Tensor]:
    """``stat`` of ``model`` on ``data`` (on the CPU), from ``cache`` when it holds one for
    the same statistic, settings, model (``model_key``, e.g. ``model_fingerprint(folder)``,
    and the dtypes it runs in) and data; computed, and cached, otherwise. Without a cache
    or a model key, it is computed. ``model`` may be a function that loads it, called only
    when the statistic is computed; then ``dtypes`` (the floating-point dtypes it will run
    in, as ``str(torch.float32)``) names its precision for the key. With ``lazy``, what the
    cache holds comes back as a ``TensorMap`` reading each tensor when asked for (computed
    values are written, then read back so: only one statistic in memory at a time)."""
    data = list(data)
    live = (lambda: model) if not callable(model) or isinstance(model, torch.nn.Module) else model
    if cache is None or model_key is None:
        return {k: v.cpu() for k, v in stat(live(), data).items()}
    if dtypes is None:  # the precision the model runs in changes the values: part of the model's key
        m = live()
        dtypes = sorted({str(p.dtype) for p in m.parameters() if p.is_floating_point()})
        live = lambda: m  # noqa: E731
    key = cache.key(stat, f"{model_key}:{','.join(sorted(dtypes))}", data)
    hit = cache.get(stat, key, lazy=lazy)
    if hit is not None:
        return hit
    values = {k: v.cpu() for k, v in stat(live(), data).items()}
    try:
        cache.put(stat, key, values, {"statistic": stat.name, "settings": stat.settings(), "model": model_key,
                                      "batches": len(data), "tensors": len(values)})
    except OSError as e:  # a cache that cannot be written: the values stand, only not kept
        import warnings

        warnings.warn(f"statistics cache '{cache.root}' cannot be written ({e}); the {stat.name} statistic "
                      "is not kept for the next merge", stacklevel=2)
        return values
    if lazy:
        back = cache.get(stat, key, lazy=True)
        if back is not None:
            return back
    return values


def _trim() -> None:
    """Hand the memory just freed back to the system (glibc keeps freed blocks of up to its
    adaptive mmap threshold, tens of MB, in its heap: a streamed model's blocks would pile up
    there); nothing where the C library has no ``malloc_trim``."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def load_streamed(folder: str | Path, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> torch.nn.Module:
    """A causal LM of ``folder`` for forward passes only (statistics, activations) whose
    decoder blocks hold their weights only while a forward pass is inside them: each block
    reads its own tensors from the checkpoint (in ``dtype``) as the pass enters it and lets
    them go as the pass leaves, so one block's weights are in memory at a time, besides the
    embeddings, the final norm and the head. A backward pass through it fails (its weights
    are gone by then). With ``model.hold_blocks`` set, a block keeps its weights after a pass
    (several passes through one block read them once) until ``block.release_weights()``. A
    checkpoint of pickled weights, or whose names are not the model's own, is loaded whole.
    It runs on ``device``, where each block's weights are read to."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..checkpoint import Checkpoint, split_layer

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    try:
        ck = Checkpoint.open(str(folder), allow_download=False, allow_pickle=True)
    except Exception:  # noqa: BLE001 - not a folder it reads: transformers loads it whole
        ck = None
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    model.tie_weights()
    params = dict(model.named_parameters())  # (a tied head is named once)
    stored = set(ck.names()) if ck is not None else set()
    if ck is None or any(str(f).endswith(".bin") for f in ck.weight_map.values()) or not set(params) <= stored \
            or not any(split_layer(n) is not None for n in params):
        # (pickled weights, which the merge accepted with --allow-pickle, or other names)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    blocks: dict[str, list[str]] = {}
    with torch.no_grad():
        for n, p in params.items():
            lay = split_layer(n)
            if lay is None:
                p.data = ck.get(n).to(dtype)
            else:
                blocks.setdefault(f"{lay.stack}.{lay.index}", []).append(n)
                p.data = torch.empty(0, dtype=dtype)
    model.to(device)  # (the embeddings, head and buffers: the blocks hold nothing yet)

    def enter(names):
        def hook(module, args):
            for n in names:
                if params[n].numel() == 0:  # (still there after a pass stopped inside the block)
                    params[n].data = ck.get(n, device).to(dtype)
        return hook

    def leave(names):
        def hook(module, args, output):
            if not getattr(model, "hold_blocks", False):
                free(names)
        return hook

    def free(names):
        for n in names:
            params[n].data = torch.empty(0, dtype=dtype, device=device)
        _trim()

    for prefix, names in blocks.items():
        block = model.get_submodule(prefix)
        block.register_forward_pre_hook(enter(names))
        block.register_forward_hook(leave(names))
        block.release_weights = lambda names=names: free(names)  # (after passes made with ``hold_blocks`` set)
    model.hold_blocks = False  # True: a block keeps its weights after a pass, for the next pass through it
    return model.eval()


# Statistics of the merge itself: measured layer by layer on the merged model as it is built
# (``Merger._merged_inputs``), for each candidate, never cached. Per linear layer and model:
SEQUENTIAL = {
    "merged_grams": "(G, in_first): G = Xm^T Xm / n over the inputs Xm the layer sees in the merged model",
    "merged_inputs": "(G, C, in_first): G as above and C = Xm^T X / n, X the inputs the layer sees in the model",
}
