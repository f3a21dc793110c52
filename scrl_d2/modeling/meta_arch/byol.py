"""BYOL: online encoder + projector + predictor regress an EMA target's projection."""
import logging
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import configurable
from ...utils.errors import InputValueError
from ..backbone import build_backbone
from ..heads import MLPHead
from .build import META_ARCH_REGISTRY

__all__ = ["BYOL", "regression_loss", "symmetric_loss"]

logger = logging.getLogger("scrl_d2.modeling")


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-row ``2 - 2 cos(p, z)``, computed in float32."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.float(), dim=1)
    return 2 - 2 * (p * z).sum(dim=1)


def symmetric_loss(p: torch.Tensor, z: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``p``, ``z``: ``[2M, D]``, view-1 rows then view-2 rows. Online view 1 regresses
    target view 2 and vice versa; the mean over the M pairs of the summed terms."""
    p1, p2 = p.chunk(2)
    z1, z2 = z.chunk(2)
    per_pair = regression_loss(p1, z2) + regression_loss(p2, z1)
    if weight is None:
        return per_pair.mean()
    return (per_pair * weight).sum() / weight.sum().clamp(min=1.0)


def _event_storage():
    """The active ``EventStorage`` (Detectron2's when installed), else None."""
    from ...utils.events import get_event_storage, has_event_storage

    return get_event_storage() if has_event_storage() else None


@META_ARCH_REGISTRY.register()
class BYOL(nn.Module):
    """The pooled feature of each view is the unit that the two views must agree on."""

    @configurable
    def __init__(self, *, backbone: nn.Module, target_backbone: nn.Module, projector: nn.Module,
                 target_projector: nn.Module, predictor: nn.Module, pixel_mean, pixel_std,
                 in_feature: str = "res5", target_init: str = "random", probe: Optional[nn.Module] = None,
                 channels_last: bool = False):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.target_backbone, self.target_projector = target_backbone, target_projector
        self.probe = probe
        self.metrics: Dict[str, torch.Tensor] = {}  # of the last forward (see forward)
        # Put metrics into the active EventStorage at every forward (one device read each),
        # as Detectron2 models do. scrl_d2's trainer turns it off: it reads them lazily.
        self.report_to_storage = True
        self.in_feature = in_feature
        self.channels_last = channels_last
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)
        if target_init == "online":
            self.target_backbone.load_state_dict(self.backbone.state_dict())
            self.target_projector.load_state_dict(self.projector.state_dict())
        elif target_init != "random":
            raise InputValueError(f"MODEL.BYOL.TARGET_INIT: {target_init!r} is not 'random' or 'online'")
        for p in self.target_parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, num_classes: int = 0) -> dict:
        b = cfg.MODEL.BYOL
        backbone, target_backbone = build_backbone(cfg), build_backbone(cfg)
        in_feature = cfg.MODEL.RESNETS.OUT_FEATURES[-1]
        dim = backbone.output_shape()[in_feature].channels
        in_dim = cls.pooled_dim(cfg, dim)
        num_classes = cfg.MODEL.PROBE.NUM_CLASSES or num_classes
        probe = None
        if cfg.MODEL.PROBE.ENABLED:
            if num_classes > 0:
                probe = nn.Linear(dim, num_classes)
            else:
                logger.warning("MODEL.PROBE.ENABLED but the training data has no labels: no online probe")
        return dict(
            backbone=backbone, target_backbone=target_backbone,
            projector=MLPHead(in_dim, b.PROJECTOR_HIDDEN_DIM, b.PROJECTION_DIM, b.HEAD_NORM),
            target_projector=MLPHead(in_dim, b.PROJECTOR_HIDDEN_DIM, b.PROJECTION_DIM, b.HEAD_NORM),
            predictor=MLPHead(b.PROJECTION_DIM, b.PREDICTOR_HIDDEN_DIM, b.PROJECTION_DIM, b.HEAD_NORM),
            pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD, in_feature=in_feature,
            target_init=b.TARGET_INIT, probe=probe, channels_last=cfg.MODEL.CHANNELS_LAST,
        )

    @staticmethod
    def pooled_dim(cfg, channels: int) -> int:
        return channels

    # --- pieces -------------------------------------------------------------------
    def online_parameters(self):
        """Everything the optimizer trains (the probe included: it has its own loss)."""
        return [p for n, p in self.named_parameters() if not n.startswith("target_") and p.requires_grad]

    def target_parameters(self):
        return list(self.target_backbone.parameters()) + list(self.target_projector.parameters())

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- m * target + (1 - m) * online, over parameters (BYOL's EMA)."""
        online = list(self.backbone.parameters()) + list(self.projector.parameters())
        target = self.target_parameters()
        torch._foreach_lerp_(target, online, 1.0 - momentum)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.pixel_mean) / self.pixel_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def pool(self, features: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """Units to compare, ``[2M, C]`` (view 1 rows then view 2 rows), their weights
        (None: all count) and M, the number of pairs that count."""
        return features.mean(dim=(2, 3)), None, features.shape[0] // 2

    # --- forward ------------------------------------------------------------------
    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The losses only (``loss``, ``loss_probe``): Detectron2's trainers sum every value
        of the returned dict. Metrics (``num_pairs``, ``probe_acc``) go to ``self.metrics``
        and, when a Detectron2 ``EventStorage`` is active, to it (as its models report)."""
        x = torch.cat([self.preprocess(batch["view1"]), self.preprocess(batch["view2"])])
        feats = self.backbone(x)[self.in_feature]
        units, weight, num_pairs = self.pool(feats, batch)
        p = self.predictor(self.projector(units))
        with torch.no_grad():
            t_units, _, _ = self.pool(self.target_backbone(x)[self.in_feature], batch)
            z = self.target_projector(t_units)
        losses = {"loss": symmetric_loss(p, z, weight)}
        metrics = {"num_pairs": torch.tensor(float(num_pairs))}
        if self.probe is not None:
            losses["loss_probe"], metrics["probe_acc"] = self._probe(feats, batch["label"])
        self.report(metrics)
        return losses

    @torch.compiler.disable  # a side effect, not part of the compiled graph
    def report(self, metrics: Dict[str, torch.Tensor]) -> None:
        self.metrics = metrics
        storage = _event_storage() if self.report_to_storage else None
        if storage is not None:
            storage.put_scalars(**{k: float(v) for k, v in metrics.items()})

    def _probe(self, feats: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Linear classifier on the detached pooled feature: it learns, the encoder does not.
        Returns its loss and accuracy."""
        logits = self.probe(feats.mean(dim=(2, 3)).detach().float())
        labels = torch.cat([labels, labels]).to(logits.device)
        return (F.cross_entropy(logits, labels, ignore_index=-1),
                (logits.argmax(1) == labels).float().mean().detach())

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Probe logits for evaluation images (online encoder, eval mode)."""
        feats = self.backbone(self.preprocess(images))[self.in_feature]
        return self.probe(feats.mean(dim=(2, 3)).float())
