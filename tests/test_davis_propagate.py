"""davis_propagate.py: propagation with oracle features, the official J&F against independent computations,
chunking, PNG output, --eval-only and one-line errors on bad input. CPU, about a minute."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import davis_propagate as dp

torch.set_num_threads(1)  # the in-process tensors are tiny: thread start-up on a shared CPU costs more than it gains


# ---- helpers: a hand-made DAVIS folder ----
def write_davis(root, sequences, split="val"):
    """sequences: {name: (list of H x W x 3 uint8 frames, list of H x W uint8 masks or None)} in DAVIS layout."""
    for name, (frames, masks) in sequences.items():
        os.makedirs(os.path.join(root, "JPEGImages", "480p", name), exist_ok=True)
        os.makedirs(os.path.join(root, "Annotations", "480p", name), exist_ok=True)
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(os.path.join(root, "JPEGImages", "480p", name, f"{t:05d}.jpg"))
        for t, mask in enumerate(masks):
            if mask is not None:
                img = Image.fromarray(mask, mode="P")
                img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [128] * (253 * 3))
                img.save(os.path.join(root, "Annotations", "480p", name, f"{t:05d}.png"))
    os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "2017", f"{split}.txt"), "w") as f:
        f.write("\n".join(sequences) + "\n")
    return str(root)


def box_masks(num_frames, height, width, boxes):
    """boxes: list of (id, y0, x0, h, w, vy, vx) in pixels; later boxes are painted on top."""
    masks = []
    for t in range(num_frames):
        m = np.zeros((height, width), np.uint8)
        for obj, y0, x0, h, w, vy, vx in boxes:
            y, x = y0 + vy * t, x0 + vx * t
            m[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = obj
        masks.append(m)
    return masks


def grey_frames(num_frames, height, width):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(num_frames)]


# ---- propagation ----
def oracle_features(num_frames, grid, boxes):
    """Per frame C x h x w unit features that name (identity, scene point): the exact match has cosine 1, another
    point of the same object 0.8, another object 0. Boxes in cells: (id, y0, x0, h, w, vy, vx)."""
    h, w = grid
    ids_per_frame = box_masks(num_frames, h, w, boxes)
    velocity = {b[0]: (b[5], b[6]) for b in boxes}
    num_ids = 1 + len(boxes)
    feats = []
    for t, ids in enumerate(ids_per_frame):
        f = torch.zeros(num_ids + num_ids * h * w, h, w)
        for y in range(h):
            for x in range(w):
                obj = int(ids[y, x])
                vy, vx = velocity.get(obj, (0, 0))
                point = (y - vy * t) * w + (x - vx * t)  # the object's own coordinates: moves with the object
                f[obj, y, x] = 1.0
                f[num_ids + obj * h * w + point, y, x] = 0.5
        feats.append(torch.nn.functional.normalize(f, dim=0))
    return feats


@pytest.mark.parametrize("protocol", ["timecycle", "crw", "dino"])
def test_oracle_features_reproduce_a_translating_sequence(protocol):
    """Every cell's argmax is its true object. With normalised weights (joint top-k) the soft labels stay one-hot,
    so the upsampled masks equal the ground truth but for the one pixel at each box corner that bilinear upsampling
    rounds off; TimeCycle's per-frame weights do not sum to one (the kept probabilities of a large object are
    smaller), so there the boundaries may also move inside a cell."""
    grid, stride, num_frames = (10, 10), 4, 6
    cell_boxes = [(1, 1, 1, 3, 3, 1, 0), (2, 6, 0, 2, 4, 0, 1)]  # object 1 moves down, object 2 right, 1 cell/frame
    pixel_boxes = [(o, y * stride, x * stride, h * stride, w * stride, vy * stride, vx * stride)
                   for o, y, x, h, w, vy, vx in cell_boxes]
    truth = box_masks(num_frames, grid[0] * stride, grid[1] * stride, pixel_boxes)
    truth_cells = box_masks(num_frames, *grid, cell_boxes)
    knobs = dict(dp.PROTOCOLS[protocol])
    knobs.update(radius=2 if knobs["radius"] else 0, n_context=3)  # the motion is 1 cell per frame
    first = dp.label_grid(truth[0], 2, grid, "native")
    assert torch.equal(first.argmax(0), torch.from_numpy(truth_cells[0]).long())
    predictions = list(dp.propagate(iter(oracle_features(num_frames, grid, cell_boxes)), first, knobs["n_context"],
                                    knobs["topk"], knobs["topk_mode"], knobs["temperature"], knobs["radius"],
                                    knobs["radius_first_frame"], knobs["minmax"], chunk_size=17))
    assert len(predictions) == num_frames - 1
    for t, soft in enumerate(predictions, start=1):
        cells = soft.argmax(0).numpy()
        assert np.array_equal(cells, truth_cells[t]), f"frame {t}: {np.sum(cells != truth_cells[t])} cells wrong"
        if knobs["topk_mode"] == "joint":
            ids = dp.labels_to_ids(soft, truth[0].shape, "native")
            wrong = np.argwhere(ids != truth[t])
            corners = {(y0 + vy * t + dy, x0 + vx * t + dx) for _, y0, x0, h, w, vy, vx in pixel_boxes
                       for dy in (0, h - 1) for dx in (0, w - 1)}
            assert {tuple(p) for p in wrong} <= corners, f"frame {t}: {len(wrong)} pixels wrong"


def test_window_radius_hides_far_matches():
    """Frame 0 has the object's true match 5 cells away: radius 2 on the first frame must keep it out."""
    grid = (1, 12)
    feats0 = torch.zeros(2, *grid)
    feats0[0] = 1
    feats0[:, 0, 10] = torch.tensor([0.0, 1.0])  # the object lives at x = 10 in frame 0
    feats1 = torch.zeros(2, *grid)
    feats1[0] = 1
    feats1[:, 0, 5] = torch.tensor([0.0, 1.0])  # and at x = 5 in frame 1
    labels0 = torch.zeros(2, *grid)
    labels0[0] = 1
    labels0[:, 0, 10] = torch.tensor([0.0, 1.0])
    args = dict(topk=1, topk_mode="joint", temperature=0.1)
    free = dp.propagate_frame(feats1, [feats0], [labels0], grid, **args)
    windowed = dp.propagate_frame(feats1, [feats0], [labels0], grid, radius=2, radius_first_frame=True, **args)
    assert free.argmax(0)[0, 5] == 1
    assert windowed.argmax(0)[0, 5] == 0


@pytest.mark.parametrize("mode", ["per-frame", "joint"])
def test_chunked_and_unchunked_propagation_agree(mode):
    g = torch.Generator().manual_seed(0)
    grid, frames = (9, 13), 5
    feats = [torch.nn.functional.normalize(torch.randn(16, *grid, generator=g), dim=0) for _ in range(frames)]
    first = torch.softmax(torch.randn(4, *grid, generator=g) * 3, dim=0)
    runs = []
    for chunk in (5, 10_000):
        out = dp.propagate(iter(feats), first, n_context=2, topk=5, topk_mode=mode, temperature=0.07, radius=3,
                           radius_first_frame=False, minmax=mode == "per-frame", chunk_size=chunk)
        runs.append(torch.stack(list(out)))
    assert runs[0].shape == (frames - 1, 4, *grid)
    assert torch.allclose(runs[0], runs[1], atol=1e-6)
    assert torch.equal(runs[0].argmax(1), runs[1].argmax(1))


# ---- metrics, against hand-computed values and a brute-force implementation ----
def naive_boundary(mask):
    """The official seg2bmap written pixel by pixel from its definition."""
    H, W = mask.shape
    m = lambda y, x: bool(mask[y, x]) if y < H and x < W else False  # noqa: E731 - zeros beyond the image
    b = np.zeros((H, W), bool)
    for y in range(H):
        for x in range(W):
            if y == H - 1 and x == W - 1:
                continue
            if y == H - 1:
                b[y, x] = m(y, x) != m(y, x + 1)
            elif x == W - 1:
                b[y, x] = m(y, x) != m(y + 1, x)
            else:
                b[y, x] = m(y, x) != m(y, x + 1) or m(y, x) != m(y + 1, x) or m(y, x) != m(y + 1, x + 1)
    return b


def naive_f(gt, pred):
    """Boundary F with matching by explicit pairwise distances (no dilation)."""
    r = np.ceil(0.008 * np.sqrt(gt.shape[0] ** 2 + gt.shape[1] ** 2))
    bg, bp = np.argwhere(naive_boundary(gt)), np.argwhere(naive_boundary(pred))
    if len(bp) == 0 or len(bg) == 0:
        precision = 1.0 if len(bp) == 0 else 0.0
        recall = 1.0 if len(bg) == 0 else 0.0
    else:
        d2 = ((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1)  # |bP| x |bG| squared distances
        precision = np.mean(d2.min(1) <= r * r)
        recall = np.mean(d2.min(0) <= r * r)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def blob(shape, seed, count=4):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    m = np.zeros(shape, bool)
    for _ in range(count):
        cy, cx, ry, rx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(3, 30), rng.uniform(3, 30)
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return m


def test_boundary_map_of_a_single_pixel_by_hand():
    m = np.zeros((3, 3), bool)
    m[1, 1] = True
    assert np.array_equal(dp.seg2bmap(m), [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_region_similarity_by_hand_and_empty_rules():
    p, g = np.zeros((4, 5), bool), np.zeros((4, 5), bool)
    assert dp.region_similarity(g, p) == 1.0  # both empty
    p[0:2, 0:2] = True
    assert dp.region_similarity(g, p) == 0.0
    g[0:2, 0:3] = True
    assert dp.region_similarity(g, p) == pytest.approx(4 / 6)


def test_boundary_f_empty_rules():
    empty, full = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    full[5:10, 5:12] = True
    assert dp.boundary_f_measure(empty, empty) == 1.0  # P = R = 1
    assert dp.boundary_f_measure(full, empty) == 0.0  # prediction empty: P = 1, R = 0
    assert dp.boundary_f_measure(empty, full) == 0.0  # ground truth empty: P = 0, R = 1


def test_boundary_f_within_tolerance_by_hand():
    """320 x 400: tolerance ceil(0.008 * 512.2) = 5 pixels. A square shifted by 5 matches fully; by 8 it does not."""
    g = np.zeros((320, 400), bool)
    g[100:200, 100:200] = True
    assert dp.boundary_f_measure(g, np.roll(g, 5, axis=1)) == 1.0
    assert dp.boundary_f_measure(g, np.roll(g, 8, axis=1)) < 0.9


@pytest.mark.parametrize("shape,seed", [((37, 53), 0), ((120, 200), 1), ((260, 330), 2), ((260, 330), 3)])
def test_boundary_f_matches_a_brute_force_implementation(shape, seed):
    g, p = blob(shape, seed), blob(shape, seed + 100)
    p |= np.roll(g, (2, -3), axis=(0, 1))  # overlap, so precision and recall are neither 0 nor 1
    assert np.array_equal(dp.seg2bmap(g), naive_boundary(g))
    assert dp.boundary_f_measure(g, p) == pytest.approx(naive_f(g, p), abs=1e-12)


def test_mean_recall_decay_by_hand():
    v = [0.9, 0.8, 0.4, 0.6, 0.2, 0.7, 0.1, 0.3]
    # n = 8: linspace(1, 8, 5) = 1, 2.75, 4.5, 6.25, 8 -> rounded 1, 3, 5, 6, 8 -> ids 0, 2, 4, 5, 7
    # first bin v[0:3] = .9 .8 .4 (mean .7), last bin v[5:8] = .7 .1 .3 (mean .3667)
    mean, recall, decay = dp.mean_recall_decay(v)
    assert mean == pytest.approx(4.0 / 8)
    assert recall == pytest.approx(4 / 8)
    assert decay == pytest.approx(0.7 - 1.1 / 3)


def test_dilation_is_a_disk():
    b = np.zeros((21, 21), bool)
    b[10, 10] = True
    yy, xx = np.mgrid[:21, :21]
    for r in (1, 2, 5, 8):
        assert np.array_equal(dp.dilate_disk(b, r), (yy - 10) ** 2 + (xx - 10) ** 2 <= r * r)


# ---- PNG output ----
def test_indexed_png_round_trips_with_the_voc_palette(tmp_path):
    ids = np.random.default_rng(0).integers(0, 6, (37, 53)).astype(np.uint8)
    path = str(tmp_path / "x.png")
    dp.save_indexed_png(path, ids)
    with Image.open(path) as img:
        assert img.mode == "P" and img.size == (53, 37)
        assert np.array_equal(np.array(img), ids)
        palette = img.getpalette()
    known = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 5: (128, 0, 128),
             6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 255: (224, 224, 192)}
    for index, rgb in known.items():
        assert tuple(dp.PALETTE[3 * index:3 * index + 3]) == rgb
        if index < 6:
            assert tuple(palette[3 * index:3 * index + 3]) == rgb


def test_demo_run_writes_indexed_pngs_at_the_original_size(run_script, tmp_path):
    out = tmp_path / "out"
    r = run_script("davis_propagate.py", "--output-dir", out, "--synthetic-sequences", "2", "--synthetic-frames", "5",
                   "--synthetic-size", "40", "56", "--save-overlays", "--n-context", "2")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result) == {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}
    assert all(0 <= result[k] <= 1 for k in result if not k.endswith("Decay"))
    assert "n_context=2" in r.stdout and "protocol=timecycle" in r.stdout
    for seq in ("synthetic00", "synthetic01"):
        files = sorted(os.listdir(out / seq))
        assert files == [f"{t:05d}.png" for t in range(5)]
        for f in files:
            with Image.open(out / seq / f) as img:
                assert img.mode == "P" and img.size == (56, 40)
        assert len(os.listdir(out / "overlays" / seq)) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["J&F-Mean"] == pytest.approx(result["J&F-Mean"])
    assert set(metrics["per_sequence"]) == {"synthetic00", "synthetic01"}


# ---- --eval-only ----
@pytest.fixture
def small_davis(tmp_path):
    a = box_masks(6, 48, 64, [(1, 5, 5, 10, 12, 2, 1), (2, 30, 40, 8, 8, -1, -2)])
    b = box_masks(5, 40, 40, [(1, 10, 10, 15, 15, 1, 1)])
    return write_davis(tmp_path / "davis", {"seqa": (grey_frames(6, 48, 64), a), "seqb": (grey_frames(5, 40, 40), b)})


def test_eval_only_on_ground_truth_copies_is_perfect(run_script, small_davis, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(os.path.join(small_davis, "Annotations", "480p"), results)
    r = run_script("davis_propagate.py", "--data", small_davis, "--eval-only", results)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("J&F-Mean", "J-Mean", "J-Recall", "F-Mean", "F-Recall"):
        assert result[key] == 1.0
    assert result["J-Decay"] == 0.0 and result["F-Decay"] == 0.0
    assert (results / "metrics.json").exists()


def test_eval_only_averages_over_objects_not_sequences(run_script, small_davis, tmp_path):
    """seqa's object 2 never predicted (J = F = 0), the other two objects perfect: 2/3 (a per-sequence mean: 3/4)."""
    results = tmp_path / "results"
    shutil.copytree(os.path.join(small_davis, "Annotations", "480p"), results)
    for f in os.listdir(results / "seqa"):
        ids = np.array(Image.open(results / "seqa" / f))
        ids[ids == 2] = 0
        dp.save_indexed_png(str(results / "seqa" / f), ids)
    r = run_script("davis_propagate.py", "--data", small_davis, "--eval-only", results)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["J-Mean"] == pytest.approx(2 / 3) and result["F-Mean"] == pytest.approx(2 / 3)
    assert result["J&F-Mean"] == pytest.approx(2 / 3) and result["J-Recall"] == pytest.approx(2 / 3)


# ---- bad input: one line naming the file, nothing reported ----
def assert_one_line_error(r, name, out):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and name in last, r.stderr
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert not r.stdout.strip().endswith("}")


def test_missing_split_file(run_script, small_davis, tmp_path):
    r = run_script("davis_propagate.py", "--data", small_davis, "--split", "test-dev", "--output-dir", tmp_path / "o")
    assert_one_line_error(r, "test-dev.txt", tmp_path / "o")


def test_sequence_without_first_frame_annotation(run_script, small_davis, tmp_path):
    os.remove(os.path.join(small_davis, "Annotations", "480p", "seqb", "00000.png"))
    r = run_script("davis_propagate.py", "--data", small_davis, "--output-dir", tmp_path / "o")
    assert_one_line_error(r, os.path.join("seqb", "00000.png"), tmp_path / "o")


def test_frames_and_masks_of_different_sizes(run_script, small_davis, tmp_path):
    dp.save_indexed_png(os.path.join(small_davis, "Annotations", "480p", "seqb", "00003.png"),
                        np.zeros((40, 41), np.uint8))
    r = run_script("davis_propagate.py", "--data", small_davis, "--output-dir", tmp_path / "o")
    assert_one_line_error(r, os.path.join("seqb", "00003.png"), tmp_path / "o")


def test_annotation_with_more_objects_than_the_palette(run_script, small_davis, tmp_path):
    ids = np.zeros((40, 40), np.uint16)
    ids[5:10, 5:10], ids[20:30, 20:30] = 1, 300
    Image.fromarray(ids).save(os.path.join(small_davis, "Annotations", "480p", "seqb", "00000.png"))
    r = run_script("davis_propagate.py", "--data", small_davis, "--output-dir", tmp_path / "o")
    assert_one_line_error(r, os.path.join("seqb", "00000.png"), tmp_path / "o")


def test_result_with_an_unknown_object_id(run_script, small_davis, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(os.path.join(small_davis, "Annotations", "480p"), results)
    ids = np.array(Image.open(results / "seqb" / "00002.png"))
    ids[0, 0] = 3
    dp.save_indexed_png(str(results / "seqb" / "00002.png"), ids)
    r = run_script("davis_propagate.py", "--data", small_davis, "--eval-only", results)
    assert_one_line_error(r, os.path.join("seqb", "00002.png"), results)
