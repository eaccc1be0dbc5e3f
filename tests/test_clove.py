"""clove.py: Eq. 1 matching, the NMHSA predictor, the Eq. 2 loss, the EMA and LARS rules, and the training script.

Every property is checked against an independent computation (hand values, brute-force loops, pixels that encode
their own coordinates), never against the code's own output. The benchmark at the end runs only with CLOVE_BENCH=1.
"""
import copy
import functools
import inspect
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import clove
import common
from common import Box


# ---- Eq. 1: matching ----
def brute_force_mask(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos, sx=1.0, sy=1.0):
    """Cell centres written out one by one; a flipped view's column c shows the crop's column grid-1-c."""
    def centre(box, flip, grid, index):
        row, col = divmod(index, grid)
        col = grid - 1 - col if flip else col
        return ((box.x0 + (col + 0.5) * (box.x1 - box.x0) / grid) * sx,
                (box.y0 + (row + 0.5) * (box.y1 - box.y0) / grid) * sy)

    diag = max(math.hypot((b.x1 - b.x0) / g * sx, (b.y1 - b.y0) / g * sy)
               for b, g in ((box_s, grid_s), (box_t, grid_t)))
    mask = torch.zeros(grid_s**2, grid_t**2, dtype=torch.bool)
    for i in range(grid_s**2):
        xi, yi = centre(box_s, flip_s, grid_s, i)
        for j in range(grid_t**2):
            xj, yj = centre(box_t, flip_t, grid_t, j)
            mask[i, j] = math.sqrt((xi - xj) ** 2 + (yi - yj) ** 2) < t_pos * diag
    return mask


CASES = [
    (Box(0, 0, 64, 64), False, 2, Box(32, 16, 96, 80), True, 2),  # overlapping, one flipped
    (Box(10, 20, 110, 90), True, 3, Box(0, 0, 50, 50), False, 2),  # different grids, non-square cells
    (Box(5, 5, 200, 180), True, 7, Box(40, 30, 100, 90), True, 3),  # a global view and a local view, both flipped
    (Box(0, 0, 40, 40), False, 2, Box(200, 200, 240, 240), False, 2),  # far apart: no pairs
]


@pytest.mark.parametrize("t_pos", [0.5, 0.7, 0.9, 2.0])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matching_agrees_with_brute_force_distances(case, t_pos):
    box_s, flip_s, grid_s, box_t, flip_t, grid_t = CASES[case]
    got = clove.match_cells(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos)
    assert torch.equal(got, brute_force_mask(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos))
    # the official code's frame (x / (W-1), y / (H-1)) of a 300 x 200 image
    sx, sy = 1 / 299, 1 / 199
    got = clove.match_cells(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos, scale=(sx, sy))
    assert torch.equal(got, brute_force_mask(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos, sx, sy))


TIES = [  # views of equal cells offset by whole or half cells: some centres lie exactly T_pos diagonals apart
    (Box(0, 0, 64, 64), False, 2, Box(64, 64, 128, 128), False, 2, 2.0),  # (16, 16) and (80, 80): 2 diagonals
    (Box(0, 0, 64, 64), True, 2, Box(16, 16, 80, 80), False, 2, 0.5),  # half a cell along each axis
    (Box(10, 20, 106, 116), False, 3, Box(42, 52, 138, 148), True, 3, 2.0),
]


def test_matching_agrees_with_brute_force_on_random_views_and_exact_ties():
    """Random crops of random images, both frames, three thresholds; and views built so that some distances equal
    T_pos x the diagonal exactly, where d < T_pos must be false (a distance computed another way, e.g. torch.cdist's
    matrix product, rounds some of them below)."""
    rng = random.Random(0)
    cases = [(*[x for _ in range(2) for x in (common.sample_crop_box(rng, 300, 200, (0.08, 1.0)), rng.random() < 0.5,
                                               rng.choice([2, 3, 7]))], rng.choice([0.5, 0.7, 2.0])) for _ in range(150)]
    for box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos in cases + TIES:
        for sx, sy in ((1.0, 1.0), (1 / 299, 1 / 199)):
            expected = brute_force_mask(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos, sx, sy)
            got = clove.match_cells(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos, (sx, sy))
            assert torch.equal(got, expected), (box_s, box_t, t_pos)
    for box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos in TIES:  # the ties are there, and are not matches
        near = brute_force_mask(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos * (1 + 1e-9))
        assert (near & ~brute_force_mask(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos)).any()


def test_brute_force_cases_are_not_trivial():
    masks = [brute_force_mask(*c, 0.7) for c in CASES]
    assert any(0 < int(m.sum()) < m.numel() for m in masks)  # some positives and some negatives
    assert not masks[-1].any()


def test_adjacent_views_that_do_not_overlap_still_have_pairs():
    # two 64-px boxes side by side, 2 x 2 cells of 32 px: facing cells are 32 px apart, the diagonal is 45.25 px
    left, right = Box(0, 0, 64, 64), Box(64, 0, 128, 64)
    mask = clove.match_cells(left, False, 2, right, False, 2, t_pos=0.9)  # threshold 40.7 px
    assert mask.nonzero().tolist() == [[1, 0], [3, 2]]  # right column of `left` <-> left column of `right`
    assert not clove.match_cells(left, False, 2, right, False, 2, t_pos=0.7).any()  # threshold 31.7 px < 32


def test_flipped_copy_of_a_view_pairs_each_cell_with_its_mirror():
    box, grid = Box(17, 9, 113, 105), 4
    mask = clove.match_cells(box, False, grid, box, True, grid, t_pos=0.5)  # neighbours are 0.71 diagonals away
    expected = torch.zeros(grid**2, grid**2, dtype=torch.bool)
    for r in range(grid):
        for c in range(grid):
            expected[r * grid + c, r * grid + grid - 1 - c] = True
    assert torch.equal(mask, expected)


def decoded_centres(view, grid):
    """The original-image (x, y) each cell of a view shows, read back from pixels whose red/green encode x/y."""
    pixels = view.float()  # 3 x S x S uint8, R = x, G = y of the original pixel
    cells = F.avg_pool2d(pixels[None, :2], view.shape[-1] // grid)[0]  # 2 x grid x grid
    return cells.flatten(1).t() + 0.5  # L x 2; pixel k covers [k, k+1)


def cell_diagonal(centres, grid):
    xy = centres.view(grid, grid, 2)
    if grid == 1:
        return None
    return math.hypot(abs(xy[0, 1, 0] - xy[0, 0, 0]), abs(xy[1, 0, 1] - xy[0, 0, 1]))


def test_matched_cells_see_the_same_original_pixel():
    """The whole pipeline (crop boxes, bicubic resize, flips, grids, Eq. 1) against what the pixels show."""
    yy, xx = np.mgrid[0:256, 0:256]
    img = Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8))
    views = clove.CLoVEViews(image_size=128, local_crops=2, local_size=64, t_pos=0.7, match_coords="pixels")
    checked = positives = 0
    for seed in range(6):
        globals_, locals_, pos_global, pos_local, _ = views(img, random.Random(seed))
        g = [decoded_centres(v, 4) for v in globals_]
        loc = [decoded_centres(v, 2) for v in locals_]
        for t in (0, 1):
            pairs = [(g[1 - t], 4, g[t], pos_global[t])] + [(loc[l], 2, g[t], pos_local[t, l]) for l in range(2)]
            for student, grid_s, teacher, mask in pairs:
                threshold = 0.7 * max(cell_diagonal(student, grid_s), cell_diagonal(teacher, 4))
                distance = torch.cdist(student.double(), teacher.double())
                clear = (distance - threshold).abs() > 1.5  # resampling blurs the read-back by about a pixel
                assert torch.equal(mask[clear], (distance < threshold)[clear])
                checked += int(clear.sum())
                positives += int(mask.sum())
    assert checked > 1000 and positives > 20


# ---- NMHSA ----
def test_nmhsa_matches_the_paper_formula_head_by_head():
    torch.manual_seed(0)
    att = clove.NMHSA(dim=16, heads=4, temperature=0.2)
    x = torch.randn(2, 5, 16)
    heads = []
    for h in range(4):
        rows = slice(4 * h, 4 * h + 4)
        wq, wk, wv = att.q.weight[rows].t(), att.k.weight[rows].t(), att.v.weight[rows].t()  # 16 x 4 each
        q, k = x @ wq, x @ wk
        cos = torch.einsum("nid,njd->nij", q, k) / (q.norm(dim=-1)[:, :, None] * k.norm(dim=-1)[:, None, :])
        weights = torch.exp(cos / 0.2)
        heads.append((weights / weights.sum(-1, keepdim=True)) @ (x @ wv))
    expected = torch.cat(heads, -1) @ att.out.weight.t() + att.out.bias
    assert torch.allclose(att(x), expected, atol=1e-5)


def attention_logits(att, x, scale):
    """The pre-softmax logits of every head, by hand from the layer's weights: N x H x L x L."""
    q = att.q(x).unflatten(-1, (att.heads, -1)).transpose(1, 2)
    k = att.k(x).unflatten(-1, (att.heads, -1)).transpose(1, 2)
    if isinstance(att, clove.NMHSA):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    return q @ k.transpose(-2, -1) * scale


def test_nmhsa_logits_are_bounded_by_one_over_temperature():
    torch.manual_seed(0)
    x = 50 * torch.randn(3, 9, 32)  # large activations: plain dot products would explode
    nmhsa = clove.NMHSA(32, 8, temperature=0.25)
    logits = attention_logits(nmhsa, x, 1 / 0.25)
    assert logits.abs().max() <= 4 + 1e-4
    assert logits.abs().max() > 2  # and the bound is approached, not trivially met
    plain = clove.MHSA(32, 8)
    assert attention_logits(plain, x, 1 / math.sqrt(4)).abs().max() > 4  # the bound is NMHSA's doing
    with torch.no_grad():  # and the layers compute softmax(logits) v with exactly these logits
        for att, scale in ((nmhsa, 4.0), (plain, 0.5)):
            v = att.v(x).unflatten(-1, (8, -1)).transpose(1, 2)
            heads = attention_logits(att, x, scale).softmax(-1) @ v
            assert torch.allclose(att(x), att.out(heads.transpose(1, 2).flatten(2)), atol=1e-4)


def test_nmhsa_attention_rows_sum_to_one():
    """If every location carries the same vector, a convex combination of values returns exactly that value."""
    torch.manual_seed(0)
    for att in (clove.NMHSA(16, 4, temperature=0.1), clove.MHSA(16, 4)):
        x0 = torch.randn(16)
        out = att(x0.expand(2, 7, 16))
        expected = att.out(att.v(x0))  # every head's weights sum to 1 -> its value unchanged
        assert torch.allclose(out, expected.expand(2, 7, 16), atol=1e-5)


def test_nmhsa_is_equivariant_to_permuting_locations():
    torch.manual_seed(0)
    att = clove.NMHSA(32, 8)
    x = torch.randn(2, 11, 32)
    perm = torch.randperm(11)
    assert torch.allclose(att(x[:, perm]), att(x)[:, perm], atol=1e-5)


# ---- Eq. 2: loss ----
def naive_rank_loss(pred, target, positive, lamb, margin, topk, queue=None):
    """Eq. 2 pair by pair: F_neg = mean of the top-k most similar non-positive vectors minus the most similar."""
    total, count = 0.0, 0
    for n in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            p = pred[n, i] / pred[n, i].norm()
            pool = target[n] if queue is None else queue
            pool = pool / pool.norm(dim=1, keepdim=True)
            candidates = [(float(p @ pool[j]), j) for j in range(len(pool))
                          if queue is not None or not positive[n, i, j]]
            candidates.sort(reverse=True)
            kept = [j for _, j in candidates[:topk]][1:]
            neg = 0.0
            if kept:
                v = pool[kept].mean(0)
                neg = float(p @ v / v.norm())
            for j in range(target.shape[1]):
                if positive[n, i, j]:
                    t = target[n, j] / target[n, j].norm()
                    total += max(0.0, -lamb * float(p @ t) + neg + margin)
                    count += 1
    return total / max(count, 1)


def random_case(seed, n=3, ls=5, lt=12, dim=8):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(n, ls, dim, generator=g), torch.randn(n, lt, dim, generator=g)
    positive = torch.rand(n, ls, lt, generator=g) < 0.3
    positive[1] = False  # an image with no positive pair
    positive[2, 0] = True  # a cell with every teacher cell positive: no negative at all
    positive[2, 1] = True
    positive[2, 1, 3] = False  # one non-positive: dropped as "most similar", nothing left
    return pred, target, positive


@pytest.mark.parametrize("margin", [100.0, 0.3])  # 0.3: the hinge clips some pairs
@pytest.mark.parametrize("seed", [0, 1])
def test_rank_loss_matches_a_naive_per_pair_loop(seed, margin):
    pred, target, positive = random_case(seed)
    got = clove.pair_loss(pred, target, positive, lamb=2.0, margin=margin, topk=4)
    assert math.isclose(float(got), naive_rank_loss(pred, target, positive, 2.0, margin, 4), rel_tol=1e-5, abs_tol=1e-5)


def test_queue_negatives_match_a_naive_loop():
    pred, target, positive = random_case(3)
    queue = torch.randn(20, 8, generator=torch.Generator().manual_seed(9))
    got = clove.pair_loss(pred, target, positive, lamb=1.5, margin=0.5, topk=5, queue=queue)
    assert math.isclose(float(got), naive_rank_loss(pred, target, positive, 1.5, 0.5, 5, queue), rel_tol=1e-5)


def naive_queue_image_loss(pred, target, positive, lamb, margin, topk, queue):
    """Table 10 at the default per-image reduction, image by image: the negatives come from the queue."""
    losses = []
    pool = queue / queue.norm(dim=1, keepdim=True)
    for n in range(pred.shape[0]):
        p = pred[n] / pred[n].norm(dim=1, keepdim=True)
        t = target[n] / target[n].norm(dim=1, keepdim=True)
        neg_terms, pos_terms = [], []
        for i in range(len(p)):
            kept = [j for _, j in sorted(((float(p[i] @ pool[j]), j) for j in range(len(pool))), reverse=True)[:topk]]
            v = pool[kept[1:]].mean(0)
            neg_terms.append(-2 * float(p[i] @ v / v.norm()))
            pos_terms += [-2 * float(p[i] @ t[j]) for j in range(len(t)) if positive[n, i, j]]
        losses.append(max(0.0, lamb * (np.mean(pos_terms) if pos_terms else 0.0) - np.mean(neg_terms) + margin))
    return float(np.mean(losses))


def test_queue_negatives_at_the_default_reduction_match_a_naive_loop():
    pred, target, positive = random_case(5)
    queue = torch.randn(20, 8, generator=torch.Generator().manual_seed(9))
    got = clove.queue_loss(pred, target, positive, lamb=1.5, margin=0.5, topk=5, queue=queue)
    assert math.isclose(float(got), naive_queue_image_loss(pred, target, positive, 1.5, 0.5, 5, queue), rel_tol=1e-5)


def naive_image_loss(pred, target, positive, lamb, margin, topk):
    """The default reduction image by image: s = -2 cos; hinge(lambda * mean over M_n of s(C_i, F_j) - mean over all
    student cells of s(C_i, F_neg,i) + mu), F_neg,i the paper's averaged vector; mean over the images."""
    losses = []
    for n in range(pred.shape[0]):
        p = pred[n] / pred[n].norm(dim=1, keepdim=True)
        t = target[n] / target[n].norm(dim=1, keepdim=True)
        pos_terms, neg_terms = [], []
        for i in range(len(p)):
            ranked = sorted(((float(p[i] @ t[j]), j) for j in range(len(t)) if not positive[n, i, j]), reverse=True)
            kept = [j for _, j in ranked[:topk]][1:]
            neg = 0.0
            if kept:
                v = t[kept].mean(0)
                neg = float(p[i] @ v / v.norm())
            neg_terms.append(-2 * neg)
            pos_terms += [-2 * float(p[i] @ t[j]) for j in range(len(t)) if positive[n, i, j]]
        pos = np.mean(pos_terms) if pos_terms else 0.0
        losses.append(max(0.0, lamb * pos - np.mean(neg_terms) + margin))
    return float(np.mean(losses))


@pytest.mark.parametrize("margin", [100.0, 0.3])
def test_default_loss_matches_a_naive_per_image_loop(margin):
    for seed in (0, 1):
        pred, target, positive = random_case(seed)  # with an image that has no positive pair (its negatives count)
        got = clove.clove_loss(pred, target, positive, lamb=2.0, margin=margin, topk=4)
        assert math.isclose(float(got), naive_image_loss(pred, target, positive, 2.0, margin, 4), rel_tol=1e-5,
                            abs_tol=1e-5)


def test_topk_negatives_exclude_positives_and_drop_the_most_similar():
    e = torch.eye(4)
    pred = e[0].view(1, 1, 4)
    # teacher cells by similarity to pred: 0 (positive, cos 1), 1 (cos .995, dropped), 2 (cos .8), 3 (cos .6), 4 (cos 0)
    target = torch.stack([e[0], e[0] + 0.1 * e[1], 0.8 * e[0] + 0.6 * e[2], 0.6 * e[0] + 0.8 * e[3], e[1]])[None]
    positive = torch.tensor([[[True, False, False, False, False]]])
    f_neg = (target[0, 2] + target[0, 3]) / 2  # k = 3 non-positives (1, 2, 3), the most similar (1) dropped
    neg = float(f_neg[0] / f_neg.norm())
    moved = target.clone()
    moved[0, 1] = e[0] + 0.05 * e[2]  # the dropped cell changes but stays the most similar: no effect
    for loss, expected in ((clove.pair_loss, 100.0 - 2.0 * 1.0 + neg),  # the printed hinge
                           (clove.clove_loss, 100.0 + 2.0 * (-2 * 1.0) - (-2 * neg))):  # on -2 cos: terms doubled
        for t in (target, moved):
            got = loss(pred, t, positive, lamb=2.0, margin=100.0, topk=3)
            assert math.isclose(float(got), expected, rel_tol=1e-6), loss


def test_loss_is_finite_with_no_positive_or_no_negative_left():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 8, requires_grad=True)
    target = torch.randn(2, 6, 8)
    for loss_fn in (clove.clove_loss, clove.official_loss, clove.pair_loss):
        for mask in (torch.zeros(2, 4, 6, dtype=torch.bool), torch.ones(2, 4, 6, dtype=torch.bool)):
            loss = loss_fn(pred, target, mask)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
            pred.grad = None
    none = clove.pair_loss(pred, target, torch.zeros(2, 4, 6, dtype=torch.bool))
    assert float(none.detach()) == 0.0  # the printed Eq. 2 sums over an empty M
    p, t = F.normalize(pred.detach(), dim=-1), F.normalize(target, dim=-1)
    every = torch.ones(2, 4, 6, dtype=torch.bool)  # no negative anywhere: F_neg counts as cos 0
    got = clove.pair_loss(pred.detach(), target, every, lamb=2.0, margin=100.0)
    assert math.isclose(float(got), float((100 - 2 * p @ t.transpose(1, 2)).mean()), rel_tol=1e-6)
    got = clove.clove_loss(pred.detach(), target, every, lamb=2.0, margin=100.0)
    assert math.isclose(float(got), float((100 - 4 * (p @ t.transpose(1, 2)).mean((1, 2))).mean()), rel_tol=1e-6)


def test_l2_loss_is_byol_on_the_positive_pairs():
    pred, target, positive = random_case(4)
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    per_image = [[2 - 2 * float(p[n, i] @ t[n, j]) for i, j in positive[n].nonzero().tolist()] for n in range(3)]
    by_pair = np.mean(sum(per_image, []))
    by_image = np.mean([np.mean(v) if v else 0.0 for v in per_image])
    assert math.isclose(float(clove.l2_loss(pred, target, positive, reduction="pair")), by_pair, rel_tol=1e-5)
    assert math.isclose(float(clove.l2_loss(pred, target, positive)), by_image, rel_tol=1e-5)


# ---- Eq. 2 on realistic masks: the official code's formula, its gradient scale, fp32 ----
def official_code_loss(pred, target, mask, lamb=2.0, margin=100.0, k=10):
    """contrast/loss.py of sthalles/CLoVE, rewritten from its formula: logits = -2 cos; positives = sum over the
    mask / (|M_n| + 1e-6); non-positive logits ranked ascending with positives set to +inf, the 10 first taken, the
    first dropped, the other 9 averaged per cell then over the cells; nn.MarginRankingLoss(x1=negatives,
    x2=lambda x positives, y=1). A cell with fewer than k non-positive cells picks +inf: its image gives 0."""
    q, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    logits = -2 * torch.einsum("nid,njd->nij", q, t)
    m = mask.float()
    positives = (logits * m).sum(-1).sum(-1) / (m.sum(-1).sum(-1) + 1e-6)
    ranked = logits.masked_fill(mask, float("inf")).topk(k, dim=-1, largest=False).values
    negatives = ranked[:, :, 1:].mean(-1).mean(-1)
    return nn.MarginRankingLoss(margin=margin)(negatives, lamb * positives, torch.ones_like(positives))


def realistic_views(t_pos=0.7, images=8, dim=256, seed=0, scale=500):
    """Eq. 1 masks of the default views (2 x 224 + 6 x 96, from CLoVEViews' own geometry) of 4:3 ImageNet-sized
    images, and embeddings that vary smoothly over each image (a random field sampled at the cell centres, plus
    noise): nearby cells are similar, far ones less, as in a trained network. `scale`: the field's length scale in
    pixels (500: positive pairs at cos ~0.7, any two cells of an image ~0.2; 120: ~0.3 and ~0).
    Returns student [2 + 6 views of N x L x D], teacher [2 x N x 49 x D], pos_global N x 2 x ..., pos_local."""
    views = clove.CLoVEViews(t_pos=t_pos)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    w, h = 500, 375
    student, teacher, pos_global, pos_local = [[] for _ in range(8)], [[], []], [], []
    for _ in range(images):
        geometry = [(common.sample_crop_box(rng, w, h, views.global_scale), rng.random() < 0.5) for _ in range(2)]
        geometry += [(common.sample_crop_box(rng, w, h, views.local_scale), rng.random() < 0.5) for _ in range(6)]
        pg, pl = views.match(geometry, w, h)
        pos_global.append(pg), pos_local.append(pl)
        freq, phase = torch.randn(64, 2, generator=g) / scale, 2 * math.pi * torch.rand(64, generator=g)
        mix = torch.randn(64, dim, generator=g)

        def field(box, flip, grid, noise):
            xs, ys = common.cell_axes(box, flip, grid)
            xy = torch.tensor([(x, y) for y in ys for x in xs]).float()  # L x 2, original-image pixels, row-major
            f = torch.cos(2 * math.pi * xy @ freq.t() + phase) @ mix  # L x D
            f = F.normalize(f, dim=-1)
            return F.normalize(f + noise * torch.randn(f.shape, generator=g) / math.sqrt(dim), dim=-1)

        for v, (box, flip) in enumerate(geometry):
            grid = 7 if v < 2 else 3
            student[v].append(field(box, flip, grid, 0.5))
            if v < 2:
                teacher[v].append(field(box, flip, grid, 0.5))
    return ([torch.stack(s) for s in student], [torch.stack(t) for t in teacher], torch.stack(pos_global),
            torch.stack(pos_local))


def step_loss(loss_fn, student, teacher, pos_global, pos_local):
    """clove_step's averaging: every (teacher global view t, other student view) pair, 2 x (1 + 6) terms."""
    terms = []
    for t in (0, 1):
        terms.append(loss_fn(student[1 - t], teacher[t], pos_global[:, t]))
        terms += [loss_fn(student[2 + l], teacher[t], pos_local[:, t, l]) for l in range(6)]
    return torch.stack(terms).mean()


def gradient(loss_fn, student, teacher, pos_global, pos_local):
    leaves = [s.clone().requires_grad_(True) for s in student]
    loss = step_loss(loss_fn, leaves, teacher, pos_global, pos_local)
    loss.backward()
    return loss.detach(), torch.cat([x.grad.flatten() for x in leaves])


def test_default_loss_trains_at_the_official_gradient_scale():
    """lr 1.0 and wd 2e-5 were tuned on the code's loss; LARS with weight decay, and the raw-lr 1-D
    parameters, are not scale-free. The default's gradient norm must be within 0.8-1.25x of the official formula's
    on realistic masks and embeddings; the printed per-pair form is one flag away (and about 0.6x)."""
    for scale in (500, 120):
        student, teacher, pos_global, pos_local = realistic_views(scale=scale)
        assert 0 < float(pos_global.float().mean()) < 0.2 and pos_local.any()  # a few positives per cell
        _, official = gradient(official_code_loss, student, teacher, pos_global, pos_local)
        _, default = gradient(clove.clove_loss, student, teacher, pos_global, pos_local)
        _, pair = gradient(clove.pair_loss, student, teacher, pos_global, pos_local)
        ratio, pair_ratio = float(default.norm() / official.norm()), float(pair.norm() / official.norm())
        print(f"\nfield scale {scale} px, gradient norm / official: default {ratio:.3f}, pair {pair_ratio:.3f}")
        assert 0.8 <= ratio <= 1.25
        assert float(F.cosine_similarity(default, official, dim=0)) > 0.9  # the same direction, not only the size
        assert not 0.8 <= pair_ratio <= 1.25  # the check tells the two scales apart


@pytest.mark.parametrize("t_pos", [0.7, 2.0])  # 2: the official 400-epoch launch script's --clove-pos-ratio
def test_official_loss_is_the_official_code_exactly(t_pos):
    """Value and gradient against official_code_loss, including images whose cells have fewer than k = 10
    non-positive teacher cells (they drop out with zero gradient: never at 0.7, often at 2)."""
    student, teacher, pos_global, pos_local = realistic_views(t_pos, seed=1)
    short = [(m.shape[-1] - m.sum(-1) < 10).any(-1) for m in [pos_global[:, t] for t in (0, 1)] +
             [pos_local[:, t, l] for t in (0, 1) for l in range(6)]]  # per term: N images with such a cell
    share = float(torch.stack(short).float().mean())
    print(f"\nT_pos {t_pos}: {100 * share:.0f}% of view pairs drop out of the official loss")
    assert share == 0 if t_pos == 0.7 else 0 < share < 1
    ref_loss, ref_grad = gradient(official_code_loss, student, teacher, pos_global, pos_local)
    got_loss, got_grad = gradient(clove.official_loss, student, teacher, pos_global, pos_local)
    assert torch.isfinite(ref_grad).all()
    assert math.isclose(float(got_loss), float(ref_loss), rel_tol=1e-6)
    assert torch.allclose(got_grad, ref_grad, rtol=1e-4, atol=1e-8)


def test_eq2_runs_in_fp32_outside_autocast():
    """Under bf16 autocast (CPU here; bf16 on every GPU run) the loss, the top-k choice and the gradient are the fp32
    ones exactly. The embeddings are chosen so that bf16 similarities would pick other negatives."""
    student, teacher, pos_global, _ = realistic_views(images=4, seed=2)
    pred, target, mask = student[1], teacher[0], pos_global[:, 0]
    fp32 = (F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).transpose(1, 2)).masked_fill(mask, -2)
    bf16 = (pred.bfloat16() @ target.bfloat16().transpose(1, 2)).float().masked_fill(mask, -2)
    assert not torch.equal(fp32.topk(10).indices, bf16.topk(10).indices)  # bf16 would change the negatives
    queue = F.normalize(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), dim=-1)
    for loss_fn in (clove.clove_loss, clove.official_loss, clove.pair_loss,
                    functools.partial(clove.queue_loss, queue=queue), clove.l2_loss):
        def loss_and_grad(precision):
            p = pred.clone().requires_grad_(True)
            with common.autocast(p.device, precision):  # the training step's context; backward runs outside it
                loss = loss_fn(p, target, mask)
            loss.backward()
            return loss.detach(), p.grad
        expected, expected_grad = loss_and_grad("fp32")
        got, got_grad = loss_and_grad("bf16")
        assert got.dtype == torch.float32
        assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad), loss_fn


# ---- teacher and optimiser ----
def test_ema_momentum_schedule_end_points():
    assert clove.teacher_momentum(0, 1000) == pytest.approx(0.99)
    assert clove.teacher_momentum(500, 1000) == pytest.approx(0.995)
    assert clove.teacher_momentum(1000, 1000) == pytest.approx(1.0)
    values = [clove.teacher_momentum(s, 1000) for s in range(0, 1001, 50)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_teacher_is_an_ema_of_the_student_without_the_predictor():
    torch.manual_seed(0)
    student = clove.CLoVENet("resnet18", hidden=32, dim=16, heads=4)
    teacher = clove.make_teacher(student)
    assert not any(k.startswith("predictor") for k in teacher.state_dict())
    assert next(iter(student.state_dict())).startswith("encoder.")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.encoder.bn1.running_mean.add_(3.0)
    clove.update_teacher(teacher, student, 0.9)
    s = student.state_dict()
    t = teacher.state_dict()
    w = "encoder.conv1.weight"
    assert torch.allclose(t[w], 0.9 * before[w] + 0.1 * s[w], atol=1e-6)
    assert torch.equal(t["encoder.bn1.running_mean"], s["encoder.bn1.running_mean"])  # buffers copied (BYOL)


def official_cosine_scheduler(base, final, epochs, steps_per_epoch, warmup_epochs, start_warmup):
    """contrast/util.py's cosine_scheduler, rewritten from its formula: np.linspace warm-up, then a half-cosine over
    the remaining steps that starts at `base` and tends to `final`."""
    warmup = warmup_epochs * steps_per_epoch
    rest = np.arange(epochs * steps_per_epoch - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * rest / len(rest)))
    return np.concatenate((np.linspace(start_warmup, base, warmup), cosine))


def test_learning_rate_follows_the_official_schedule():
    """Warm-up from lr/100 (the code's warmup_multiplier 100) and cosine decay to 1% of the peak (its final value),
    the defaults since the paper says only 'cosine decay'."""
    args = clove.get_parser().parse_args([])
    peak, epochs, per_epoch, warmup_epochs = 8.0, 10, 7, 2
    expected = official_cosine_scheduler(peak, peak * 0.01, epochs, per_epoch, warmup_epochs, peak / 100)
    got = [clove.learning_rate(s, epochs * per_epoch, warmup_epochs * per_epoch, peak, args.warmup_start_ratio,
                               args.min_lr_ratio) for s in range(epochs * per_epoch)]
    assert np.allclose(got, expected, rtol=1e-12, atol=0)


def test_defaults_are_the_setting_behind_the_papers_tables():
    """The rule: the paper's stated values; where it is silent or ambiguous, the official code's (sources in the
    module docstring). And the classes' and clove_loss's keyword defaults are the command line's."""
    args = clove.get_parser().parse_args([])
    paper = dict(t_pos=0.7, attention="nmhsa", heads=8, margin=100.0, topk_negatives=10, negatives="intra",
                 loss="rank", base_lr=1.0, weight_decay=2e-5, batch_size=2048, embedding_dim=256, proj_hidden=4096,
                 queue_size=16384, ema_momentum=0.99, image_size=224)
    official = dict(local_crops=6, local_size=96, global_scale=(0.2, 1.0), local_scale=(0.08, 0.3),
                    match_coords="normalized", projector_final_bn=True, zero_init_residual=True, min_lr_ratio=0.01,
                    warmup_start_ratio=0.01, warmup_epochs=5, lamb=2.0, attention_temperature=0.2,
                    loss_reduction="image", official_loss=False)
    for name, value in {**paper, **official}.items():
        assert getattr(args, name) == value or tuple(getattr(args, name)) == value, name
    loss = inspect.signature(clove.clove_loss).parameters
    assert (loss["lamb"].default, loss["margin"].default, loss["topk"].default) == (args.lamb, args.margin,
                                                                                     args.topk_negatives)
    assert (args.loss, args.official_loss, args.loss_reduction, args.negatives) == ("rank", False, "image", "intra")
    assert clove.ablation_parts(args) == {}  # the defaults are the paper's path: no ablation part replaced
    views = clove.CLoVEViews()
    assert (views.size, views.local_crops, views.local_size, views.global_scale, views.local_scale, views.t_pos,
            views.match_coords) == (args.image_size, args.local_crops, args.local_size, tuple(args.global_scale),
                                    tuple(args.local_scale), args.t_pos, args.match_coords)
    net = inspect.signature(clove.CLoVENet).parameters
    assert (net["arch"].default, net["hidden"].default, net["dim"].default, net["predictor"].default,
            net["heads"].default, net["temperature"].default, net["final_bn"].default,
            net["zero_init_residual"].default) == (args.arch, args.proj_hidden, args.embedding_dim, clove.NMHSA,
                                                   args.heads, args.attention_temperature, args.projector_final_bn,
                                                   args.zero_init_residual)


def official_code_mask(box_s, flip_s, grid_s, box_t, flip_t, grid_t, width, height, pos_ratio):
    """Eq. 1 as contrast/loss.py computes it, from the coordinates RandomResizedCropCoord returns: a crop of pixels
    j..j+w-1 is [j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1)], a flip swaps x0 and x1; cell centres
    (k + 0.5) x bin + start, distances divided by the larger bin diagonal."""
    def coords(box, flip):
        x0, y0 = box.x0 / (width - 1), box.y0 / (height - 1)
        x1, y1 = (box.x1 - 1) / (width - 1), (box.y1 - 1) / (height - 1)
        return (x1, y0, x0, y1) if flip else (x0, y0, x1, y1)

    def centres_and_diag(c, grid):
        bw, bh = (c[2] - c[0]) / grid, (c[3] - c[1]) / grid
        k = np.arange(grid) + 0.5
        xs, ys = np.meshgrid(k * bw + c[0], k * bh + c[1])  # row-major: y rows, x columns
        return np.stack([xs.ravel(), ys.ravel()], 1), math.sqrt(bw**2 + bh**2)

    cs, ds = centres_and_diag(coords(box_s, flip_s), grid_s)
    ct, dt = centres_and_diag(coords(box_t, flip_t), grid_t)
    dist = np.sqrt(((cs[:, None] - ct[None]) ** 2).sum(-1)) / max(ds, dt)
    return torch.from_numpy(dist < pos_ratio)


def test_default_eq1_frame_is_the_official_codes():
    """T_pos 0.7 was tuned in the official frame; on 4:3 images it differs from original-image pixels."""
    views, pixels = clove.CLoVEViews(), clove.CLoVEViews(match_coords="pixels")
    rng, differ, total = random.Random(0), 0, 0
    for _ in range(20):
        w, h = rng.choice([(500, 375), (375, 500), (640, 427), (300, 300)])
        geometry = [(common.sample_crop_box(rng, w, h, views.global_scale), rng.random() < 0.5) for _ in range(2)]
        geometry += [(common.sample_crop_box(rng, w, h, views.local_scale), rng.random() < 0.5) for _ in range(6)]
        pos_global, pos_local = views.match(geometry, w, h)
        (g0, f0), (g1, f1) = geometry[:2]
        assert torch.equal(pos_global[1], official_code_mask(g0, f0, 7, g1, f1, 7, w, h, 0.7))  # student 0, teacher 1
        assert torch.equal(pos_global[0], official_code_mask(g1, f1, 7, g0, f0, 7, w, h, 0.7))
        for t, (gt, ft) in enumerate(geometry[:2]):
            for l, (box, flip) in enumerate(geometry[2:]):
                assert torch.equal(pos_local[t, l], official_code_mask(box, flip, 3, gt, ft, 7, w, h, 0.7))
        other = pixels.match(geometry, w, h)
        differ += int((other[0] != pos_global).sum() + (other[1] != pos_local).sum())
        total += pos_global.numel() + pos_local.numel()
    print(f"\nEq. 1 entries that differ between the official frame and pixels: {100 * differ / total:.2f}%")
    assert differ > 0


def test_lars_gives_biases_and_norms_no_weight_decay_and_no_trust_ratio():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    w, b, gamma, beta = (p.detach().clone() for p in model.parameters())
    gw, gb, ggamma, gbeta = (p.grad.clone() for p in model.parameters())
    clove.build_optimizer(model, lr=0.5, weight_decay=0.1, momentum=0.9).step()
    d = gw + 0.1 * w
    trust = 0.001 * w.norm() / d.norm()
    assert torch.allclose(model[0].weight, w - 0.5 * trust * d, atol=1e-7)
    assert torch.allclose(model[0].bias, b - 0.5 * gb, atol=1e-7)  # plain SGD: no decay, no trust ratio
    assert torch.allclose(model[1].weight, gamma - 0.5 * ggamma, atol=1e-7)
    assert torch.allclose(model[1].bias, beta - 0.5 * gbeta, atol=1e-7)


# ---- the script ----
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (96, 80) if i % 3 else (80, 112)
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


TINY = ["--arch", "resnet18", "--image-size", "64", "--local-crops", "1", "--local-size", "32", "--proj-hidden", "64",
        "--batch-size", "4", "--workers", "0", "--log-every", "1"]


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """Subprocesses run with one OpenMP thread: on a shared 2-core machine two spinning threads per process are
    ~3x slower (measured), and the results do not depend on it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_training_resumes_exactly(run_script, image_folder, tmp_path):
    """2 steps, stop, resume to 4 (mid-epoch, then across an epoch) == 4 steps uninterrupted; with gradient
    accumulation and the inter-image queue so that every piece of state must survive the checkpoint."""
    extra = TINY + ["--data", image_folder, "--accum-steps", "2", "--negatives", "inter", "--queue-size", "16"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    r = run_script("clove.py", *extra, "--output-dir", whole, "--max-steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("clove.py", *extra, "--output-dir", split, "--max-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    first = last_json(r.stdout)
    assert first["steps"] == 2 and math.isfinite(first["final_loss"])
    ckpt = torch.load(split / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["method"] == "clove" and ckpt["step"] == 2
    assert "encoder.conv1.weight" in ckpt["model"] and "predictor.q.weight" in ckpt["model"]
    assert "encoder.conv1.weight" in ckpt["teacher"] and not any(k.startswith("predictor") for k in ckpt["teacher"])
    lines = [json.loads(line) for line in open(split / "log.jsonl")]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]
    assert Image.open(split / "features.png").size == (4 * 128, 3 * 128)  # images, PCA colours, similarity
    r = run_script("clove.py", *extra, "--output-dir", split, "--max-steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a = torch.load(whole / "checkpoint.pth", map_location="cpu", weights_only=False)
    b = torch.load(split / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 4
    for part in ("model", "teacher", "queue"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_epochs_end_on_an_optimiser_step_and_resume_stays_exact(run_script, tmp_path):
    """10 images, micro-batches of 2, --accum-steps 2 -> 5 micro-batches and 2 steps per epoch, one
    micro-batch left over. It is dropped (as drop_last drops a partial batch): no gradient crosses the epoch end or
    the checkpoint written there, and the resumed sampler skips nothing. Interrupted at the end of epoch 0 (step 2)
    and mid-epoch 1 (step 3), resumed to step 5 (into epoch 2): equal to the uninterrupted run, bit for bit."""
    extra = TINY + ["--synthetic-images", "10", "--accum-steps", "2", "--epochs", "3", "--save-every", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    r = run_script("clove.py", *extra, "--output-dir", whole, "--max-steps", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert last_json(r.stdout)["epochs"] == 2.5
    for stop in (2, 3, 5):
        r = run_script("clove.py", *extra, "--output-dir", split, "--max-steps", stop)
        assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(whole / "checkpoint.pth", map_location="cpu", weights_only=False)
    b = torch.load(split / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 5
    for part in ("model", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k


def test_epoch_micro_batches_drop_the_leftover():
    got = list(clove.epoch_micro_batches(iter("abcdefg"), steps=3, accum_steps=2))
    assert got == [(0, "a"), (1, "b"), (0, "c"), (1, "d"), (0, "e"), (1, "f")]  # "g" alone is no step: dropped
    assert [m for m, _ in clove.epoch_micro_batches(iter(range(9)), steps=2, accum_steps=4)] == [0, 1, 2, 3] * 2


def test_bf16_autocast_and_channels_last_train_on_cpu(run_script, image_folder, tmp_path):
    """The GPU's code path (bf16 autocast, channels-last) trains on a CPU: finite losses, fp32 weights, and the first
    loss (before any update) within bf16's rounding of the fp32 run's."""
    losses = {}
    for precision, layout in (("bf16", "on"), ("fp32", "off")):
        out = tmp_path / precision
        r = run_script("clove.py", *TINY, "--data", image_folder, "--output-dir", out, "--max-steps", "2",
                       "--precision", precision, "--channels-last", layout)
        assert r.returncode == 0, r.stderr[-3000:]
        result = last_json(r.stdout)
        assert result["steps"] == 2 and math.isfinite(result["final_loss"])
        losses[precision] = result["first_loss"]
        ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
        assert all(v.dtype in (torch.float32, torch.long) for v in ckpt["model"].values())
    assert losses["bf16"] != losses["fp32"] and abs(losses["bf16"] - losses["fp32"]) < 0.5


def test_torchrun_two_processes_on_cpu(run_script, image_folder, tmp_path):
    r = run_script("clove.py", *TINY, "--data", image_folder, "--output-dir", tmp_path, "--max-steps", "2", torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json(r.stdout)
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    start = json.loads(open(tmp_path / "log.jsonl").readline())
    assert start["world_size"] == 2 and start["per_rank_batch"] == 2 and start["lr"] == pytest.approx(4 / 256)


@pytest.mark.parametrize("flags, needle", [
    (["--data", "/nonexistent/folder"], "--data /nonexistent/folder"),
    (["--data", "EMPTY"], "no image files"),
    (["--data", "IMAGES", "--image-size", "100"], "--image-size 100"),
    (["--data", "IMAGES", "--batch-size", "6", "--accum-steps", "4"], "--batch-size 6"),
    (["--data", "IMAGES", "--official-loss", "--loss-reduction", "pair"], "--loss-reduction pair"),
    (["--data", "IMAGES", "--official-loss", "--image-size", "64"], "--image-size 64"),
])
def test_bad_inputs_are_one_line_errors(run_script, image_folder, tmp_path, flags, needle):
    (tmp_path / "empty").mkdir()
    flags = [str(tmp_path / "empty") if f == "EMPTY" else image_folder if f == "IMAGES" else f for f in flags]
    r = run_script("clove.py", *flags, "--output-dir", tmp_path / "out")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


# ---- performance (CLOVE_BENCH=1 python -m pytest -s -k benchmark tests/test_clove.py) ----
def test_ema_update_equals_the_momentum_formula_and_copies_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.add_(1.0), student[1].num_batches_tracked.add_(3)
    before = [p.clone() for p in teacher.parameters()]
    common.ema_update(teacher, student, 0.9, copy_buffers=True)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, rtol=0, atol=1e-6)
    assert all(torch.equal(t, s) for t, s in zip(teacher.buffers(), student.buffers()))
    kept = [p.clone() for p in teacher.parameters()]
    common.ema_update(teacher, student, 1.0, copy_buffers=False)  # momentum 1 (CLoVE's last step) keeps the teacher
    assert all(torch.equal(k, t) for k, t in zip(kept, teacher.parameters()))
