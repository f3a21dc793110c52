import numpy as np
import pytest

from scrl_d2.data.boxes import BoxPairGenerator, box_iou, view_to_original

S = 224


def random_geoms(rng, n, flip1=None, flip2=None, img=(400, 500)):
    def one(flip):
        h = rng.uniform(0.3, 1.0, n) * img[0]
        w = rng.uniform(0.3, 1.0, n) * img[1]
        top = rng.uniform(0, 1, n) * (img[0] - h)
        left = rng.uniform(0, 1, n) * (img[1] - w)
        f = rng.integers(0, 2, n) if flip is None else np.full(n, flip)
        return np.stack([top, left, h, w, f], 1)
    return one(flip1), one(flip2)


@pytest.mark.parametrize("flip1,flip2", [(0, 0), (1, 0), (0, 1), (1, 1), (None, None)])
@pytest.mark.parametrize("grid", [True, False])
def test_pairs_cover_the_same_original_rectangle(flip1, flip2, grid):
    rng = np.random.default_rng(0)
    g1, g2 = random_geoms(rng, 200, flip1, flip2)
    gen = BoxPairGenerator(input_size=S, grid_based=grid)
    b1, b2, valid = gen(g1, g2, rng)
    assert b1.shape == b2.shape == (200, 10, 4) and valid.shape == (200, 10)
    assert valid.any()
    o1 = view_to_original(b1, g1, S)[valid]
    o2 = view_to_original(b2, g2, S)[valid]
    # within a pixel of the views (the release rounds the scaled intersection, then clips)
    sx = np.minimum(S / g1[:, 3], S / g2[:, 3])[:, None].repeat(10, 1)[valid]
    sy = np.minimum(S / g1[:, 2], S / g2[:, 2])[:, None].repeat(10, 1)[valid]
    diff = np.abs(o1 - o2) * np.stack([sx, sy, sx, sy], 1)
    assert diff.max() <= 1.0, diff.max()
    assert np.median(np.abs(o1 - o2)) < 1e-3  # and exactly equal where nothing was clipped
    # both boxes lie inside their views and inside the views' common region
    assert (b1[valid] >= 0).all() and (b1[valid] <= S).all() and (b2[valid] >= 0).all() and (b2[valid] <= S).all()
    lo = np.maximum(g1[:, 1], g2[:, 1])[:, None].repeat(10, 1)[valid]
    assert (o1[:, 0] >= lo - 1.0).all()


def test_flip_mirrors_the_box():
    rng = np.random.default_rng(1)
    g = np.array([[0, 0, 224, 224, 0]], float)
    gf = np.array([[0, 0, 224, 224, 1]], float)
    gen = BoxPairGenerator(input_size=S)
    b1, b2, valid = gen(g, gf, rng)
    assert valid.all()
    np.testing.assert_allclose(b2[0, :, 0], S - b1[0, :, 2], atol=1e-4)
    np.testing.assert_allclose(b2[0, :, 2], S - b1[0, :, 0], atol=1e-4)
    np.testing.assert_allclose(b2[0, :, [1, 3]], b1[0, :, [1, 3]], atol=1e-4)


def test_min_size_and_iou_constraints():
    rng = np.random.default_rng(2)
    g1 = np.array([[0, 0, 300, 300, 0]] * 100, float)
    g2 = np.array([[20, 10, 280, 290, 1]] * 100, float)
    gen = BoxPairGenerator(input_size=S, min_size=32, iou_threshold=0.5)
    b1, b2, valid = gen(g1, g2, rng)
    assert valid.all()
    for b in (b1, b2):
        assert (b[..., 2] - b[..., 0] >= 32 - 1).all() and (b[..., 3] - b[..., 1] >= 32 - 1).all()
    iou = box_iou(b1, b1)
    iou[:, np.arange(10), np.arange(10)] = 0
    assert iou.max() < 0.5


def test_iou_rejection_keeps_last_try_when_no_room():
    # an intersection barely above min_size: every box nearly fills it, IoU cannot stay low
    rng = np.random.default_rng(3)
    g1 = np.array([[0, 0, 224, 224, 0]], float)
    g2 = np.array([[0, 0, 34, 34, 0]], float)  # 34 px of original = 34 px in the view of smaller scale
    gen = BoxPairGenerator(input_size=S, min_size=32)
    b1, b2, valid = gen(g1, g2, rng)
    assert valid.all()  # boxes still produced: the last draw is kept after max_tries
    np.testing.assert_allclose(view_to_original(b1, g1, S), view_to_original(b2, g2, S), atol=1.0)


def test_no_overlap_and_tiny_overlap_give_no_boxes():
    rng = np.random.default_rng(4)
    gen = BoxPairGenerator(input_size=S, min_size=32)
    g1 = np.array([[0, 0, 100, 100, 0], [0, 0, 100, 100, 0], [0, 0, 200, 200, 1]], float)
    g2 = np.array([[0, 150, 100, 100, 1], [90, 90, 100, 100, 0], [10, 10, 200, 200, 0]], float)
    b1, b2, valid = gen(g1, g2, rng)
    assert not valid[0].any() and not valid[1].any() and valid[2].all()
    assert (b1[:2] == 0).all() and (b2[:2] == 0).all()
    assert not gen.views_overlap(g1[0], g2[0]) and gen.views_overlap(g1[2], g2[2])


def test_jitter_moves_only_the_second_view_box():
    rng = np.random.default_rng(5)
    g1, g2 = random_geoms(rng, 50, 0, 0)
    b1, b2, valid = BoxPairGenerator(input_size=S, jitter=True, jitter_ratio=0.1)(g1, g2, np.random.default_rng(9))
    c1, c2, _ = BoxPairGenerator(input_size=S)(g1, g2, np.random.default_rng(9))
    o1, o2 = view_to_original(b1, g1, S)[valid], view_to_original(b2, g2, S)[valid]
    assert np.abs(o1 - o2).max() > 1.0  # jittered: no longer identical
    w = o1[:, 2] - o1[:, 0]
    assert (np.abs(o1 - o2)[:, 0] <= 0.1 * w * 2 + 1.5).all()  # ...but only by about the jitter ratio


def test_batch_and_per_sample_generation_agree_in_distribution():
    g1 = np.array([[0, 0, 300, 300, 0]], float)
    g2 = np.array([[50, 50, 250, 250, 0]], float)
    gen = BoxPairGenerator(input_size=S)
    batch = gen(np.repeat(g1, 300, 0), np.repeat(g2, 300, 0), np.random.default_rng(0))[0]
    single = np.concatenate([gen(g1, g2, np.random.default_rng(i))[0] for i in range(300)])
    w_b = (batch[..., 2] - batch[..., 0]).mean()
    w_s = (single[..., 2] - single[..., 0]).mean()
    assert abs(w_b - w_s) / w_s < 0.05


def accept_recording_draws(gen, g1, g2, rng):
    """The accepted grid boxes ``[4, n', K]`` of the usable images, every draw each of
    them saw (in order), their rows in the batch and their intersection geometry."""
    usable, *_ = gen._intersection(g1, g2)
    rows = np.flatnonzero(usable)
    assert rows.size > 10
    seqs = [[] for _ in range(rows.size)]
    draw = gen._draw

    def recording_draw(geo, sel, c, r):
        cand = draw(geo, sel, c, r)
        for j, i in enumerate(sel):
            seqs[i].extend(cand[:, j].T.tolist())
        return cand

    gen._draw = recording_draw
    inter = gen._intersection(g1[rows], g2[rows])
    geo = (g1[rows], g2[rows], *inter[1:7], inter[7])
    return gen._accept(geo, rng), seqs, rows, inter


@pytest.mark.parametrize("thr,tries,stream", [(0.5, 50, 16), (0.3, 5, 3), (0.7, 12, 4), (1.0, 50, 4)])
def test_stream_acceptance_equals_the_slot_by_slot_rule(thr, tries, stream):
    """Whatever the stream length and round split, each slot takes the first candidate
    of its image's draw sequence with IoU < thr to every earlier box, else its
    ``tries``-th draw (the release's loop), given the same draws."""
    K, n = 6, 40
    gen = BoxPairGenerator(input_size=S, num_boxes=K, min_size=16, iou_threshold=thr, max_tries=tries,
                           stream_candidates=stream)
    rng = np.random.default_rng(11)
    g1, g2 = random_geoms(rng, n, 0, 0, img=(120, 140))
    grid, seqs, _, _ = accept_recording_draws(gen, g1, g2, rng)
    for i in range(grid.shape[1]):
        seq, pos, chosen = np.array(seqs[i]), 0, []
        for k in range(K):
            for t in range(tries):
                box = seq[pos]
                pos += 1
                if k == 0 or thr >= 1.0 or box_iou(box[None], np.array(chosen)).max() < thr or t == tries - 1:
                    chosen.append(box)
                    break
        np.testing.assert_array_equal(grid[:, i].T, np.array(chosen))


# ----------------------------------------------------------------------------- the pre-fix generator
def release_iou(a, b):
    """The release's bbox_iou: |areas|, and 0 whenever the intersection is empty."""
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    if inter == 0:
        return 0.0
    area_a, area_b = abs((a[2] - a[0]) * (a[3] - a[1])), abs((b[2] - b[0]) * (b[3] - b[1]))
    return inter / (area_a + area_b - inter)


def test_flip_bug_option_leaves_unflipped_pairs_alone():
    rng = np.random.default_rng(20)
    g1, g2 = random_geoms(rng, 300, 0, 0)
    fixed = BoxPairGenerator(input_size=S)(g1, g2, np.random.default_rng(1))
    buggy = BoxPairGenerator(input_size=S, reproduce_flip_bug=True)(g1, g2, np.random.default_rng(1))
    for a, b in zip(fixed, buggy):
        np.testing.assert_array_equal(a, b)  # no flip: the same draws, the same boxes


def test_flip_bug_keeps_the_unflipped_right_edge_of_a_flipped_view():
    rng = np.random.default_rng(21)
    g1, g2 = random_geoms(rng, 300, 0, 1)  # only view 2 flipped: acceptance is unchanged
    f1, f2, valid = BoxPairGenerator(input_size=S)(g1, g2, np.random.default_rng(2))
    b1, b2, valid_b = BoxPairGenerator(input_size=S, reproduce_flip_bug=True)(g1, g2, np.random.default_rng(2))
    np.testing.assert_array_equal(valid, valid_b)
    np.testing.assert_array_equal(b1, f1)
    np.testing.assert_array_equal(b2[..., [0, 1, 3]], f2[..., [0, 1, 3]])
    # fixed: [S - r, S - l]; pre-fix: [S - r, r] (clipped), r = the region's unflipped right edge
    right = np.minimum(S - f2[..., 0], S)
    np.testing.assert_allclose(b2[..., 2][valid], right[valid], atol=1e-4)
    o1, o2 = view_to_original(b1, g1, S)[valid], view_to_original(b2, g2, S)[valid]
    moved = np.abs(o1[:, [0, 2]] - o2[:, [0, 2]]).max(1) > 1.0
    assert moved.mean() > 0.9  # the pairs no longer cover the same rectangle ...
    sy = np.minimum(S / g1[:, 2], S / g2[:, 2])[:, None].repeat(10, 1)[valid]
    assert (np.abs(o1[:, [1, 3]] - o2[:, [1, 3]]).max(1) * sy).max() <= 1.0  # ... though rows still match


def test_flip_bug_affects_about_three_in_four_pairs():
    rng = np.random.default_rng(22)
    g1, g2 = random_geoms(rng, 2000)  # each view flipped with probability 0.5
    b1, b2, valid = BoxPairGenerator(input_size=S, reproduce_flip_bug=True)(g1, g2, rng)
    o1, o2 = view_to_original(b1, g1, S), view_to_original(b2, g2, S)
    scale = np.minimum(S / g1[:, 3], S / g2[:, 3])[:, None]
    same = (np.abs(o1 - o2).max(2) * scale <= 1.0)  # [B, K]: covers the same rectangle
    either_flipped = (g1[:, 4] + g2[:, 4]) > 0
    assert same[valid & ~either_flipped[:, None]].all()
    assert same[valid & either_flipped[:, None]].mean() < 0.05
    assert 0.70 < 1 - same[valid].mean() < 0.80
    flipped1 = valid & (g1[:, 4] > 0)[:, None]  # a flipped view 1: x-range [S - r, r], clipped
    np.testing.assert_allclose(np.clip(S - b1[..., 2], 0, S)[flipped1], b1[..., 0][flipped1], atol=1e-3)


@pytest.mark.parametrize("thr,tries,stream", [(0.5, 50, 16), (0.3, 5, 3)])
def test_flip_bug_acceptance_equals_the_release_loop_on_its_view1_boxes(thr, tries, stream):
    """Pre-fix: the release rejected candidates by the IoU of their (buggy) view-1 boxes
    with the image's earlier ones, inverted boxes included (IoU 0)."""
    K, n = 6, 40
    gen = BoxPairGenerator(input_size=S, num_boxes=K, min_size=16, iou_threshold=thr, max_tries=tries,
                           stream_candidates=stream, reproduce_flip_bug=True)
    rng = np.random.default_rng(12)
    g1, g2 = random_geoms(rng, n, 1, None, img=(120, 140))
    grid, seqs, rows, inter = accept_recording_draws(gen, g1, g2, rng)
    _, int_l, int_t, _, _, swmin, shmin, (sw1, sh1, _, _) = inter
    inverted = 0
    for i in range(rows.size):
        gi = g1[rows[i]]

        def view1(box):  # the release's arithmetic, flip bug included (view 1 is flipped here)
            right = box[2] * sw1[i] / swmin[i] + (int_l[i] - gi[1]) * sw1[i]
            top = box[1] * sh1[i] / shmin[i] + (int_t[i] - gi[0]) * sh1[i]
            bottom = box[3] * sh1[i] / shmin[i] + (int_t[i] - gi[0]) * sh1[i]
            return [S - right, top, right, bottom]

        seq, pos, chosen = np.array(seqs[i]), 0, []
        for k in range(K):
            for t in range(tries):
                box = seq[pos]
                pos += 1
                if k == 0 or t == tries - 1 or max(release_iou(view1(box), view1(c)) for c in chosen) < thr:
                    chosen.append(box)
                    break
        inverted += sum(view1(c)[0] > view1(c)[2] for c in chosen)
        np.testing.assert_array_equal(grid[:, i].T, np.array(chosen))
    assert inverted > 0  # the case where the release's IoU is 0 was exercised
