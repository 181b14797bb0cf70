"""Training-state checkpoints: one ``state.pt`` (tensors and plain values only) plus ``config.json``.

Everything is loadable with ``torch.load(..., weights_only=True)``: RNG states are stored as
tensors or lists of ints, never as pickled objects.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


def capture_rng() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss), "name": str(np_name)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: str | Path, state: dict[str, Any], config: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def load_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in checkpoint {directory}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def newest_local_state(run_dir: str) -> dict[str, Any] | None:
    """The newest readable training state among ``run_dir/checkpoint_step*`` (local storage only).

    A checkpoint folder whose ``state.pt`` cannot be read (a copy cut short) is skipped for the
    one before it.
    """
    if "://" in run_dir or not Path(run_dir).is_dir():
        return None
    for directory in sorted(Path(run_dir).glob("checkpoint_step*"), reverse=True):
        try:
            return load_state(directory)
        except Exception:
            continue
    return None
