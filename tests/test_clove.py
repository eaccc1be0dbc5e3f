"""clove.py: Eq. 1 matching, the NMHSA predictor, the Eq. 2 loss, the EMA and LARS rules, and the training script.

Every property is checked against an independent computation (hand values, brute-force loops, pixels that encode
their own coordinates), never against the code's own output. The benchmark at the end runs only with CLOVE_BENCH=1.
"""
import json
import math
import os
import random
import time
from types import SimpleNamespace

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
    mean, std = torch.tensor(common.IMAGENET_MEAN)[:, None, None], torch.tensor(common.IMAGENET_STD)[:, None, None]
    pixels = (view * std + mean) * 255  # 3 x S x S, R = x, G = y of the original pixel
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
    views = clove.CLoVEViews(image_size=128, local_crops=2, local_size=64, t_pos=0.7, color=False)
    checked = positives = 0
    for seed in range(6):
        globals_, locals_, pos_global, pos_local = views(img, random.Random(seed))
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


def test_nmhsa_logits_are_bounded_by_one_over_temperature():
    torch.manual_seed(0)
    x = 50 * torch.randn(3, 9, 32)  # large activations: plain dot products would explode
    nmhsa = clove.NMHSA(32, 8, temperature=0.25)
    logits = nmhsa.logits(x)
    assert logits.abs().max() <= 4 + 1e-4
    assert logits.abs().max() > 2  # and the bound is approached, not trivially met
    plain = clove.NMHSA(32, 8, normalized=False)
    assert plain.logits(x).abs().max() > 4  # the bound is NMHSA's doing


def test_nmhsa_attention_rows_sum_to_one():
    """If every location carries the same vector, a convex combination of values returns exactly that value."""
    torch.manual_seed(0)
    for normalized in (True, False):
        att = clove.NMHSA(16, 4, temperature=0.1, normalized=normalized)
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
    got = clove.clove_loss(pred, target, positive, lamb=2.0, margin=margin, topk=4, reduction="pair")
    assert math.isclose(float(got), naive_rank_loss(pred, target, positive, 2.0, margin, 4), rel_tol=1e-5, abs_tol=1e-5)


def test_queue_negatives_match_a_naive_loop():
    pred, target, positive = random_case(3)
    queue = torch.randn(20, 8, generator=torch.Generator().manual_seed(9))
    got = clove.clove_loss(pred, target, positive, lamb=1.5, margin=0.5, topk=5, queue=queue, reduction="pair")
    assert math.isclose(float(got), naive_rank_loss(pred, target, positive, 1.5, 0.5, 5, queue), rel_tol=1e-5)


def test_topk_negatives_exclude_positives_and_drop_the_most_similar():
    e = torch.eye(4)
    pred = e[0].view(1, 1, 4)
    # teacher cells by similarity to pred: 0 (positive, cos 1), 1 (cos .995, dropped), 2 (cos .8), 3 (cos .6), 4 (cos 0)
    target = torch.stack([e[0], e[0] + 0.1 * e[1], 0.8 * e[0] + 0.6 * e[2], 0.6 * e[0] + 0.8 * e[3], e[1]])[None]
    positive = torch.tensor([[[True, False, False, False, False]]])
    got = clove.clove_loss(pred, target, positive, lamb=2.0, margin=100.0, topk=3)
    f_neg = (target[0, 2] + target[0, 3]) / 2  # k = 3 non-positives (1, 2, 3), the most similar (1) dropped
    expected = 100.0 - 2.0 * 1.0 + float(f_neg[0] / f_neg.norm())
    assert math.isclose(float(got), expected, rel_tol=1e-6)
    moved = target.clone()
    moved[0, 1] = e[0] + 0.05 * e[2]  # the dropped cell changes but stays the most similar: no effect
    assert math.isclose(float(clove.clove_loss(pred, moved, positive, 2.0, 100.0, 3)), expected, rel_tol=1e-6)


def test_loss_is_finite_with_no_positive_or_no_negative_left():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 8, requires_grad=True)
    target = torch.randn(2, 6, 8)
    for official in (False, True):
        for mask in (torch.zeros(2, 4, 6, dtype=torch.bool), torch.ones(2, 4, 6, dtype=torch.bool)):
            loss = clove.clove_loss(pred, target, mask, official=official)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
            pred.grad = None
    none = clove.clove_loss(pred, target, torch.zeros(2, 4, 6, dtype=torch.bool))
    assert float(none.detach()) == 0.0  # Eq. 2 sums over an empty M
    p, t = F.normalize(pred.detach(), dim=-1), F.normalize(target, dim=-1)
    every = clove.clove_loss(pred.detach(), target, torch.ones(2, 4, 6, dtype=torch.bool), lamb=2.0, margin=100.0)
    assert math.isclose(float(every), float((100 - 2 * p @ t.transpose(1, 2)).mean()), rel_tol=1e-6)  # F_neg = 0


def test_official_loss_matches_the_code_formula():
    """The official aggregation, written per image: hinge(lambda * mean_pos(-2cos) - mean_i mean_top(-2cos) + mu)."""
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(3, 4, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    positive = torch.rand(3, 4, 16, generator=g) < 0.25  # >= 10 non-positives per cell, so the code is defined
    losses = []
    for n in range(3):
        p, t = F.normalize(pred[n], dim=-1), F.normalize(target[n], dim=-1)
        logits = -2 * p @ t.t()
        pos = float(logits[positive[n]].sum() / (positive[n].sum() + 1e-6))
        neg = np.mean([np.mean(sorted(logits[i][~positive[n, i]].tolist())[1:10]) for i in range(4)])
        losses.append(max(0.0, 2.0 * pos - neg + 100.0))
    got = clove.clove_loss(pred, target, positive, lamb=2.0, margin=100.0, topk=10, official=True)
    assert math.isclose(float(got), float(np.mean(losses)), rel_tol=1e-6)


def test_l2_loss_is_byol_on_the_positive_pairs():
    pred, target, positive = random_case(4)
    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    pairs = [(n, i, j) for n, i, j in positive.nonzero().tolist()]
    expected = np.mean([2 - 2 * float(p[n, i] @ t[n, j]) for n, i, j in pairs])
    assert math.isclose(float(clove.clove_loss(pred, target, positive, loss="l2")), expected, rel_tol=1e-5)


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


def test_lars_gives_biases_and_norms_no_weight_decay_and_no_trust_ratio():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    w, b, gamma, beta = (p.detach().clone() for p in model.parameters())
    gw, gb, ggamma, gbeta = (p.grad.clone() for p in model.parameters())
    args = SimpleNamespace(weight_decay=0.1, sgd_momentum=0.9)
    clove.build_optimizer(model, args, lr=0.5).step()
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
@pytest.mark.skipif(os.environ.get("CLOVE_BENCH") != "1", reason="benchmark: set CLOVE_BENCH=1")
def test_benchmark_step_overhead_against_the_bare_network():
    """One training step (forward, attention, loss, backward, EMA) vs the bare network on the same batch: student
    forward + backward of a trivial loss on the projector output, plus the teacher forward. Interleaved, min of runs."""
    arch, size, local_size, n_local, batch = (os.environ.get("CLOVE_BENCH_ARCH", "resnet18"),
                                              int(os.environ.get("CLOVE_BENCH_SIZE", 96)), 64, 2,
                                              int(os.environ.get("CLOVE_BENCH_BATCH", 32)))
    args = clove.get_parser().parse_args(["--arch", arch, "--image-size", str(size), "--local-crops", str(n_local),
                                          "--local-size", str(local_size)])
    views = clove.CLoVEViews(size, n_local, local_size)
    data = common.SyntheticDataset(views, length=batch, size=160)
    t = time.perf_counter()
    items = [data[i] for i in range(batch)]
    t_views = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(batch):
        rng = random.Random(i)
        geometry = [(common.sample_crop_box(rng, 160, 160, (0.08, 1)), False) for _ in range(2 + n_local)]
        views.match(geometry, 160, 160)
    t_match = time.perf_counter() - t
    globals_, locals_, pos_global, pos_local, _ = torch.utils.data.default_collate(items)
    torch.manual_seed(0)
    student = clove.CLoVENet(arch)
    teacher = clove.make_teacher(student)
    student.train(), teacher.train()
    g_batch, l_batch = globals_.transpose(0, 1).flatten(0, 1), locals_.transpose(0, 1).flatten(0, 1)

    def bare():
        z = [student.local_features(g_batch), student.local_features(l_batch)]
        sum(x.float().square().mean() for x in z).backward()
        with torch.no_grad():
            teacher.local_features(g_batch)

    def full():
        loss, _ = clove.clove_step(student, teacher, globals_, locals_, pos_global, pos_local, args)
        loss.backward()
        clove.update_teacher(teacher, student, 0.99)

    bare(), full()  # warm-up
    times = {"bare": [], "full": []}
    for _ in range(int(os.environ.get("CLOVE_BENCH_REPEATS", 5))):
        for name, fn in (("bare", bare), ("full", full)):
            student.zero_grad(set_to_none=True)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    b, f = min(times["bare"]), min(times["full"])
    mb, mf = sorted(times["bare"])[len(times["bare"]) // 2], sorted(times["full"])[len(times["full"]) // 2]
    print(f"\nbenchmark {arch} batch {batch}, 2x{size}px + {n_local}x{local_size}px, {torch.get_num_threads()} threads: "
          f"bare network {b:.3f} s, CLoVE step {f:.3f} s, overhead {100 * (f / b - 1):.1f}% "
          f"(medians {mb:.3f} / {mf:.3f} s: {100 * (mf / mb - 1):.1f}%), {batch / f:.2f} img/s "
          f"(views {batch / t_views:.1f} img/s on one core, of which Eq. 1 matching {1000 * t_match / batch:.2f} ms/img)")
    assert f > 0 and b > 0
