"""Backbone checkpoints that know which network they hold.

Two formats, chosen by the file's suffix and recognised by its bytes when read:

- ``.safetensors`` (what runs export): the weights as safetensors tensors, readable by any
  safetensors reader, with the header's ``__metadata__`` holding ``xmodal`` (JSON: ``arch``,
  ``in_channels``, ``num_classes``, ``kwargs``, ``xmodal_version``) and ``weights_sha256`` (of the
  tensors' names, dtypes, shapes and bytes, checked when xmodal reads the file);
- ``.pt``: a torch file of the dict ``{"arch", "in_channels", "num_classes", "kwargs",
  "state_dict", "xmodal_version"}``, read as tensors only (older runs' exports).

Either is written atomically, so a crash never leaves half a checkpoint behind. Loading into the
wrong network fails with one line naming the file and the difference.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from xmodal import __version__
from xmodal.errors import CheckpointError
from xmodal.files import atomic_write
from xmodal.safeload import load_tensors
from xmodal.models.base import Backbone
from xmodal.models.registry import INIT_ONLY_KWARGS, build_model

PathLike = Union[str, os.PathLike]
_KEYS = ("arch", "in_channels", "num_classes", "kwargs", "state_dict", "xmodal_version")
_SHOWN = 3  # keys listed per kind of state-dict mismatch


def weights_sha256(state: dict[str, Tensor]) -> str:
    """sha256 of a state dict's tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return digest.hexdigest()


def save_backbone(path: PathLike, model: Backbone) -> Path:
    """Write ``model`` (architecture + weights) to ``path`` atomically, as safetensors when the
    suffix is ``.safetensors``, else as a torch file; returns the path."""
    path = Path(path)
    header = {"arch": model.arch, "in_channels": model.in_channels, "num_classes": model.num_classes,
              "kwargs": dict(model.build_kwargs), "xmodal_version": __version__}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        data = safetensors.torch.save(state, metadata={"xmodal": json.dumps(header), "format": "pt",
                                                       "weights_sha256": weights_sha256(state)})
        write = lambda f: f.write(data)  # noqa: E731
    else:
        write = lambda f: torch.save({**header, "state_dict": state}, f)  # noqa: E731
    atomic_write(path, "wb", write)
    return path


def checkpoint_sha256(path: PathLike, role: str = "") -> str:
    """sha256 of the file at ``path``, read in blocks without loading it: the digest
    ``open_checkpoint`` records, for a caller that only compares files (benchmarks checking which
    teacher a run learnt from)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{_name(path, role)} does not exist")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint read once: its payload and the sha256 of the very bytes that payload came from.

    A stage taught by a checkpoint records the file's sha256 and loads its weights; reading the
    path twice (once to hash, once to load) would let a file put there in between be loaded under
    the old one's name. Hash, header and weights all come from one read (``open_checkpoint``).
    """

    path: str
    payload: dict[str, Any]
    sha256: str


def open_checkpoint(path: PathLike, role: str = "") -> CheckpointFile:
    """Read the checkpoint at ``path`` once; missing, corrupt or foreign files raise CheckpointError."""
    name = _name(path, role)
    if not Path(path).is_file():
        raise CheckpointError(f"{name} does not exist")
    data = Path(path).read_bytes()
    if _is_safetensors(data):
        return CheckpointFile(str(path), _safetensors_payload(data, name), hashlib.sha256(data).hexdigest())
    payload = load_tensors(io.BytesIO(data), name, "expected a backbone checkpoint written by xmodal")
    missing = [k for k in _KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(f"{name} is not an xmodal backbone checkpoint (missing {', '.join(missing)})")
    return CheckpointFile(str(path), payload, hashlib.sha256(data).hexdigest())


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if len(data) < 10:
        return False
    size = int.from_bytes(data[:8], "little")
    return 2 <= size <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_payload(data: bytes, name: str) -> dict[str, Any]:
    """The checkpoint dict of a safetensors file xmodal exported; CheckpointError for another
    safetensors file or one whose tensors no longer match their recorded sha256."""
    try:
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        state = safetensors.torch.load(data)
    except (ValueError, UnicodeDecodeError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{name} is not a readable safetensors file ({err})") from None
    meta = header.get("__metadata__") or {}
    if "xmodal" not in meta:
        raise CheckpointError(f"{name} is a safetensors file without xmodal's metadata (arch, in_channels, ...); "
                              "expected a backbone exported by xmodal")
    try:
        info = json.loads(meta["xmodal"])
    except ValueError:
        raise CheckpointError(f"{name}: its xmodal metadata is not JSON") from None
    missing = [k for k in _KEYS if k != "state_dict" and k not in info]
    if missing:
        raise CheckpointError(f"{name} is not an xmodal backbone checkpoint (missing {', '.join(missing)})")
    if meta.get("weights_sha256") != weights_sha256(state):
        raise CheckpointError(f"{name}: its weights do not match the sha256 recorded when it was written "
                              "(the file was altered)")
    return {**info, "state_dict": state}


def taught_by(teacher: dict[str, Any], held: Optional[CheckpointFile], role: str = "teacher") -> dict[str, Any]:
    """A teacher's recorded config as part of a student's identity: a ``checkpoint`` counts by its
    content (``checkpoint_sha256``), not by its path, so another file at the same path is another
    teacher and the same file reached by another path (relative, absolute, moved) the same one.
    ``held`` is that checkpoint as read for loading (``open_checkpoint``): the bytes hashed are the
    bytes loaded, never a second read of the path."""
    if not teacher.get("checkpoint"):
        return dict(teacher)
    if held is None or held.path != str(teacher["checkpoint"]):
        raise ValueError(f"taught_by: {role} checkpoint {teacher['checkpoint']} must be passed as read "
                         f"(open_checkpoint), got {held.path if held else None}")
    rest = {k: v for k, v in teacher.items() if k != "checkpoint"}
    return {**rest, "checkpoint_sha256": held.sha256}


def read_checkpoint(path: PathLike, role: str = "") -> dict[str, Any]:
    """The checkpoint dict at ``path``; missing, corrupt or foreign files raise CheckpointError."""
    return open_checkpoint(path, role).payload


def _payload_and_path(source: Union[PathLike, CheckpointFile], role: str) -> tuple[dict[str, Any], PathLike]:
    """(payload, path) of a path to read or of a checkpoint already read."""
    if isinstance(source, CheckpointFile):
        return source.payload, source.path
    return read_checkpoint(source, role), source


def load_backbone(source: Union[PathLike, CheckpointFile], role: str = "", **expected: Any) -> Backbone:
    """Rebuild the backbone saved at ``source`` (a path, or a file ``open_checkpoint`` read) and
    load its weights.

    ``expected`` (``arch``, ``in_channels``, ``num_classes`` or any architecture keyword such as
    ``width``) must match what the file holds, else CheckpointError.
    """
    payload, path = _payload_and_path(source, role)
    held = _identity(payload, skip_classifier=False)
    _check_same(held, {**held, **expected}, path, role)
    kwargs = {**payload["kwargs"], **{k: v for k, v in INIT_ONLY_KWARGS.items() if k in payload["kwargs"]}}
    model = build_model(payload["arch"], payload["in_channels"], payload["num_classes"], **kwargs)
    _load_state(model, payload["state_dict"], path, role)
    return model


def load_weights_into(
    model: Backbone, source: Union[PathLike, CheckpointFile], role: str = "", skip_classifier: bool = False
) -> Backbone:
    """Load the weights at ``source`` (a path, or a file ``open_checkpoint`` read) into ``model``
    (returned) after checking they were made for it.

    ``skip_classifier`` ignores ``fc`` on both sides, e.g. to finetune a distilled encoder with a
    new head. Example message: ``teacher checkpoint t.pt holds arch 'resnet32x4' (in_channels=1),
    expected 'resnet8' (in_channels=1)``.
    """
    payload, path = _payload_and_path(source, role)
    held = _identity(payload, skip_classifier)
    header = {"arch": model.arch, "in_channels": model.in_channels, "num_classes": model.num_classes,
              "kwargs": model.build_kwargs}
    want = _identity(header, skip_classifier)
    _check_same(held, want, path, role)
    state = payload["state_dict"]
    if skip_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    _load_state(model, state, path, role, skip_classifier)
    return model


def _load_state(
    model: Backbone, state: dict[str, Tensor], path: PathLike, role: str, skip_classifier: bool = False
) -> None:
    own = {k: v for k, v in model.state_dict().items() if not (skip_classifier and k.startswith("fc."))}
    problems = []
    for label, keys in (("missing", own.keys() - state.keys()), ("unexpected", state.keys() - own.keys())):
        if keys:
            problems.append(f"{label} keys {_few(sorted(keys))}")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
              if state[k].shape != own[k].shape]
    if shapes:
        problems.append(f"shape mismatch {_few(sorted(shapes))}")
    if problems:
        raise CheckpointError(f"{_name(path, role)} does not fit {model.arch}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=not skip_classifier)


def _identity(header: dict[str, Any], skip_classifier: bool) -> dict[str, Any]:
    """What must agree between a file and a model; initial-weight choices need not."""
    ident = {"arch": header["arch"], "in_channels": header["in_channels"]}
    if not skip_classifier:
        ident["num_classes"] = header["num_classes"]
    ident.update({k: v for k, v in header["kwargs"].items() if k not in INIT_ONLY_KWARGS})
    return ident


def _check_same(held: dict[str, Any], want: dict[str, Any], path: PathLike, role: str) -> None:
    differ = [k for k in {**held, **want} if held.get(k) != want.get(k)]
    if differ:
        # arch and in_channels always shown: they are what a reader checks first
        keys = ["arch", "in_channels"] + [k for k in differ if k not in ("arch", "in_channels")]
        raise CheckpointError(
            f"{_name(path, role)} holds {_describe({k: held.get(k) for k in keys})}, "
            f"expected {_describe({k: want.get(k) for k in keys}, prefix='')}"
        )


def _describe(fields: dict[str, Any], prefix: str = "arch ") -> str:
    """``{"arch": "resnet8", "in_channels": 1}`` -> ``arch 'resnet8' (in_channels=1)``."""
    rest = ", ".join(f"{k}={v!r}" for k, v in fields.items() if k != "arch")
    return f"{prefix}{fields['arch']!r}" + (f" ({rest})" if rest else "")


def _few(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _name(path: PathLike, role: str) -> str:
    return f"{role} checkpoint {path}" if role else f"checkpoint {path}"
