"""Low-level file I/O shared by every layer: atomic text writes, 16-bit PNG reads, and nested state
(optimizer, scheduler, RNG) stored as safetensors + JSON instead of pickle, so reading a shared run folder
never runs code.

Tree encoding (``save_tree`` / ``load_tree``), written as ``<stem>.json`` + ``<stem>.safetensors``:
tensors go to the safetensors file and appear in the JSON as ``{"__tensor__": key}``; tuples as
``{"__tuple__": [...]}``, numpy arrays as ``{"__ndarray__": [...], "dtype": ...}``, and dicts whose keys
are not all strings (an optimizer's integer parameter ids) as ``{"__items__": [[key, value], ...]}``.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

TAGS = ("__tensor__", "__tuple__", "__ndarray__", "__items__")


class StateFileError(ValueError):
    """A state file that is missing, truncated or not what it claims to be (the message names it)."""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file + rename: readers see the old or the new file,
    never a half-written one (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise StateFileError unless ``path`` is a complete safetensors file (header parses and the file is
    exactly as long as the header's tensors need: a truncated copy or an interrupted write fails)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StateFileError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise StateFileError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StateFileError(f"{path}: damaged safetensors header") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise StateFileError(f"{path}: truncated or damaged safetensors file ({size} bytes, its header "
                             f"describes {8 + n + end})")


def _encode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = node.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(node, np.ndarray):
        return {"__ndarray__": node.tolist(), "dtype": str(node.dtype)}
    if isinstance(node, np.generic):
        return node.item()
    if isinstance(node, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in node]}
    if isinstance(node, list):
        return [_encode(v, tensors) for v in node]
    if isinstance(node, dict):
        if all(isinstance(k, str) for k in node) and not any(t in node for t in TAGS):
            return {k: _encode(v, tensors) for k, v in node.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in node.items()]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot store a {type(node).__name__} in a state file")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__ndarray__" in node:
        return np.asarray(node["__ndarray__"], dtype=node["dtype"])
    if "__items__" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__items__"]}
    return {k: _decode(v, tensors) for k, v in node.items()}


def tree_files(stem: str | os.PathLike) -> tuple[Path, Path]:
    stem = Path(stem)
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def save_tree(tree: Any, stem: str | os.PathLike) -> None:
    """Write ``tree`` (dicts, lists, tuples, tensors, numpy arrays, plain values) to ``stem``.json/.safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors)
    js, st = tree_files(stem)
    save_file(tensors, str(st))
    js.write_text(json.dumps(encoded))


def load_tree(stem: str | os.PathLike) -> Any:
    """Inverse of ``save_tree`` (tensors on CPU); StateFileError names a missing or damaged file."""
    from safetensors.torch import load_file

    js, st = tree_files(stem)
    check_safetensors(st)
    try:
        encoded = json.loads(js.read_text())
    except FileNotFoundError:
        raise StateFileError(f"{js}: missing file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFileError(f"{js}: truncated or damaged JSON ({e})") from None
    try:
        return _decode(encoded, load_file(str(st)))
    except KeyError as e:
        raise StateFileError(f"{js}: names tensor {e} that {st.name} does not hold") from None


class atomic_directory:
    """``with atomic_directory(out) as tmp:`` fill ``tmp``; on success it replaces ``out`` in one rename,
    on any error it is removed and ``out`` is left as it was (never a half-written folder)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out = Path(out_dir)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp")

    def __enter__(self) -> Path:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        shutil.rmtree(self.out, ignore_errors=True)
        os.replace(self.tmp, self.out)


def read_png16(path: str | os.PathLike) -> np.ndarray:
    """Raw (H, W) uint16 values of a 16-bit single-channel PNG (depth maps: scenes and dataset converters).
    FileNotFoundError when missing; ValueError naming the problem (not the file: callers add it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"expected a 16-bit single-channel PNG, got mode {im.mode!r}")
            arr = np.array(im)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"unreadable PNG ({e})") from None
    if arr.ndim != 2:
        raise ValueError(f"expected (H, W), got shape {arr.shape}")
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
        raise ValueError("values outside the 16-bit range")
    return arr.astype(np.uint16)
