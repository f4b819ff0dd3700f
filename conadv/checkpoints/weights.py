"""Weights a user points at: a conadv checkpoint (or run directory), or a torchvision/timm
state-dict file. Used to start a model from them (`model.init_from`, fine-tuning, distillation
students) and to load frozen teachers. Nothing is ever downloaded: the file must be there."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from conadv.checkpoints.format import load_state, resolve_checkpoint, state_sha256
from conadv.config import ModelConfig, parse_saved_config
from conadv.errors import CheckpointError, ConfigError
from conadv.fileio import file_sha256
from conadv.models.multi_bn import main_state_dict

log = logging.getLogger(__name__)

# Keys under which common training scripts wrap a state dict (timm's train.py, torchvision's
# reference scripts and many others).
_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")


@dataclass
class Weights:
    """A backbone state dict with plain torchvision/timm key names."""

    state: dict[str, Tensor]
    source: str  # the path, for messages
    sha256: str  # of the file the weights came from: tells whether it changed since
    model: ModelConfig | None = None  # the architecture, when a conadv checkpoint says it


def read_weights(path: str | Path, key: str) -> Weights:
    """`key`: the config key that named the file, for the error sentences."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}: weights file {path} does not exist")
    if not (path.is_file() or path.is_dir()):  # a FIFO would block, a device never end
        raise ConfigError(f"{key}: {path} is not a regular file or a checkpoint directory")
    if path.is_dir():  # a conadv checkpoint or run directory
        checkpoint = resolve_checkpoint(path)
        saved = load_state(checkpoint)
        state = {k.removeprefix("backbone."): v for k, v in main_state_dict(saved["model"]).items()}
        # resolve_checkpoint verified the file against this checksum
        sha256 = state_sha256(checkpoint)
        return Weights(state, str(checkpoint), sha256, parse_saved_config(
            saved["config"], f"the config inside {checkpoint}").model)
    try:  # tensors only: a weights file must not run code when it is read
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (pickle, zip and torch errors alike)
        raise CheckpointError(f"{key}: {path} cannot be read as a PyTorch state dict (it is "
                              "not a torch.save file, or it holds Python objects besides "
                              "tensors: save model.state_dict() alone)") from None
    for wrapper in _WRAPPERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(f"{key}: {path} does not hold a state dict (a mapping of "
                              "parameter names to tensors)")
    # nn.DataParallel / DDP saves prefix every key with "module."
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return Weights(loaded, str(path), file_sha256(path))


def _named(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_into(module: nn.Module, weights: Weights, strict: bool, what: str) -> None:
    """Load `weights` into `module`; `strict`: every key must exist on both sides with the same
    shape, else one sentence names the first keys that do not fit. Not strict: load the keys
    that fit and log the others."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights.state]
    unexpected = [k for k in weights.state if k not in own]
    resized = [k for k in weights.state
               if k in own and weights.state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_named(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_named(unexpected)}")
    if resized:
        k = resized[0]
        problems.append(f"{len(resized)} keys of another shape, e.g. {k} "
                        f"{tuple(weights.state[k].shape)} vs {tuple(own[k].shape)}")
    if problems and strict:
        raise ConfigError(f"{what} {weights.source} does not fit the model: "
                          f"{'; '.join(problems)}")
    fitting = {k: v for k, v in weights.state.items() if k in own and k not in resized}
    module.load_state_dict(fitting, strict=False)
    if problems:
        log.warning("%s %s: loaded %d of %d tensors; %s", what, weights.source, len(fitting),
                    len(own), "; ".join(problems))
