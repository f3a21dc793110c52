"""Spatially consistent box pairs: the heart of SCRL.

For each image, ``K`` boxes are drawn inside the region of the *original image* that
both views cover; each is expressed in both views' pixel coordinates (flip-aware), so
a pair pools the same content from the two views. Sampling follows the official
release: the intersection is scaled by the smaller of the two views' scales, a random
grid division / cell / box with sides >= ``min_size`` is drawn, and a box whose IoU
with an earlier box of the same image is not below ``iou_threshold`` is redrawn (at
most ``max_tries`` draws; the last one is kept).

The generator is vectorised over a whole batch: candidates are drawn for all images at
once and only the ``K`` acceptance steps loop. It runs once per batch in the loader's
collate step (a worker), never on the training thread.

``reproduce_flip_bug`` (``MODEL.SCRL.REPRODUCE_FLIP_BUG``) reproduces the release's
generator as it was before its May 2021 fix, the code that trained the released
checkpoints: for a flipped view the new left edge was computed as ``S - right`` and the
right edge then as ``S - left`` from the *overwritten* left, so it kept its unflipped
value. A flipped view's box is then ``[S - right, right]`` (clipped), which covers other
content than its partner (inverted where ``right < S / 2``), and the IoU rejection ran
on those view-1 coordinates. With flips of probability 0.5 per view, about 3 in 4 pairs
are affected.
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
    # The release's pre-fix flip arithmetic (see the module docstring); off: the fixed code.
    reproduce_flip_bug: bool = False
    # Candidates drawn per image up front (fast path); more cost memory, fewer
    # leave images to the slot-by-slot path. Does not change the distribution.
    stream_candidates: int = 16

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
            reproduce_flip_bug=s.REPRODUCE_FLIP_BUG,
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
        boxes1 = np.zeros((B, K, 4), np.float32)
        boxes2 = np.zeros((B, K, 4), np.float32)
        img = np.flatnonzero(usable)
        if img.size:
            geo = (g1[img], g2[img], int_l[img], int_t[img], iw[img], ih[img], swmin[img],
                   shmin[img], tuple(s[img] for s in scales))
            grid = self._accept(geo, rng)
            boxes1[img], boxes2[img] = self._to_views(geo, grid, rng)
        valid = np.repeat(usable[:, None], K, axis=1)
        return boxes1, boxes2, valid

    # ------------------------------------------------------------------ sampling
    # Boxes are drawn and compared in the intersection's integer grid (the release's
    # box_x, box_y, box_w, box_h); IoU there equals IoU in view 1's pixels (the map is
    # a per-axis scale and shift), so acceptance is decided before any mapping.
    def _accept(self, geo, rng: np.random.Generator) -> np.ndarray:
        """The K accepted grid boxes ``[4, n, K]`` (x0, y0, x1, y1) of each image.

        Each slot takes the first candidate whose IoU with every earlier box of its
        image is below the threshold, else its ``max_tries``-th draw (the release's
        rule). Candidates come as a stream per image, consumed greedily: a candidate
        rejected for one slot stays rejected for the later ones (the accepted set only
        grows), so a whole batch costs K vectorised steps per round. The few images
        whose stream runs dry get a fresh stream in another round."""
        n, K, T = geo[4].shape[0], self.num_boxes, self.max_tries
        out = np.zeros((4, n, K), dtype=np.float32)
        fill = np.zeros(n, dtype=np.int64)  # slots filled so far
        spent = np.zeros(n, dtype=np.int64)  # tries already used on the open slot
        pending = np.arange(n)
        c = max(1, min(T, max(self.stream_candidates, K)))
        while pending.size:
            cand = self._draw(geo, pending, c, rng)  # [4, p, c]
            sub = out[:, pending]
            key = self._flip_bug_key(geo, pending) if self.reproduce_flip_bug else None
            f, s = self._consume(cand, sub, fill[pending], spent[pending], key)
            out[:, pending], fill[pending], spent[pending] = sub, f, s
            pending = pending[f < K]
            # No slot may pass its try budget inside a stream (see _consume).
            c = int(min(4 * self.stream_candidates, T - spent[pending].max(initial=0)))
        return out

    def _flip_bug_key(self, geo, sel: np.ndarray):
        """Grid boxes ``[4, p, X]`` of images ``sel`` -> the coordinates the pre-fix release
        compared IoUs in: view 1's, where a flipped view 1 has x-range ``[S - r, r]``
        (``r`` its unflipped right edge). Rows of an unflipped view 1 stay in grid units
        (the same IoUs: the map is a per-axis scale and shift)."""
        g1, _, int_l, _, _, _, swmin, _, (sw1, _, _, _) = geo
        flip = (g1[sel, 4] > 0.5)[:, None]
        if not flip.any():
            return None
        a = (sw1[sel] / swmin[sel])[:, None]
        off = ((int_l[sel] - g1[sel, 1]) * sw1[sel])[:, None]
        S = self.input_size

        def key(b: np.ndarray) -> np.ndarray:
            r = b[2] * a + off
            k = b.copy()
            k[0] = np.where(flip, S - r, b[0])
            k[2] = np.where(flip, r, b[2])
            return k

        return key

    def _consume(self, cand: np.ndarray, out: np.ndarray, fill: np.ndarray, spent: np.ndarray, key=None):
        """Fill the open slots of ``out [4, p, K]`` from the stream ``cand [4, p, c]``
        (``spent + c <= max_tries``); returns the updated ``fill`` and ``spent``. Few,
        whole-array numpy operations per slot: this loop is the generator's cost.
        ``key`` maps boxes to the coordinates IoUs are compared in (None: as drawn)."""
        K, T, thr = self.num_boxes, self.max_tries, self.iou_threshold
        p, c = cand.shape[1:]
        kc = cand if key is None else key(cand).astype(cand.dtype)
        rows = np.arange(p)
        reject = thr < 1.0  # threshold 1: every draw is accepted, as in the release
        steps = K - int(fill.min())
        if not reject:
            picks = np.broadcast_to(np.arange(steps), (p, steps))
            found = picks < c
        else:
            # IoU(a, b) < thr  <=>  inter < thr / (1 + thr) * (area_a + area_b)
            half = (kc[2] - kc[0]) * (kc[3] - kc[1]) * np.float32(thr / (1.0 + thr))
            if key is not None:  # inverted boxes: the release's IoU takes |area| (and is 0)
                half = np.abs(half)
            if fill.any():  # candidates too close to boxes of earlier rounds are out
                ko = out if key is None else key(out)
                iou = box_iou(kc.transpose(1, 2, 0), ko.transpose(1, 2, 0))  # [p, c, K]
                iou = np.where(np.arange(K)[None, None] < fill[:, None, None], iou, 0.0)
                alive = iou.max(axis=2) < thr
            else:
                alive = np.ones((p, c), dtype=bool)
            picks = np.zeros((p, steps), dtype=np.int64)
            lo = np.empty((2, p, c), dtype=cand.dtype)
            hi = np.empty((2, p, c), dtype=cand.dtype)
            flat, half_flat, base = kc.reshape(4, p * c), half.reshape(-1), rows * c
            first_ok = alive.any(axis=1)
            for k in range(steps):
                # The first live candidate: everything before it was rejected, and the
                # pick rejects itself (IoU 1) and all candidates too close to it.
                idx = picks[:, k] = alive.argmax(axis=1)
                at = base + idx
                picked = flat.take(at, axis=1)[:, :, None]
                np.maximum(kc[:2], picked[:2], out=lo)
                np.minimum(kc[2:], picked[2:], out=hi)
                hi -= lo
                np.maximum(hi, 0.0, out=hi)
                alive &= hi[0] * hi[1] < half + half_flat.take(at)[:, None]
                if key is not None:  # an inverted pick has IoU 0 with itself
                    alive.reshape(-1)[at] = False
                if not alive.any():  # every stream is dry (typical of the few later rounds)
                    break
            # Picks of a row strictly increase until its stream is dry (argmax of an
            # all-rejected row is 0).
            found = np.concatenate([first_ok[:, None], picks[:, 1:] > picks[:, :-1]], axis=1)
            found = np.logical_and.accumulate(found, axis=1)
        found &= (fill[:, None] + np.arange(steps)[None]) < K
        if not fill.any():  # first round: slots are the step numbers (unfound ones are refilled later)
            out[:, :, :steps] = np.take_along_axis(cand, np.broadcast_to(picks, (4, p, steps)), axis=2)
        else:
            r, k = np.nonzero(found)
            out[:, r, fill[r] + k] = cand[:, r, picks[r, k]]
        count = found.sum(axis=1)
        last = np.where(count > 0, picks[rows, np.maximum(count - 1, 0)], -1)
        fill = fill + count
        spent = np.where(count > 0, c - 1 - last, spent + c)
        spent = np.where(fill < K, spent, 0)
        # A slot that used its last try without success keeps that try (the release).
        capped = (fill < K) & (spent >= T)
        if capped.any():
            r = rows[capped]
            out[:, r, fill[r]] = cand[:, r, c - 1]
            fill[r] += 1
            spent[r] = 0
        return fill, spent

    def _draw(self, geo, sel: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
        """``c`` candidate boxes ``[4, len(sel), c]`` per image of ``sel``, in grid units
        (x and y drawn together: rows 0/1 of every array are the x/y axis)."""
        m = np.float32(self.min_size)
        size = np.stack([geo[4][sel], geo[5][sel]]).astype(np.float32)[:, :, None]  # [2, s, 1]
        u = rng.random((4, 2, sel.size, c), dtype=np.float32)
        if self.grid_based:
            div = 1 + np.floor(u[0] * np.floor(size / m))  # uniform in [1, floor(size/m)]
            grid = size / div
            side = m + np.floor(u[1] * (np.floor(grid + 1) - m))  # in [m, floor(grid)]
            start = np.floor(u[2] * np.floor(grid - side + 1)) + np.floor(np.floor(u[3] * div) * grid)
        else:
            side = m + np.floor(u[0] * (size - m))  # in [m, size - 1]
            start = np.floor(u[1] * (size - side))
        return np.concatenate([start, start + side])

    def _to_views(self, geo, grid: np.ndarray, rng: np.random.Generator):
        """Grid boxes ``[4, n, K]`` -> ``[n, K, 4]`` boxes in each view's pixels
        (mirrored for a flipped view, view 2 jittered if asked, clipped to the view).

        view pixel = (intersection origin - crop origin) * view scale
                     + grid units * (view scale / grid scale)."""
        g1, g2, int_l, int_t, _, _, swmin, shmin, (sw1, sh1, sw2, sh2) = geo
        S = float(self.input_size)
        views = []
        for g, sw, sh in ((g1, sw1, sh1), (g2, sw2, sh2)):
            ratio = np.stack([sw / swmin, sh / shmin] * 2)[:, :, None]  # [4, n, 1]
            off = np.stack([(int_l - g[:, 1]) * sw, (int_t - g[:, 0]) * sh] * 2)[:, :, None]
            v = grid * ratio
            v += off
            flip = (g[:, 4] > 0.5)[:, None]
            if flip.any():
                x0 = np.where(flip, S - v[2], v[0])
                if not self.reproduce_flip_bug:  # the bug: right = S - (the new left) = old right
                    v[2] = np.where(flip, S - v[0], v[2])
                v[0] = x0
            views.append(v)
        v1, v2 = views
        if self.jitter:
            v2 = self._jitter(v2, rng)
        return self._clip(v1), self._clip(v2)

    def _jitter(self, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The release's jitter of the second view's box: shift and rescale each side."""
        j = rng.uniform(1.0 - self.jitter_ratio, 1.0 + self.jitter_ratio, size=c.shape)
        w, h = c[2] - c[0], c[3] - c[1]
        x0 = c[0] + w * (j[0] - 1)
        y0 = c[1] + h * (j[1] - 1)
        return np.stack([x0, y0, x0 + w * j[2], y0 + h * j[3]])

    def _clip(self, b: np.ndarray) -> np.ndarray:
        """``[4, n, K]`` -> ``[n, K, 4]`` float32, left/top >= 0 and right/bottom <= size."""
        np.maximum(b[:2], 0.0, out=b[:2])
        np.minimum(b[2:], float(self.input_size), out=b[2:])
        return b.transpose(1, 2, 0).astype(np.float32)
