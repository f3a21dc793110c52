"""Weighted k-nearest-neighbour classification on pooled features: a cheap monitor of
representation quality (InstDisc / solo-learn / VISSL style)."""
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ["knn_classify", "knn_top1", "extract_features"]


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                 k: int = 200, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each test feature: the ``k`` most cosine-similar training
    features vote with weight ``exp(sim / temperature)``."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, train.shape[0])
    preds = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_top1(train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor], num_classes: int,
             k: int = 200, temperature: float = 0.07) -> float:
    pred = knn_classify(train[0], train[1], test[0], num_classes, k, temperature)
    return 100.0 * float((pred == test[1].to(pred.device)).float().mean()) if len(pred) else 0.0


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device) -> Dict:
    """Pooled features and labels of every image of ``loader`` (this process's shard)."""
    feats, labels = [], []
    for batch in loader:
        feats.append(encode(batch["image"].to(device, non_blocking=True)).float().cpu())
        labels.append(batch["label"])
    return {"features": torch.cat(feats) if feats else torch.zeros(0), "labels": torch.cat(labels) if labels
            else torch.zeros(0, dtype=torch.long)}
