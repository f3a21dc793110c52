"""The release's offline linear evaluation, resumable, multi-process, mixed precision.

A linear classifier on the frozen backbone's pooled feature (backbone in eval mode, so
BN uses running statistics), trained on DATASETS.TRAIN with RandomResizedCrop + flip,
LARS over SGD-nesterov with every parameter adapted, warm-up then cosine; top-1 on
DATASETS.TEST[0] after resize + centre crop. ``LINEAR_EVAL.FINETUNE`` trains the
backbone too; ``LINEAR_EVAL.PRECOMPUTE_FEATURES`` trains on centre-crop features
extracted once (no augmentation; labelled so in the results).
"""
import contextlib
import json
import logging
import os
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import Checkpointer, prune_epoch_checkpoints
from ..data import build_eval_loader, dataset_dicts_of
from ..data.build import _loader_kwargs
from ..data.classification import LinearTrainDataset
from ..data.datasets import SeededSampler
from ..solver import LARS, warmup_cosine
from ..utils import comm
from ..utils.errors import InputValueError
from ..utils.fs import atomic_write
from .knn import extract_features

__all__ = ["Encoder", "LinearEvaluator"]

logger = logging.getLogger("scrl_d2.evaluation")


class Encoder(nn.Module):
    """uint8 images -> normalised -> backbone -> global-average-pooled ``in_feature``."""

    def __init__(self, backbone: nn.Module, pixel_mean, pixel_std, in_feature: str = "res5",
                 channels_last: bool = False):
        super().__init__()
        self.backbone, self.in_feature, self.channels_last = backbone, in_feature, channels_last
        self.register_buffer("mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.dim = backbone.output_shape()[in_feature].channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)[self.in_feature].mean(dim=(2, 3))


class LinearEvaluator:
    def __init__(self, cfg, encoder: Encoder, device: torch.device, dtype: Optional[torch.dtype],
                 output_dir: Optional[str] = None, label: str = ""):
        le = cfg.LINEAR_EVAL
        if not cfg.DATASETS.TEST:
            raise InputValueError("linear evaluation needs a labelled DATASETS.TEST (e.g. imagenet_val)")
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.output_dir = output_dir or os.path.join(cfg.OUTPUT_DIR, "linear_eval")
        self.label = label  # e.g. "random init" (TEST.RANDOM_BASELINE): named in the result line
        self.world = comm.get_world_size()
        dicts, num_classes = dataset_dicts_of(cfg)
        if num_classes <= 0:
            raise InputValueError(f"linear evaluation needs labelled training data; {cfg.DATASETS.TRAIN} has no "
                                  "classes")
        self.num_classes = num_classes
        self.encoder = encoder.to(device)
        self.finetune = le.FINETUNE
        self.precompute = le.PRECOMPUTE_FEATURES and not le.FINETUNE
        for p in self.encoder.parameters():
            p.requires_grad_(self.finetune)
        self.classifier = nn.Linear(encoder.dim, num_classes).to(device)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        self.train_set = LinearTrainDataset(dicts, cfg.INPUT.CROP_SIZE, le.CROP_SCALE, cfg.INPUT.INTERPOLATION,
                                            cfg.INPUT.EXIF_TRANSPOSE)
        self.sampler = SeededSampler(len(self.train_set), le.IMS_PER_GPU, seed, comm.get_rank(), self.world)
        self.iters_per_epoch = self.sampler.iters_per_epoch
        params = list(self.classifier.parameters()) + (list(self.encoder.parameters()) if self.finetune else [])
        self.lr = le.BASE_LR * le.IMS_PER_GPU * self.world / 256.0
        if le.OPTIMIZER == "LARS":
            self.optimizer = LARS(params, lr=self.lr, momentum=le.MOMENTUM, weight_decay=le.WEIGHT_DECAY,
                                  nesterov=le.NESTEROV, trust_coef=cfg.SOLVER.LARS_TRUST_COEF, eps=cfg.SOLVER.LARS_EPS)
        elif le.OPTIMIZER == "SGD":
            self.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=le.MOMENTUM, weight_decay=le.WEIGHT_DECAY,
                                             nesterov=le.NESTEROV)
        else:
            raise InputValueError(f"LINEAR_EVAL.OPTIMIZER: {le.OPTIMIZER!r} is not 'LARS' or 'SGD'")
        self.schedule = warmup_cosine(self.lr, le.WARMUP_EPOCHS, le.EPOCHS, self.iters_per_epoch, "LINEAR_EVAL")
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
        trained = nn.ModuleDict({"classifier": self.classifier, **({"encoder": self.encoder} if self.finetune else {})})
        self.trained = trained
        if self.world > 1:  # same start everywhere; gradients are averaged in _train_epoch
            for t in trained.state_dict().values():
                torch.distributed.broadcast(t, 0)
        self.checkpointer = Checkpointer(trained, self.output_dir, save_to_disk=comm.is_main_process(),
                                         optimizer=self.optimizer, scaler=self.scaler)
        self.epoch, self.best, self.best_epoch, self.history = 0, -1.0, 0, []

    def protocol(self) -> Dict:
        le = self.cfg.LINEAR_EVAL
        return {"mode": "fine-tune" if self.finetune else "linear", "epochs": le.EPOCHS, "warmup_epochs":
                le.WARMUP_EPOCHS, "base_lr": le.BASE_LR, "lr": self.lr, "batch_per_gpu": le.IMS_PER_GPU,
                "global_batch": le.IMS_PER_GPU * self.world,
                "optimizer": f"{le.OPTIMIZER}{' (SGD nesterov)' if le.NESTEROV else ''}", "weight_decay": le.WEIGHT_DECAY, "train_augmentation":
                "none (precomputed-features, centre crop)" if self.precompute else
                f"RandomResizedCrop({self.cfg.INPUT.CROP_SIZE}, scale={tuple(le.CROP_SCALE)}) + flip",
                "eval_transform": f"resize {int(round(self.cfg.INPUT.CROP_SIZE * 256 / 224))} + centre crop "
                f"{self.cfg.INPUT.CROP_SIZE}", "train_set": list(self.cfg.DATASETS.TRAIN),
                "test_set": self.cfg.DATASETS.TEST[0], "num_classes": self.num_classes}

    def _autocast(self):
        return (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                else contextlib.nullcontext())

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        if self.checkpointer.has_checkpoint():
            path = self.checkpointer.get_checkpoint_file()
            extra = self.checkpointer.load(path)
            st = extra.get("linear_eval", {})
            self.epoch, self.best, self.best_epoch = st.get("epoch", 0), st.get("best", -1.0), st.get("best_epoch", 0)
            self.history = st.get("history", [])
            logger.info(f"linear evaluation resumed from {path} at epoch {self.epoch}")

    def _save(self) -> None:
        """The epoch's checkpoint; older ones are deleted except the best epoch's."""
        self.checkpointer.save(f"checkpoint_{self.epoch}", linear_eval={
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "history": self.history})
        if comm.is_main_process():
            prune_epoch_checkpoints(self.output_dir, keep_last=1,
                                    keep=[os.path.join(self.output_dir, f"checkpoint_{self.best_epoch}.pth")])
        comm.synchronize()

    # ------------------------------------------------------------------ run
    def run(self) -> Dict:
        le = self.cfg.LINEAR_EVAL
        logger.info(f"linear evaluation ({self.protocol()['mode']}, {self.protocol()['train_augmentation']}): "
                    f"{le.EPOCHS} epochs x {self.iters_per_epoch} iterations, lr {self.lr:g}")
        test_loader = build_eval_loader(self.cfg, self.cfg.DATASETS.TEST[0])
        feats = self._precomputed() if self.precompute else None
        while self.epoch < le.EPOCHS:
            t0 = time.perf_counter()
            loss = self._train_epoch(feats)
            self.epoch += 1
            msg = f"linear eval epoch {self.epoch}/{le.EPOCHS}: loss {loss:.4f} ({time.perf_counter() - t0:.1f}s)"
            if self.epoch % le.EVAL_PERIOD == 0 or self.epoch == le.EPOCHS:
                top1 = self.evaluate(test_loader, feats)
                self.history.append({"epoch": self.epoch, "top1": top1, "loss": loss})
                if top1 > self.best:
                    self.best, self.best_epoch = top1, self.epoch
                msg += f", top-1 {top1:.2f}% (best {self.best:.2f}% @ {self.best_epoch})"
            logger.info(msg)
            self._save()
        last = self.history[-1]["top1"] if self.history else self.evaluate(test_loader, feats)
        result = {"top1_last": last, "top1_best": self.best, "best_epoch": self.best_epoch,
                  "protocol": self.protocol(), "history": self.history}
        if comm.is_main_process():
            atomic_write(os.path.join(self.output_dir, "linear_eval.json"),
                         lambda f: f.write(json.dumps(result, indent=1)), mode="w")
            tag = f" [{self.label}]" if self.label else ""
            line = (f"[Final result (linear eval.)] [{self.cfg.OUTPUT_DIR}]{tag} last: {last:.3f}%, "
                    f"max: {self.best:.3f}% @{self.best_epoch}ep. ({result['protocol']['mode']}, "
                    f"{result['protocol']['train_augmentation']})")
            with open(os.path.join(self.cfg.OUTPUT_DIR, "log_result.txt"), "a") as f:
                f.write(line + "\n")
            logger.info(line)
        return result

    def _precomputed(self) -> Dict:
        """Centre-crop features of the training and test sets, extracted once."""
        self.encoder.eval()
        train_loader = build_eval_loader(self.cfg, self.cfg.DATASETS.TRAIN[0])
        with self._autocast():
            tr = extract_features(self.encoder, train_loader, self.device)
        logger.info(f"precomputed {len(tr['labels'])} training features (no augmentation)")
        return tr

    def _train_epoch(self, feats: Optional[Dict]) -> float:
        self.encoder.train(self.finetune)  # frozen backbone: eval mode, BN running statistics
        self.classifier.train()
        losses = []
        if feats is not None:
            g = torch.Generator().manual_seed((self.cfg.SEED if self.cfg.SEED >= 0 else 0) + self.epoch)
            order = torch.randperm(len(feats["labels"]), generator=g)
            bs = self.cfg.LINEAR_EVAL.IMS_PER_GPU
            batches = [(feats["features"][order[i:i + bs]], feats["labels"][order[i:i + bs]])
                       for i in range(0, len(order) - bs + 1, bs)] or [(feats["features"], feats["labels"])]
        else:
            self.sampler.set_epoch(self.epoch)
            kw = _loader_kwargs(self.cfg)
            kw["persistent_workers"] = False
            loader = torch.utils.data.DataLoader(self.train_set, batch_size=self.cfg.LINEAR_EVAL.IMS_PER_GPU,
                                                 sampler=self.sampler, drop_last=True, **kw)
            batches = ((b["image"], b["label"]) for b in loader)
        for i, (x, y) in enumerate(batches):
            step = self.epoch * self.iters_per_epoch + i
            for grp in self.optimizer.param_groups:
                grp["lr"] = self.schedule(min(step, self.schedule.total - 1))
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                if feats is None:
                    with torch.set_grad_enabled(self.finetune):
                        x = self.encoder(x)
                logits = self.classifier(x.float())
            loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.world > 1:
                grads = [p.grad for p in self.trained.parameters() if p.grad is not None]
                flat = torch.cat([g.reshape(-1) for g in grads])
                torch.distributed.all_reduce(flat)
                parts = flat.div_(self.world).split([g.numel() for g in grads])
                torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(parts, grads)])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses.append(loss.detach())
        return float(torch.stack(losses).mean()) if losses else float("nan")

    @torch.no_grad()
    def evaluate(self, loader, feats: Optional[Dict] = None) -> float:
        self.encoder.eval()
        self.classifier.eval()
        correct = total = 0
        for b in loader:
            with self._autocast():
                logits = self.classifier(self.encoder(b["image"].to(self.device)).float())
            y = b["label"].to(self.device)
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
        correct, total = comm.all_reduce_cpu_sum(correct), comm.all_reduce_cpu_sum(total)
        return 100.0 * correct / max(total, 1)
