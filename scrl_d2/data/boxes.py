"""Spatially consistent box pairs: the heart of SCRL.

For each image, ``K`` boxes are drawn inside the region of the *original image* that
both views cover; each is expressed in both views' pixel coordinates (flip-aware), so
a pair pools the same content from the two views. Sampling follows the official
release: the intersection is scaled by the smaller of the two views' scales, a random
grid division / cell / box with sides >= ``min_size`` is drawn, and a box whose IoU
with an earlier box of the same image is not below ``iou_threshold`` is redrawn (at
most ``max_tries`` draws; the last one is kept).

The generator is vectorised over images: candidates are drawn for all images at once,
and only the ``K`` acceptance steps loop. It runs in the data-loader workers.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

__all__ = ["BoxPairGenerator", "view_to_original", "box_iou"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a[..., N, 4]`` and ``b[..., M, 4]`` (x1, y1, x2, y2) -> ``[..., N, M]``."""
    a = a[..., :, None, :]
    b = b[..., None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(inter > 0, inter / np.maximum(union, 1e-12), 0.0)


def view_to_original(boxes: np.ndarray, geom: np.ndarray, input_size: int) -> np.ndarray:
    """Map boxes ``[..., 4]`` from a view's pixels back to original-image pixels.

    ``geom`` is the view's ``(top, left, height, width, flipped)``; used by tests and
    the visualiser to check that both boxes of a pair cover the same rectangle.
    """
    top, left, h, w, flip = (np.asarray(geom, dtype=np.float64)[..., i] for i in range(5))
    x1, y1, x2, y2 = (boxes[..., i].astype(np.float64) for i in range(4))
    flip = np.broadcast_to(flip[..., None] if boxes.ndim > np.ndim(flip) else flip, x1.shape)
    x1, x2 = np.where(flip > 0.5, input_size - x2, x1), np.where(flip > 0.5, input_size - x1, x2)

    def expand(v):
        v = np.asarray(v)
        return v[..., None] if boxes.ndim - 1 > v.ndim else v

    sx, sy = expand(w) / input_size, expand(h) / input_size
    return np.stack(
        [x1 * sx + expand(left), y1 * sy + expand(top), x2 * sx + expand(left), y2 * sy + expand(top)],
        axis=-1,
    )


@dataclass
class BoxPairGenerator:
    input_size: int = 224
    num_boxes: int = 10
    min_size: int = 32
    iou_threshold: float = 0.5
    max_tries: int = 50
    grid_based: bool = True
    jitter: bool = False
    jitter_ratio: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> "BoxPairGenerator":
        s = cfg.MODEL.SCRL
        return cls(
            input_size=cfg.INPUT.CROP_SIZE,
            num_boxes=s.NUM_BOXES,
            min_size=s.MIN_SIZE,
            iou_threshold=s.IOU_THRESHOLD,
            max_tries=s.MAX_TRIES,
            grid_based=s.GRID_BASED,
            jitter=s.BOX_JITTER,
            jitter_ratio=s.BOX_JITTER_RATIO,
        )

    def _intersection(self, g1: np.ndarray, g2: np.ndarray):
        S = float(self.input_size)
        t1, l1, h1, w1 = g1[:, 0], g1[:, 1], g1[:, 2], g1[:, 3]
        t2, l2, h2, w2 = g2[:, 0], g2[:, 1], g2[:, 2], g2[:, 3]
        int_l, int_r = np.maximum(l1, l2), np.minimum(l1 + w1, l2 + w2)
        int_t, int_b = np.maximum(t1, t2), np.minimum(t1 + h1, t2 + h2)
        sw1, sh1, sw2, sh2 = S / w1, S / h1, S / w2, S / h2
        swmin, shmin = np.minimum(sw1, sw2), np.minimum(sh1, sh2)
        overlap = (int_l < int_r) & (int_t < int_b)
        iw = np.where(overlap, np.round((int_r - int_l) * swmin), 0.0)
        ih = np.where(overlap, np.round((int_b - int_t) * shmin), 0.0)
        usable = overlap & (iw > self.min_size) & (ih > self.min_size)
        return usable, int_l, int_t, iw, ih, swmin, shmin, (sw1, sh1, sw2, sh2)

    def views_overlap(self, geom1, geom2) -> bool:
        """Whether two views share enough area for at least one box pair."""
        g1 = np.asarray(geom1, dtype=np.float64).reshape(1, 5)
        g2 = np.asarray(geom2, dtype=np.float64).reshape(1, 5)
        return bool(self._intersection(g1, g2)[0][0])

    def __call__(
        self, geom1: np.ndarray, geom2: np.ndarray, rng: np.random.Generator
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Box pairs for a batch of view geometries.

        Args:
            geom1, geom2: ``[B, 5]`` (top, left, height, width, flipped) of each view's
                crop in original-image pixels.
        Returns:
            ``boxes1, boxes2``: ``[B, K, 4]`` float32 (x1, y1, x2, y2) in each view's
            pixels; ``valid``: ``[B, K]`` bool, False for every box of an image whose
            views do not share a usable region (those boxes are zeros).
        """
        g1 = np.asarray(geom1, dtype=np.float64).reshape(-1, 5)
        g2 = np.asarray(geom2, dtype=np.float64).reshape(-1, 5)
        B, K = g1.shape[0], self.num_boxes
        usable, int_l, int_t, iw, ih, swmin, shmin, scales = self._intersection(g1, g2)
        chosen1 = np.zeros((B, K, 4))
        chosen2 = np.zeros((B, K, 4))
        img = np.flatnonzero(usable)
        if img.size:
            geo = (g1[img], g2[img], int_l[img], int_t[img], iw[img], ih[img], swmin[img],
                   shmin[img], tuple(s[img] for s in scales))
            c1, c2 = self._accept(geo, len(img), rng)
            chosen1[img], chosen2[img] = c1, c2
        valid = np.repeat(usable[:, None], K, axis=1)
        return chosen1.astype(np.float32), chosen2.astype(np.float32), valid

    def _accept(self, geo, n: int, rng: np.random.Generator):
        """Sequential acceptance over the K slots: each slot takes the first candidate
        whose IoU with every earlier box of its image (in view 1) is below the
        threshold, else its last (``max_tries``-th) draw. Candidates are drawn in
        chunks for the images still waiting, so typical slots cost one small draw."""
        K, T, S = self.num_boxes, self.max_tries, float(self.input_size)
        chosen1 = np.zeros((n, K, 4))
        chosen2 = np.zeros((n, K, 4))
        for k in range(K):
            pending = np.arange(n)
            tries = 0
            chunk = 2
            while pending.size:
                c = min(chunk, T - tries)
                c1, c2 = self._draw(geo, pending, c, rng)  # [p, c, 4]
                tries += c
                if k == 0 or self.iou_threshold >= 1.0:
                    pick = np.zeros(pending.size, dtype=np.int64)
                    done = np.ones(pending.size, dtype=bool)
                else:
                    ok = box_iou(c1, chosen1[pending, :k]).max(axis=-1) < self.iou_threshold
                    done = ok.any(axis=1)
                    pick = ok.argmax(axis=1)
                    if tries >= T:  # out of tries: keep the last draw
                        pick = np.where(done, pick, c - 1)
                        done[:] = True
                rows = np.flatnonzero(done)
                chosen1[pending[rows], k] = self._clip(c1[rows, pick[rows]], S)
                chosen2[pending[rows], k] = self._clip(c2[rows, pick[rows]], S)
                pending = pending[~done]
                chunk = 16
        return chosen1, chosen2

    def _draw(self, geo, sel: np.ndarray, c: int, rng: np.random.Generator):
        """``c`` candidate pairs for each image of ``sel``, in both views' pixels."""
        g1, g2, int_l, int_t, iw, ih, swmin, shmin, (sw1, sh1, sw2, sh2) = geo
        m, S = self.min_size, float(self.input_size)
        iw, ih = iw[sel, None], ih[sel, None]
        u = rng.random((6, sel.size, c))
        if self.grid_based:
            div_w = 1 + np.floor(u[0] * np.floor(iw / m))  # uniform in [1, floor(iw/m)]
            div_h = 1 + np.floor(u[1] * np.floor(ih / m))
            grid_w, grid_h = iw / div_w, ih / div_h
            bw = m + np.floor(u[2] * (np.floor(grid_w + 1) - m))  # in [m, floor(grid_w)]
            bh = m + np.floor(u[3] * (np.floor(grid_h + 1) - m))
            cell = rng.random((2, sel.size, c))
            bx = np.floor(u[4] * np.floor(grid_w - bw + 1)) + np.floor(np.floor(cell[0] * div_w) * grid_w)
            by = np.floor(u[5] * np.floor(grid_h - bh + 1)) + np.floor(np.floor(cell[1] * div_h) * grid_h)
        else:
            bw = m + np.floor(u[0] * (iw - m))  # in [m, iw - 1]
            bh = m + np.floor(u[1] * (ih - m))
            bx = np.floor(u[2] * (iw - bw))
            by = np.floor(u[3] * (ih - bh))
        # The candidate rectangle in original-image pixels ...
        x0 = int_l[sel, None] + bx / swmin[sel, None]
        y0 = int_t[sel, None] + by / shmin[sel, None]
        x1 = x0 + bw / swmin[sel, None]
        y1 = y0 + bh / shmin[sel, None]
        # ... and in each view's pixels, mirrored for a flipped view.
        c1 = self._to_view(x0, y0, x1, y1, g1[sel], sw1[sel], sh1[sel], S)
        c2 = self._to_view(x0, y0, x1, y1, g2[sel], sw2[sel], sh2[sel], S)
        if self.jitter:
            c2 = self._jitter(c2, rng)
        return c1, c2

    @staticmethod
    def _to_view(x0, y0, x1, y1, g, sw, sh, S):
        left, top, flip = g[:, 1, None], g[:, 0, None], g[:, 4, None] > 0.5
        sw, sh = sw[:, None], sh[:, None]
        l, r = (x0 - left) * sw, (x1 - left) * sw
        t, b = (y0 - top) * sh, (y1 - top) * sh
        l, r = np.where(flip, S - r, l), np.where(flip, S - l, r)
        return np.stack([l, t, r, b], axis=-1)  # [n, c, 4]

    def _jitter(self, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The release's jitter of the second view's box: shift and rescale each side."""
        j = rng.uniform(1.0 - self.jitter_ratio, 1.0 + self.jitter_ratio, size=c.shape)
        w, h = c[..., 2] - c[..., 0], c[..., 3] - c[..., 1]
        l = c[..., 0] + w * (j[..., 0] - 1)
        t = c[..., 1] + h * (j[..., 1] - 1)
        return np.stack([l, t, l + w * j[..., 2], t + h * j[..., 3]], axis=-1)

    @staticmethod
    def _clip(b: np.ndarray, S: float) -> np.ndarray:
        return np.concatenate([np.maximum(b[:, :2], 0.0), np.minimum(b[:, 2:], S)], axis=-1)
