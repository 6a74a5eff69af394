"""Checkpoint I/O: lazy tensor-by-tensor reading of Hugging Face model folders, layer
grouping for any architecture, and atomic sharded safetensors writing.

Reading: ``Checkpoint.open(ref)`` accepts a local folder (single ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``) or a hub id, fetched through
``huggingface_hub`` where a network exists. Tensors are read from the safetensors header
directly: as copies (positional reads) or as read-only memory-mapped views whose pages
are released after use. Pickled ``.bin`` weights are refused unless ``allow_pickle=True``,
and then loaded with ``weights_only=True``.

Layers: a tensor belongs to a layer when its name has a numeric path component
(``model.layers.7.mlp.up_proj.weight``, ``transformer.h.3.attn.c_attn.weight``,
``encoder.layer.2...``, ``decoder.block.5...``): the part before it names the stack, the
number the layer. Everything else is its own group: embeddings, or the head (final norm,
output projection, pooler).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "TensorEntry",
    "LayerName",
    "split_layer",
    "tensor_group",
    "parse_size",
    "TOKENIZER_FILES",
]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
)

_ST_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class CheckpointError(RuntimeError):
    """A model folder or tensor that cannot be used; the message names it."""


# --------------------------------------------------------------------------------------
# Layer grouping
# --------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^(?P<stack>(?:[^.]+\.)*?[^.]+)\.(?P<idx>\d+)\.(?P<rest>.+)$")
_EMBED_HINTS = ("embed", "wte", "wpe", "shared", "word_embeddings", "position_embeddings",
                "token_type_embeddings", "tok_embeddings", "pre_layrnorm", "pre_layernorm")  # (CLIP's, before its layers)


@dataclass(frozen=True)
class LayerName:
    """``stack.index.rest``: ``model.layers`` / ``7`` / ``mlp.up_proj.weight``."""

    stack: str
    index: int
    rest: str

    def with_index(self, index: int) -> str:
        return f"{self.stack}.{index}.{self.rest}"


def split_layer(name: str) -> LayerName | None:
    """The layer a tensor belongs to: the first numeric path component of its name."""
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return LayerName(m["stack"], int(m["idx"]), m["rest"])


def tensor_group(name: str) -> str:
    """``layers`` for repeated blocks, ``embed`` for embeddings, ``head`` for the rest."""
    if split_layer(name) is not None:
        return "layers"
    low = name.lower()
    if any(h in low for h in _EMBED_HINTS):
        return "embed"
    return "head"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def model_folder(ref, allow_download: bool = True) -> Path:
    """The local folder of a model: a folder as it is, a hub id (``org/name``, optionally
    ``org/name@revision``) from the hub's cache or a download."""
    return _resolve_folder(ref, allow_download)


MODEL_KINDS = ("causal_lm", "vision")


def live_class(folder: str | Path, kind: str = "causal_lm"):
    """The transformers class a live model of ``folder`` is built with, for an evaluator
    that reads ``kind`` of model: ``AutoModelForCausalLM`` for a causal LM; for a vision
    encoder, the class its ``config.json`` names (``architectures``: ``CLIPVisionModel``,
    ``ViTForImageClassification``, ...), taken from transformers itself and never from
    code shipped with the model, else ``AutoModel``."""
    import transformers

    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; one of {MODEL_KINDS}")
    if kind == "causal_lm":
        return transformers.AutoModelForCausalLM
    try:
        names = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model '{folder}': its config.json cannot be read ({e})") from None
    cls = getattr(transformers, str(names[0]), None) if names else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return transformers.AutoModel


def live_names(model) -> dict[str, str]:
    """``{checkpoint name: the live model's name}`` of every parameter and buffer of a
    transformers model. transformers may rename a checkpoint's tensors as it loads them
    (and back as it saves them: a ViT's ``attention.attention.query`` is its module's
    ``attention.q_proj``); the merge reads and writes checkpoints, so it binds a live model
    through those renamings. Tensors a model converts in other ways (split, fused) keep
    their live names, and a merge that needs them says which is missing."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    out = {n: n for n in named}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 loads checkpoints by their own names
        return out
    try:
        saved = revert_weight_conversion(model, dict(named))
    except Exception:  # noqa: BLE001 - a conversion that cannot be reverted: the live names
        return out
    name_of = {id(t): n for n, t in named.items()}
    for ck, t in saved.items():
        live = name_of.get(id(t))
        if live is not None and ck != live:
            out.pop(live, None)
            out[ck] = live
    return out


def build_from_config(cls, config, dtype=None):
    """A model of ``cls`` (an Auto class or a concrete one) from ``config``."""
    if hasattr(cls, "from_config") and cls.__name__.startswith("Auto"):
        return cls.from_config(config, dtype=dtype)
    return cls._from_config(config, dtype=dtype)


def _resolve_folder(ref, allow_download: bool = True) -> Path:
    if isinstance(ref, (str, os.PathLike)) and not Path(ref).expanduser().is_dir():
        from .recipe import ModelRef

        ref = ModelRef.parse(ref, "model")  # "org/name@revision"
    path = Path(str(getattr(ref, "path", ref))).expanduser()
    revision = getattr(ref, "revision", None)
    if path.is_dir():
        return path
    looks_local = str(path).startswith((".", "/", "~")) or path.exists() or str(path).count("/") > 1
    if looks_local or not allow_download:
        raise CheckpointError(f"model '{ref}': no such folder: {path}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(path), revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:  # offline, unknown repo, no access
        raise CheckpointError(
            f"model '{ref}': not a local folder, and the hub could not provide it "
            f"({type(e).__name__}: {e})"
        ) from None
    return Path(local)


class Checkpoint:
    """A model folder read lazily: tensors are loaded one at a time on request.

    Args:
        folder: the model folder.
        name: how errors name the model (defaults to the folder).
        allow_pickle: accept ``pytorch_model*.bin`` (loaded with ``weights_only=True``).
    """

    def __init__(self, folder: str | Path, name: str | None = None, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.name = name or str(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"model '{self.name}': no config.json in {self.folder}")
        try:
            self.config = json.loads(cfg.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"model '{self.name}': config.json is not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"model '{self.name}': config.json is a JSON {type(self.config).__name__}, "
                                  "not an object")
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()  # merges read tensors from several threads
        self.weight_map = self._index(allow_pickle)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    @classmethod
    def open(cls, ref, allow_pickle: bool = False, allow_download: bool = True) -> "Checkpoint":
        """Open a ``ModelRef``, path or hub id."""
        return cls(_resolve_folder(ref, allow_download), name=str(ref), allow_pickle=allow_pickle)

    # index ------------------------------------------------------------------------------
    def _index(self, allow_pickle: bool) -> dict[str, str]:
        f = self.folder
        if (f / SAFE_INDEX).is_file():
            return self._read_index(f / SAFE_INDEX)
        if (f / SAFE_SINGLE).is_file():
            return {k: SAFE_SINGLE for k in self._handle(SAFE_SINGLE).keys()}
        singles = sorted(p.name for p in f.glob("*.safetensors"))
        if singles:
            out: dict[str, str] = {}
            for s in singles:
                for k in self._handle(s).keys():
                    out[k] = s
            return out
        pickled = (f / PICKLE_INDEX).is_file() or (f / PICKLE_SINGLE).is_file()
        if pickled:
            if not allow_pickle:
                raise CheckpointError(
                    f"model '{self.name}': only pickled weights (pytorch_model*.bin) were found; "
                    "pickle files can run code when loaded, so they are refused. Convert them to "
                    "safetensors, or pass --allow-pickle to load them with weights_only=True"
                )
            if (f / PICKLE_INDEX).is_file():
                return self._read_index(f / PICKLE_INDEX)
            return {k: PICKLE_SINGLE for k in self._load_pickle(PICKLE_SINGLE)}
        raise CheckpointError(f"model '{self.name}': no weights (*.safetensors) in {self.folder}")

    def _read_index(self, p: Path) -> dict[str, str]:
        try:
            wm = json.loads(p.read_bytes().decode("utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"model '{self.name}': {p.name} is not a valid index ({e})") from None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"model '{self.name}': the weight_map of {p.name} is not an object of file names")
        for shard in set(wm.values()):
            # a file of this folder, by its plain name: never a path out of it
            if Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointError(f"model '{self.name}': {p.name} names the shard {shard!r}, which is not a file "
                                      "of the model's folder")
            if not (self.folder / shard).is_file():
                raise CheckpointError(f"model '{self.name}': shard {shard} listed in {p.name} is missing")
        return dict(wm)

    def _handle(self, file: str) -> "_SafetensorsFile":
        h = self._handles.get(file)
        if h is None:
            with self._lock:
                h = self._handles.get(file)
                if h is None:
                    try:
                        h = _SafetensorsFile(self.folder / file)
                    except (OSError, ValueError) as e:
                        raise CheckpointError(f"model '{self.name}': cannot read {file}: {e}") from None
                    self._handles[file] = h
        return h

    def _load_pickle(self, file: str) -> dict[str, torch.Tensor]:
        d = self._pickled.get(file)
        if d is None:
            with self._lock:
                d = self._pickled.get(file)
                if d is None:
                    try:
                        d = torch.load(self.folder / file, map_location="cpu", weights_only=True, mmap=True)
                    except Exception as e:
                        raise CheckpointError(
                            f"model '{self.name}': cannot load {file} with weights_only=True: {e}") from None
                    self._pickled[file] = d
        return d

    # tensors ----------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype name of a tensor, without reading its data."""
        m = self._meta.get(name)
        if m is None:
            file = self._file(name)
            if file.endswith(".safetensors"):
                info = self._shard_header(file, name)
                m = (tuple(info["shape"]), _ST_NAMES.get(info["dtype"], info["dtype"].lower()))
            else:
                t = self._load_pickle(file)[name]
                m = (tuple(t.shape), str(t.dtype).replace("torch.", ""))
            self._meta[name] = m
        return m

    def _shard_header(self, file: str, name: str) -> dict:
        header = self._handle(file).header
        if name not in header:
            raise CheckpointError(f"model '{self.name}': the index maps tensor '{name}' to {file}, which does not "
                                  "hold it")
        return header[name]

    def _file(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"model '{self.name}': tensor '{name}' is missing") from None

    def get(self, name: str, device: str | torch.device = "cpu", copy: bool = True) -> torch.Tensor:
        """Read one tensor. ``copy=True``: into memory of its own (positional reads).
        ``copy=False``: a read-only view of the memory-mapped file, for code that only
        reads it; call ``release(name)`` when done so its pages leave this process."""
        file = self._file(name)
        if file.endswith(".safetensors"):
            self._shard_header(file, name)
            try:
                h = self._handle(file)
                t = h.read(name) if copy or str(device) != "cpu" else h.view(name)
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"model '{self.name}': cannot read tensor '{name}' from {file}: {e}") from None
        else:
            t = self._load_pickle(file)[name]
        return t if str(device) == "cpu" else t.to(device, non_blocking=True)

    def release(self, name: str) -> None:
        file = self.weight_map.get(name)
        if file is not None and file.endswith(".safetensors"):
            self._handle(file).release(name)

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / n for n in TOKENIZER_FILES if (self.folder / n).is_file()]

    def num_layers(self) -> dict[str, int]:
        """Layers per stack, counted from the tensor names."""
        out: dict[str, set[int]] = {}
        for n in self.weight_map:
            ln = split_layer(n)
            if ln is not None:
                out.setdefault(ln.stack, set()).add(ln.index)
        return {k: max(v) + 1 for k, v in out.items()}

    def architecture(self) -> str:
        arch = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(arch[0])


def _check_layout(header: dict, data_bytes: int) -> None:
    """What the safetensors library checks before reading a tensor: every entry has a known
    dtype, a shape of non-negative integers and ``[begin, end]`` offsets whose length is the
    shape's size times the dtype's; the tensors tile the data section exactly (in offset
    order, each begins where the last ended: no gap, no overlap, nothing past the end)."""
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"tensor '{name}': its header entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_NAMES:
            raise ValueError(f"tensor '{name}': unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ValueError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor '{name}': data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
        size = getattr(torch, _ST_NAMES[dtype]).itemsize
        for d in shape:
            size *= d
        if offsets[1] - offsets[0] != size:
            raise ValueError(f"tensor '{name}': data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape "
                             f"{shape} of {dtype} needs {size}")
        spans.append((offsets[0], offsets[1], name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise ValueError(f"tensor '{name}': data_offsets [{begin}, {end}] {what}")
        at = end
    if at != data_bytes:
        raise ValueError(f"the tensors' data_offsets end at byte {at} but the file holds {data_bytes} bytes of data "
                         + ("(truncated?)" if at > data_bytes else "(trailing bytes)"))


class _SafetensorsFile:
    """The header of a safetensors file, and positional reads of its tensors."""

    def __init__(self, path: Path):
        self._fd: int | None = None  # first: __del__ runs even when the header is refused
        self._mm = None
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("not a safetensors file (too short)")
            size = int.from_bytes(raw, "little")
            if size > 100_000_000:
                raise ValueError("not a safetensors file (header size)")
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        self.header: dict = header
        self.data_start = 8 + size
        self.file_size = path.stat().st_size
        _check_layout(header, self.file_size - self.data_start)
        self._lock = threading.Lock()

    def keys(self):
        return self.header.keys()

    def _info(self, name: str):
        info = self.header[name]
        dtype = _DTYPES.get(_ST_NAMES.get(info["dtype"], ""), None) or getattr(torch, _ST_NAMES[info["dtype"]])
        begin, end = info["data_offsets"]
        if self.data_start + end > self.file_size:
            raise ValueError(f"tensor '{name}' lies past the end of the file (truncated?)")
        return dtype, info["shape"], self.data_start + begin, end - begin

    @staticmethod
    def _typed(buf: torch.Tensor, dtype, shape) -> torch.Tensor:
        return buf.view(dtype).reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        """A copy of the tensor in memory of its own (positional reads)."""
        dtype, shape, offset, nbytes = self._info(name)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            if self._fd is None:
                with self._lock:
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY)
            view = memoryview(buf.numpy())
            done = 0
            while done < nbytes:
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got <= 0:
                    raise ValueError(f"short read of tensor '{name}'")
                done += got
        return self._typed(buf, dtype, shape)

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a read-only view of the memory-mapped file (no copy). Writing
        into it is an error; ``release`` drops its pages from this process."""
        dtype, shape, offset, nbytes = self._info(name)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if self._mm is None:
            import mmap

            with self._lock:
                if self._mm is None:
                    with open(self.path, "rb") as f:
                        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": views are only read
            buf = torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes, offset=offset)
        return self._typed(buf, dtype, shape)

    def release(self, name: str) -> None:
        """Unmap the whole pages of a tensor read through ``view`` (they stay in the page
        cache), so a streamed merge keeps only what it is working on resident."""
        if self._mm is None:
            return
        import mmap

        _, _, offset, nbytes = self._info(name)
        page = mmap.PAGESIZE
        start = -(-offset // page) * page
        stop = (offset + nbytes) // page * page
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def __del__(self):
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def parse_size(s: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes."""
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if isinstance(s, int) and not isinstance(s, bool):
        n = s
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(s))
        unit = (m[2] or "B").upper() if m else ""
        if not m or unit not in mult:
            raise ValueError(f"not a size: {s!r} (e.g. 5GB, 500MB, 2GiB)")
        n = int(float(m[1]) * mult[unit])
    if n < 1:
        raise ValueError(f"a size must be at least one byte, got {s!r}")
    return n


_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorEntry:
    """What will be written: a tensor's name, shape and dtype, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


_BLOCK = 4096  # direct I/O: file offsets, lengths and memory addresses are multiples of this
_BOUNCE = 8 << 20  # bytes copied at a time into aligned memory from memory out of phase
_DIRECT_MIN = 16 << 20  # files smaller than this go through the page cache (auto mode)


def _aligned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh memory at an address that is a multiple of the direct-I/O block."""
    raw = torch.empty(nbytes + _BLOCK, dtype=torch.uint8)
    start = -raw.data_ptr() % _BLOCK
    return raw[start : start + nbytes]


def _direct_io_wanted(size: int) -> bool:
    """The default for a file of ``size`` bytes: ``EVOMERGE_DIRECT_IO=0`` never, ``=1``
    always (where the platform has it), unset: files of 16 MiB or more."""
    if not hasattr(os, "O_DIRECT"):
        return False
    env = os.environ.get("EVOMERGE_DIRECT_IO", "").strip().lower()
    if env in ("0", "off", "false", "no"):
        return False
    if env in ("1", "on", "true", "yes"):
        return True
    return size >= _DIRECT_MIN


class _ShardFile:
    """One output file, written by position, in any order, from any thread.

    Where the filesystem takes it, the bytes go to the disk with direct I/O (``O_DIRECT``)
    rather than through the page cache: filling fresh page-cache pages can cost more CPU
    than the merge arithmetic itself (writing 0.8 GB on the benchmark machine: 1.3-1.8 s
    of system time through the page cache, 0.05 s direct). Direct writes must cover whole
    aligned blocks from aligned memory, so the aligned middle of each write goes straight
    from the caller's memory (through a small aligned bounce buffer when that memory is
    out of phase with the file) and the ragged ends are gathered into their blocks, each
    written once it is complete. A filesystem that refuses direct I/O (tmpfs, some network
    filesystems) gets ordinary writes of the same bytes, from the first refusal on."""

    def __init__(self, path: Path, size: int, direct: bool):
        self.path = path
        self.size = size
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask
        self.dfd: int | None = None
        try:
            os.ftruncate(self.fd, size)
            if direct:
                with contextlib.suppress(OSError):  # refused: ordinary writes
                    self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except BaseException:
            os.close(self.fd)
            raise
        self.direct = self.dfd is not None  # (still) written with direct I/O
        self._blocks: dict[int, list] = {}  # block index -> [aligned buffer, bytes gathered]
        self._lock = threading.Lock()
        self._bounce = threading.local()

    def write(self, offset: int, data: memoryview, address: int | None = None) -> None:
        """Write ``data`` (bytes) at ``offset``; ``address`` is where ``data`` lies in memory
        when known (memory in phase with the file is written without a copy)."""
        n = len(data)
        if n == 0:
            return
        if not self.direct:
            self._pwrite(data, offset)
            return
        end = offset + n
        lo = min(-(-offset // _BLOCK) * _BLOCK, end)
        hi = max(end // _BLOCK * _BLOCK, lo)
        if offset < lo:
            self._gather(offset, data[: lo - offset])
        if hi < end:
            self._gather(hi, data[hi - offset :])
        if hi > lo:
            middle = data[lo - offset : hi - offset]
            if address is not None and (address + lo - offset) % _BLOCK == 0:
                self._pwrite_direct(middle, lo)
            else:
                bounce = getattr(self._bounce, "buf", None)
                if bounce is None:
                    bounce = self._bounce.buf = memoryview(_aligned(_BOUNCE).numpy())
                for k in range(0, hi - lo, _BOUNCE):
                    piece = middle[k : k + _BOUNCE]
                    bounce[: len(piece)] = piece
                    self._pwrite_direct(bounce[: len(piece)], lo + k)

    def _gather(self, pos: int, piece: memoryview) -> None:
        while len(piece):
            b, within = divmod(pos, _BLOCK)
            take = min(_BLOCK - within, len(piece))
            full = None
            with self._lock:
                gathered = self.direct
                if gathered:
                    entry = self._blocks.get(b)
                    if entry is None:
                        entry = self._blocks[b] = [memoryview(_aligned(_BLOCK).numpy()), 0]
                    entry[0][within : within + take] = piece[:take]
                    entry[1] += take
                    if entry[1] >= min(_BLOCK, self.size - b * _BLOCK):
                        full = self._blocks.pop(b)[0]
            if not gathered:
                self._pwrite(piece[:take], pos)
            elif full is not None:
                self._pwrite_direct(full, b * _BLOCK)  # the last block is padded; close trims it
            pos += take
            piece = piece[take:]

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def _pwrite_direct(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            if self.direct:
                try:
                    done += os.pwrite(self.dfd, data[done:], offset + done)
                    continue
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
                    self._fall_back()
            stop = min(len(data), self.size - offset)  # a padded last block: its real part
            if stop > done:
                self._pwrite(data[done:stop], offset + done)
            return

    def _fall_back(self) -> None:
        """Switch to ordinary writes: the blocks gathered so far are written as they are
        (what is missing from them comes later, by ordinary writes)."""
        with self._lock:
            # The gathered blocks are written first, and only then is the switch made: an
            # ordinary write of their missing parts must not go before them (the zeros
            # there would overwrite it). The descriptor stays open until close(): another
            # thread may still be writing through it.
            for b, (buf, _) in self._blocks.items():
                self._pwrite(buf[: min(_BLOCK, self.size - b * _BLOCK)], b * _BLOCK)
            self._blocks = {}
            self.direct = False

    def close(self, complete: bool = True) -> None:
        """Write any incomplete block, trim the padding of the last one, close (without
        ``complete``, as when the file is about to be removed: just close). Once only."""
        if self.fd is None:
            return
        try:
            if complete:
                if self._blocks:
                    self._fall_back()
                os.ftruncate(self.fd, self.size)
        finally:
            if self.dfd is not None:
                os.close(self.dfd)
                self.dfd = None
            os.close(self.fd)
            self.fd = None


class _Lane:
    """A thread's two scratch buffers, lent in turn: one is computed into while the
    other's bytes are still being written."""

    def __init__(self):
        self.bufs = [None, None]
        self.pending = [None, None]
        self.turn = 0
        self.current = None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive ``flock`` on a folder itself (no lock file is left behind), released when
    the block ends or the process dies."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextlib.contextmanager
def _signals_held():
    """Stop signals (Ctrl-C, SIGTERM, SIGHUP) wait while the block runs, in the main thread;
    one that came meanwhile is dropped: the block finished what the signal would have cut
    in half (putting a complete output in place), and the command then ends as done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # (masking would not do: a signal sent to the process may land on another thread, and
    # Python then runs the handler in the main thread all the same)
    came: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _sweep_leftovers(out_dir: Path) -> None:
    """What killed writers of ``out_dir`` left beside it: their temporary folders
    (``.OUT.tmp-PID-*``) and what an ``--overwrite`` had replaced (``.OUT.trash-PID``) are
    removed, and an output moved aside by an ``--overwrite`` that was killed before putting
    the new one in place (``.OUT.old-PID``) is put back. Only the
    leftovers of processes that no longer run are touched."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old|trash)-(\d+)(?:-.*)?$")
    for entry in sorted(out_dir.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or int(m[2]) == os.getpid() or _alive(int(m[2])):
            continue
        if m[1] == "old" and not os.path.lexists(out_dir):
            os.replace(entry, out_dir)
        else:
            _remove(entry)


def check_path_length(path: str | Path, what: str) -> None:
    """Refuse a path that no file system takes: a component over 255 bytes, or the whole
    over 4,000 (a traceback from deep inside otherwise, sometimes after the work)."""
    full = os.fsencode(os.path.abspath(path))
    long = next((c for c in Path(os.fsdecode(full)).parts if len(os.fsencode(c)) > 255), None)
    if long is not None or len(full) > 4000:
        raise CheckpointError(f"{what} '{str(path)[:60]}...': " + (
            f"its folder name '{long[:40]}...' is longer than the 255 bytes a file system takes" if long is not None
            else f"its path is {len(full)} bytes, more than a file system takes"))


def check_output_name(out: Path) -> None:
    """Refuse, before any work, an output the final rename could not make: a symbolic link
    (a rename replaces the link, not what it names, and fails on a dangling one), or a name
    too long for the file system once the temporary folder's suffix is added."""
    check_path_length(out, "output")
    parent = out.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    need = len(os.fsencode(out.name)) + len(f".tmp-{os.getpid()}-xxxxxxxx") + 1
    if need > limit:
        raise CheckpointError(f"output '{out.name[:40]}...': its name is {len(os.fsencode(out.name))} bytes; with "
                              f"the temporary folder's suffix it passes the file system's {limit}-byte limit")
    if out.is_symlink():
        raise CheckpointError(f"output '{out}' is a symbolic link (to '{os.readlink(out)}'); name the folder "
                              "itself")


class CheckpointWriter:
    """Writes a model folder atomically, with no shard buffer.

    The tensors are declared up front (``entries``), so shard boundaries and every
    safetensors header are known before any data: each shard file is created at its final
    size, and each tensor's bytes are written at their offset as soon as it is added
    (positional writes, in any order). ``buffer(name)`` lends a reusable scratch tensor of
    the declared shape and dtype to compute a result into, so a streamed merge allocates
    no new memory per tensor, in phase with the tensor's place in its file so that direct
    I/O (``direct_io``; see ``_ShardFile``) writes it with no copy. Everything goes into a
    temporary sibling folder that ``commit()`` renames to ``out_dir``; ``abort()`` (or an
    exception inside the ``with`` block) removes it, so a failed merge leaves nothing
    behind.
    """

    def __init__(
        self,
        out_dir: str | Path,
        entries: list[TensorEntry],
        shard_size: int | str = "5GB",
        overwrite: bool = False,
        direct_io: bool | None = None,
        write_behind: bool = True,
    ):
        self.out_dir = Path(out_dir)
        check_output_name(self.out_dir)
        if self.out_dir.parent.is_dir():
            _sweep_leftovers(self.out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"output '{self.out_dir}' already exists (pass --overwrite to replace it)")
        self.overwrite = overwrite
        self.shard_size = parse_size(shard_size)
        self.entries = list(entries)
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError("a tensor name is declared twice")
        self._shards = self._layout()
        self.total_bytes = sum(e.nbytes for e in self.entries)
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-{os.getpid()}-",
                                             dir=self.out_dir.parent))
        except OSError as e:
            raise CheckpointError(f"output '{self.out_dir}': cannot create it in {self.out_dir.parent} "
                                  f"({e.strerror or e})") from None
        self._done = False
        self.direct_io = direct_io  # None: as EVOMERGE_DIRECT_IO says, else for shards >= 16 MiB
        self._files: list[_ShardFile] = []  # one per shard, in order, as created
        self._largest = max((e.nbytes for e in self.entries), default=0)
        self._where: dict[str, tuple[int, int, TensorEntry]] = {}
        self._written: set[str] = set()
        self._scratch = threading.local()  # one scratch buffer per thread that asks
        self._inflight: list = []  # background writes of scratch buffers (write_behind)
        self._io = None
        self._io_lock = threading.Lock()
        self.write_behind = write_behind
        try:
            for i in range(len(self._shards)):
                self._create_shard(i)
        except BaseException:
            self.abort()
            raise

    def _layout(self) -> list[list[TensorEntry]]:
        shards: list[list[TensorEntry]] = [[]]
        size = 0
        for e in self.entries:
            if shards[-1] and size + e.nbytes > self.shard_size:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.nbytes
        return shards if self.entries else []

    def shard_file(self, i: int) -> str:
        n = len(self._shards)
        return SAFE_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()

    def _create_shard(self, i: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for e in self._shards[i]:
            header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [off, off + e.nbytes]}
            off += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        for e in self._shards[i]:
            self._where[e.name] = (i, start + header[e.name]["data_offsets"][0], e)
        size = start + off
        if self.direct_io is None:
            direct = _direct_io_wanted(size)
        else:
            direct = self.direct_io and hasattr(os, "O_DIRECT")
        f = _ShardFile(self.tmp / self.shard_file(i), size, direct)
        self._files.append(f)
        f.write(0, memoryview(len(raw).to_bytes(8, "little") + raw))

    def _entry(self, name: str) -> tuple[int, int, TensorEntry]:
        try:
            return self._where[name]
        except KeyError:
            raise ValueError(f"tensor '{name}' was not declared") from None

    def buffer(self, name: str) -> torch.Tensor:
        """A scratch CPU tensor of the declared shape and dtype to compute ``name`` into,
        then ``add``. Each thread has scratch memory of its own (``add`` is thread-safe).
        With ``write_behind``, ``add`` of a lent buffer returns at once and its bytes are
        written in the background; the thread's next call lends its other buffer, and
        the one after waits for the first one's write (so do not touch a buffer after
        adding it). Without it, the next call from the thread lends the same memory."""
        _, offset, e = self._entry(name)
        lane = getattr(self._scratch, "lane", None)
        if lane is None:
            lane = self._scratch.lane = _Lane()
        k = lane.turn
        if self.write_behind:
            lane.turn ^= 1
        fut, lane.pending[k] = lane.pending[k], None
        if fut is not None:
            fut.result()
        buf = lane.bufs[k]
        if buf is None:
            buf = lane.bufs[k] = torch.empty(self._largest + 2 * _BLOCK, dtype=torch.uint8)
        lane.current = k
        # in phase with the file (same address modulo the block): written with no copy;
        # unless the tensor lies in its file at an offset that is no multiple of its element
        size = e.dtype.itemsize
        start = (offset - buf.data_ptr()) % _BLOCK
        if start % size:
            start = 0
        return buf[start : start + e.nbytes].view(e.dtype).reshape(e.shape)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a declared tensor at its place in its shard."""
        i, offset, e = self._entry(name)
        if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
            raise ValueError(
                f"tensor '{name}' {list(tensor.shape)} {tensor.dtype} does not match the declared "
                f"{list(e.shape)} {e.dtype}"
            )
        if e.nbytes:
            t = tensor.detach()
            if t.device.type != "cpu":
                t = t.to("cpu")
            flat = t.contiguous().reshape(-1).view(torch.uint8)
            data, address = memoryview(flat.numpy()), flat.data_ptr()
            if self.write_behind and self._lent(flat):
                fut = self._executor().submit(self._files[i].write, offset, data, address)
                lane = self._scratch.lane
                lane.pending[lane.current] = fut
                with self._io_lock:
                    self._inflight.append(fut)
            else:
                self._files[i].write(offset, data, address)
        self._written.add(name)

    def _lent(self, flat: torch.Tensor) -> bool:
        """Whether ``flat`` lies in the scratch buffer this thread was lent last."""
        lane = getattr(self._scratch, "lane", None)
        if lane is None or lane.current is None:
            return False
        return flat.untyped_storage().data_ptr() == lane.bufs[lane.current].untyped_storage().data_ptr()

    def _executor(self):
        with self._io_lock:
            if self._io is None:
                from concurrent.futures import ThreadPoolExecutor

                self._io = ThreadPoolExecutor(2, thread_name_prefix="evomerge-write")
            return self._io

    def _drain(self) -> None:
        """Wait for every background write; raise the first failure."""
        with self._io_lock:
            futs, self._inflight = self._inflight, []
        first = None
        for f in futs:
            try:
                f.result()
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first

    def _close(self, complete: bool = True) -> None:
        """Finish the background writes and close the files; ``complete``: for a commit
        (a failed write is raised), else for an abort (the folder is about to go)."""
        failure = None
        try:
            self._drain()
        except BaseException as e:
            failure = e
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        try:
            for f in self._files:
                f.close(complete and failure is None)
        finally:
            self._scratch = threading.local()
        if complete and failure is not None:
            raise failure

    def direct(self) -> list[bool]:
        """Per shard, whether its bytes went (and still go) to the disk with direct I/O."""
        return [f.direct for f in self._files]

    def write_text(self, rel: str, text: str) -> None:
        (self.tmp / rel).write_text(text, encoding="utf-8")

    def copy_file(self, src: Path, rel: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (rel or src.name))

    def commit(self) -> Path:
        """Check every declared tensor was written, write the index, move into place."""
        missing = [e.name for e in self.entries if e.name not in self._written]
        if missing:
            raise ValueError(f"tensor '{missing[0]}' was declared but never written")
        self._close()
        if len(self._shards) > 1:
            weight_map = {e.name: self.shard_file(i) for i, sh in enumerate(self._shards) for e in sh}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            self.write_text(SAFE_INDEX, json.dumps(index, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # as a folder made with mkdir (mkdtemp's is private)
        trash = None
        with _locked(self.out_dir.parent), _signals_held():  # one commit at a time; no stop signal midway
            if self.out_dir.exists():
                if not self.overwrite:
                    raise FileExistsError(f"output '{self.out_dir}' appeared while merging")
                old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
                os.replace(self.out_dir, old)  # a SIGKILL from here to the next line: the next writer restores it
                os.replace(self.tmp, self.out_dir)
                # what was replaced goes where no later writer would restore it from
                trash = self.out_dir.with_name(f".{self.out_dir.name}.trash-{os.getpid()}")
                os.replace(old, trash)
            else:
                os.replace(self.tmp, self.out_dir)
            self._done = True
        if trash is not None:
            _remove(trash)  # (interrupted, the next writer into this place removes the rest)
        return self.out_dir

    def abort(self) -> None:
        self._close(complete=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True


def refuse_overlap(out_dir: str | Path, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is, holds, or lies inside one of the ``inputs`` (model
    folders, a recipe file), after resolving symbolic links: writing it, or replacing it with
    ``--overwrite``, would change or delete what the user gave as input."""
    out = Path(out_dir).expanduser().resolve()
    for name, path in inputs.items():
        src = Path(path).expanduser().resolve()
        how = ("is" if out == src else "holds" if out in src.parents else
               "lies inside" if src in out.parents else None)
        if how:
            raise CheckpointError(f"output '{out_dir}' {how} the input {name} ({src}); nothing was written, "
                                  "choose an output folder apart from the inputs")


def torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else _DTYPES[name]
