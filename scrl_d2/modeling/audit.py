"""A structural check that every unit the loss compares comes from the intended image
and rectangle, under any autocast dtype.

A loss tolerance cannot see a box pooled from the neighbouring image (with random
weights the loss barely moves), so this looks at what the pooling kernel receives and
returns instead:

* every call of the RoIAlign kernel is recorded *below* autocast (a dispatch mode sees
  the arguments the kernel really gets, on either backend); its RoIs must equal the
  batch's box pairs exactly: batch index ``i`` (view 1) or ``B + i`` (view 2) and the
  float32 coordinates;
* the encoder's output is replaced by a map that encodes each image's index in two
  small-integer channels (exact in bf16 and fp16), so the pooled units handed to the
  projectors must equal, row by row, that map pooled in float32 with the intended RoIs
  (which decodes to the intended image wherever RoIAlign samples inside the map).

Used by ``tests/test_pooling_exact.py`` at the shipped batch size and, through
:func:`pooling_check` (a model built from a config), by ``tools/benchmark.py parity``
at each speed option's dtype and memory format.
"""
import contextlib
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import roi_align

from .meta_arch import build_model

__all__ = ["PoolingAudit", "audit_pooling", "pooling_check"]

_BASE = 16  # image index = channel0 + 16 * channel1; both stay <= 255 up to 4096 views


@dataclass
class PoolingAudit:
    dtype: str
    kernel_calls: int  # RoIAlign kernel calls seen (online and target pass)
    rois: int  # RoIs handed to the kernel
    rois_dtype: str  # dtype of the RoIs the kernel received
    wrong_image: int  # RoIs whose batch index is not the intended image
    wrong_rectangle: int  # RoIs whose coordinates differ from the box pair
    units: int  # pooled units handed to the projectors
    units_wrong_image: int  # units that differ from the intended image's (pooled with exact RoIs)
    units_readable: int  # units whose expected value decodes to their image (no border effect)

    @property
    def ok(self) -> bool:
        return self.wrong_image == 0 and self.wrong_rectangle == 0 and self.units_wrong_image == 0

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


class _RoiAlignRecorder(TorchDispatchMode):
    """Records the RoIs of every RoIAlign kernel call, as the kernel receives them (below
    autocast and any wrapper's casts)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() == "torchvision::roi_align":
            self.calls.append(args[1].detach().clone())
        return func(*args, **(kwargs or {}))


def _encode(feature: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and memory format; channel 0/1 = image index mod / div 16."""
    n = feature.shape[0]
    code = torch.arange(n, device=feature.device)
    out = torch.zeros_like(feature)
    out[:, 0] = (code % _BASE).to(feature.dtype).view(n, 1, 1)
    out[:, 1] = (code // _BASE).to(feature.dtype).view(n, 1, 1)
    return out


def _expected_rois(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[2M, 5]`` float32: the valid pairs of view 1 then of view 2 (SCRL's order)."""
    b1, b2 = batch["boxes1"].float().cpu(), batch["boxes2"].float().cpu()
    B, K = batch["box_valid"].shape
    idx = batch.get("pair_index")
    idx = (batch["box_valid"].reshape(-1).nonzero().squeeze(1) if idx is None else idx).cpu()
    if idx.numel() < 2:  # SCRL's fallback: every box, with zero weight
        idx = torch.arange(B * K)
    img = (idx // K).float()[:, None]
    return torch.cat([torch.cat([img, b1.reshape(-1, 4)[idx]], 1), torch.cat([img + B, b2.reshape(-1, 4)[idx]], 1)])


def _reference_units(model, shape, device, rois: Optional[torch.Tensor]) -> torch.Tensor:
    """What the units must be: the encoded map pooled in float32 with the intended RoIs
    (SCRL) or averaged (BYOL)."""
    encoded = _encode(torch.zeros(shape, device=device))
    if rois is None:
        return encoded.mean(dim=(2, 3)).cpu()
    p = model.pooler
    return roi_align(encoded, rois.to(device), p.output_size, p.spatial_scale, p.sampling_ratio,
                     p.aligned).flatten(1).cpu()


@torch.no_grad()
def audit_pooling(model: torch.nn.Module, batch: Dict[str, torch.Tensor], dtype: Optional[torch.dtype],
                  device: torch.device) -> PoolingAudit:
    """Run ``model``'s training forward on ``batch`` (on ``device``) under autocast of
    ``dtype`` (None: fp32) and report where its pooled units came from. The model's
    weights and buffers are left as they were (the forward's batch-norm updates are undone)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = _RoiAlignRecorder()
    units: List[torch.Tensor] = []
    shapes: List[torch.Size] = []
    feature = getattr(model, "in_feature", "res5")

    def encode_output(module, inputs, output):
        shapes.append(output[feature].shape)
        return {**output, feature: _encode(output[feature])}

    hooks = [enc.register_forward_hook(encode_output) for enc in (model.backbone, model.target_backbone)]
    hooks += [head.register_forward_pre_hook(lambda m, i: units.append(i[0].detach().cpu()))
              for head in (model.projector, model.target_projector)]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    was_training = model.training
    model.train()
    try:
        with autocast, recorder:
            model({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(saved)
        model.train(was_training)

    boxes = "boxes1" in batch and hasattr(model, "pooler")
    expected = _expected_rois(batch) if boxes else None
    wrong_image = wrong_rect = n_rois = 0
    for rois in recorder.calls:
        rois = rois.cpu().double()
        n_rois += rois.shape[0]
        if expected is None or rois.shape != expected.shape:
            wrong_image += rois.shape[0]
            continue
        wrong_image += int((rois[:, 0] != expected[:, 0].double()).sum())
        wrong_rect += int((rois[:, 1:] != expected[:, 1:].double()).any(1).sum())
    ref = _reference_units(model, shapes[0], device, expected) if shapes else torch.zeros(0, 0)
    # The image each unit must come from: the RoIs' images (SCRL), view 1 then view 2 (BYOL).
    intended = expected[:, 0].long() if expected is not None else torch.arange(ref.shape[0])
    per_channel = ref.shape[1] // shapes[0][1] if shapes else 1  # r * r bins per channel
    decoded = ref[:, 0].round().long() + _BASE * ref[:, per_channel].round().long() if shapes else intended
    units_wrong = n_units = 0
    for u in units:
        n_units += u.shape[0]
        if u.shape != ref.shape:
            units_wrong += u.shape[0]
            continue
        units_wrong += int((u.float() != ref.to(u.dtype).float()).any(1).sum())
    return PoolingAudit(
        dtype=str(dtype or torch.float32).replace("torch.", ""), kernel_calls=len(recorder.calls), rois=n_rois,
        rois_dtype=str(recorder.calls[0].dtype).replace("torch.", "") if recorder.calls else "-",
        wrong_image=wrong_image, wrong_rectangle=wrong_rect, units=n_units, units_wrong_image=units_wrong,
        units_readable=int((decoded == intended).sum()) * len(units))


def pooling_check(cfg, batch: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], dtype: Optional[torch.dtype],
                  device: torch.device) -> PoolingAudit:
    """:func:`audit_pooling` of the model ``cfg`` builds, with the weights ``state``, in
    ``cfg``'s memory format (MODEL.CHANNELS_LAST; eager), under autocast of ``dtype`` (the
    run's: ``scrl_d2.engine.amp_dtype(cfg, device)``; None: fp32). Every RoI must reach the
    kernel with its intended image and rectangle, and every pooled unit come from its
    image: a loss tolerance cannot see a misread box."""
    model = build_model(cfg).to(device)
    model.load_state_dict(state)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return audit_pooling(model, batch, dtype, device)
