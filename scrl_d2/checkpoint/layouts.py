"""Checkpoint layouts and the one place where ResNet parameter names are translated.

Readers go through :func:`extract_encoder`, which recognises

* ``scrl_d2``: our checkpoints (either backend): ``model`` with ``backbone.*`` (online)
  and ``target_backbone.*`` under Detectron2's ResNet names;
* ``official``: the SCRL/BYOL release: ``online_network_state_dict`` /
  ``target_network_state_dict`` whose ``encoder.N.*`` is a ``Sequential`` of
  torchvision ResNet children;
* ``torchvision``: a torchvision ResNet state dict (optionally under ``state_dict`` /
  ``model`` and with a ``module.`` prefix);
* ``detectron2``: a bare state dict already in Detectron2's names (``stem.conv1.weight``);

and returns the encoder in Detectron2's names, plus what it dropped.
"""
import re
from collections import Counter
from typing import Dict, List, Tuple

import torch

from ..utils.errors import InputValueError

__all__ = ["torchvision_to_d2", "d2_to_torchvision", "extract_encoder", "infer_resnet", "LayoutError"]

# torchvision children of ResNet as the release's encoder Sequential indexes them
_OFFICIAL_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


class LayoutError(InputValueError):
    """A file whose layout is not one we understand; the message shows example keys."""


def torchvision_to_d2(name: str) -> str:
    """``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight`` (one key)."""
    name = re.sub(r"^conv1\.", "stem.conv1.", name)
    name = re.sub(r"^bn1\.", "stem.conv1.norm.", name)
    name = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", name)
    name = re.sub(r"\.downsample\.0\.", ".shortcut.", name)
    name = re.sub(r"\.downsample\.1\.", ".shortcut.norm.", name)
    name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
    return name


def d2_to_torchvision(name: str) -> str:
    """The inverse of :func:`torchvision_to_d2`."""
    name = re.sub(r"^stem\.conv1\.norm\.", "bn1.", name)
    name = re.sub(r"^stem\.conv1\.", "conv1.", name)
    name = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", name)
    name = re.sub(r"\.shortcut\.norm\.", ".downsample.1.", name)
    name = re.sub(r"\.shortcut\.", ".downsample.0.", name)
    name = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", name)
    return name


def _strip(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _dropped(keys: List[str], kept_prefix: str) -> Dict[str, int]:
    c = Counter(k.split(".")[0] for k in keys if not k.startswith(kept_prefix))
    return dict(sorted(c.items()))


def _examples(obj) -> str:
    if isinstance(obj, dict):
        keys = list(obj.keys())[:8]
        inner = next((v for v in obj.values() if isinstance(v, dict)), None)
        extra = f"; inside {keys[0]!r}: {list(inner)[:5]}" if inner and len(keys) < 8 else ""
        return f"top-level keys {keys}{extra}"
    return f"an object of type {type(obj).__name__}"


def extract_encoder(ckpt, encoder: str = "online") -> Tuple[str, Dict[str, torch.Tensor], Dict[str, int]]:
    """``(layout, encoder state dict in Detectron2 names, {dropped group: tensors})``."""
    if encoder not in ("online", "target"):
        raise InputValueError(f"encoder must be 'online' or 'target', got {encoder!r}")
    if not isinstance(ckpt, dict):
        raise LayoutError(f"not a checkpoint dictionary: {_examples(ckpt)}")
    if "online_network_state_dict" in ckpt:  # the official release
        key = f"{encoder}_network_state_dict"
        if key not in ckpt or not isinstance(ckpt[key], dict):
            raise LayoutError(f"official-release checkpoint without {key!r}")
        net = ckpt[key]
        enc = {}
        for k, v in _strip(net, "encoder.").items():
            child, _, rest = k.partition(".")
            if child in _OFFICIAL_CHILDREN:
                enc[torchvision_to_d2(f"{_OFFICIAL_CHILDREN[child]}.{rest}")] = v
        dropped = _dropped(list(net), "encoder.")
        others = [k for k in ckpt if k.endswith("_state_dict") and k != key]
        dropped.update({k: len(ckpt[k]) if isinstance(ckpt[k], dict) else 1 for k in others})
        return "official", _check(enc, ckpt), dropped
    state = ckpt.get("model", ckpt.get("state_dict", ckpt))
    if not isinstance(state, dict):
        raise LayoutError(f"no state dict found: {_examples(ckpt)}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    prefix = "backbone." if encoder == "online" else "target_backbone."
    if any(k.startswith("backbone.stem.") for k in state):
        dropped = _dropped(list(state), prefix)
        dropped.update({k: 1 for k in ckpt if k != "model"})
        return "scrl_d2", _check(_strip(state, prefix), ckpt), dropped
    if any(k.startswith("stem.conv1.") for k in state):
        return "detectron2", _check(state, ckpt), {}
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        enc = {torchvision_to_d2(k): v for k, v in state.items() if k.split(".")[0] in
               ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")}
        dropped = {k: n for k, n in _dropped(list(state), "layer").items() if k not in ("conv1", "bn1")}
        return "torchvision", _check(enc, ckpt), dropped
    raise LayoutError(
        "unrecognised checkpoint layout: expected scrl_d2 (model/backbone.*), the official SCRL/BYOL "
        "release (online_network_state_dict/encoder.*), a torchvision ResNet (conv1.*, layer1.*) or "
        f"Detectron2 names (stem.*, res2.*); found {_examples(ckpt)}"
    )


def _check(enc: Dict[str, torch.Tensor], ckpt) -> Dict[str, torch.Tensor]:
    if not enc:
        raise LayoutError(f"the checkpoint holds no ResNet encoder tensors: {_examples(ckpt)}")
    return {k: v for k, v in enc.items() if torch.is_tensor(v)}


def infer_resnet(enc: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Depth and stage widths of a Detectron2-named ResNet state dict."""
    blocks = [len({k.split(".")[1] for k in enc if k.startswith(f"res{i}.")}) for i in (2, 3, 4, 5)]
    bottleneck = "res2.0.conv3.weight" in enc
    table = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
             (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}
    depth = table.get((*blocks, bottleneck))
    if depth is None:
        raise LayoutError(f"not a standard ResNet: blocks per stage {blocks}, bottleneck={bottleneck}")
    res2_out = enc["res2.0.conv3.weight" if bottleneck else "res2.0.conv2.weight"].shape[0]
    return {"depth": depth, "res2_out_channels": int(res2_out),
            "stem_out_channels": int(enc["stem.conv1.weight"].shape[0])}
