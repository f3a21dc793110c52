"""The random generators' state in a checkpoint, as tensors, ints and floats only.

A resumed run must continue every stream an uninterrupted run would (RoI sampling and
multi-scale resizing draw from torch's generator in the main process). The state is kept
in types that ``torch.load(weights_only=True)`` reads, so a checkpoint never needs the
unsafe unpickler.
"""
import random
from typing import Dict

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> Dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, tuple):  # written before the states were plain tensors (unsafe load only)
        random.setstate(py)
        np.random.set_state(npy)
    else:
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
