"""Files xmodal wrote with ``torch.save``, read back as tensors and plain data only.

``torch.load(weights_only=True)`` rebuilds tensors, numbers, strings and containers and refuses
every other callable a pickle names; a crafted file put in a run folder or passed as a
checkpoint therefore runs no code, and is reported in one line naming it.
"""
from __future__ import annotations

import pickle
import os
from typing import IO, Any, Union

import torch

from xmodal.errors import CheckpointError


def load_tensors(source: Union[str, os.PathLike, IO[bytes]], name: str, remedy: str,
                 map_location: Any = "cpu") -> Any:
    """The object saved in ``source`` (a path or a binary file), or one CheckpointError naming
    ``name`` and ``remedy`` for a file that is empty, truncated, foreign, or asks the unpickler for
    anything but tensors and plain data."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # weights_only refused a callable: the file asks to run code
            raise CheckpointError(f"{name} holds objects other than tensors and plain data (refused: xmodal "
                                  f"never unpickles code); {remedy}") from None
        raise CheckpointError(f"{name} cannot be read (UnpicklingError); {remedy}") from None
    except Exception as err:  # noqa: BLE001 - torch raises zip, EOF and runtime errors alike for bad files
        raise CheckpointError(f"{name} cannot be read ({type(err).__name__}); {remedy}") from None
