"""davis_propagate.py: propagation with oracle features, each preset against its reference's loop re-expressed,
the layers and label resampling against torchvision and PIL, the official J&F against independent computations,
chunking and ties, PNG output, --eval-only, test-dev splits and one-line errors on bad input. CPU only."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
import davis_propagate as dp
from vader import VADeRNet

torch.set_num_threads(1)  # the in-process tensors are tiny: starting threads costs more than it gains


def propagate(features, first, **knobs):
    """dp.propagate with the knobs as keywords: the Propagation row a run builds from its flags."""
    return dp.propagate(features, first, dp.Propagation(**knobs))


def propagate_frame(query, keys, labels, grid, **knobs):
    """dp.propagate_frame with one context entry per key and the knobs as keywords."""
    return dp.propagate_frame(query, [(k, y, 1) for k, y in zip(keys, labels)], grid, dp.Propagation(**knobs))


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
    predictions = list(propagate(iter(oracle_features(num_frames, grid, cell_boxes)), first,
                                    n_context=knobs["n_context"], topk=knobs["topk"], topk_mode=knobs["topk_mode"],
                                    temperature=knobs["temperature"], radius=knobs["radius"],
                                    radius_first_frame=knobs["radius_first_frame"], minmax=knobs["minmax"],
                                    chunk_size=17))
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
    free = propagate_frame(feats1, [feats0], [labels0], grid, **args)
    windowed = propagate_frame(feats1, [feats0], [labels0], grid, radius=2, radius_first_frame=True, **args)
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
        out = propagate(iter(feats), first, n_context=2, topk=5, topk_mode=mode, temperature=0.07, radius=3,
                           radius_first_frame=False, minmax="carried" if mode == "per-frame" else "none",
                           chunk_size=chunk)
        runs.append(torch.stack(list(out)))
    assert runs[0].shape == (frames - 1, 4, *grid)
    assert torch.allclose(runs[0], runs[1], atol=1e-6)
    assert torch.equal(runs[0].argmax(1), runs[1].argmax(1))


def stable_topk(scores, k):
    """The k largest scores of each row, exact ties to the lower position: the first k of a stable sort."""
    value, index = scores.sort(dim=-1, descending=True, stable=True)
    return value[..., :k], index[..., :k]


def naive_propagate(feats, first, n_context, topk, topk_mode, temperature, radius, window, radius_first_frame,
                    minmax, fill_context):
    """The protocols written plainly: the whole affinity of every context frame at once, the window as an explicit
    distance test per (query, key) pair, a joint top-k over the concatenation of all context keys (no chunks, no
    per-frame shortlists), the context as a list of frame numbers (frame 0 repeated when filled)."""
    h, w = first.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten().double(), xs.flatten().double()
    dy, dx = ys[None] - ys[:, None], xs[None] - xs[:, None]  # query x key
    inside = torch.sqrt(dy ** 2 + dx ** 2) < radius if window == "disc" else \
        torch.maximum(dy.abs(), dx.abs()) <= radius
    labels, outputs = {0: first.flatten(1)}, []
    for t in range(1, len(feats)):
        previous = list(range(max(1, t - n_context), t))
        if fill_context:
            previous = [0] * (n_context - len(previous)) + previous
        context = [0] + previous
        q = feats[t].flatten(1)
        logits = []
        for j, c in enumerate(context):
            a = q.t() @ feats[c].flatten(1) / temperature  # query x key
            if radius > 0 and (j > 0 or radius_first_frame):
                a = a.masked_fill(~inside, float("-inf"))
            logits.append(a)
        if topk_mode == "per-frame":
            soft = sum((labels[c][:, i] * p[None]).sum(-1) for c, (p, i) in
                       zip(context, (stable_topk(a.softmax(1), topk) for a in logits))) / len(context)
        else:
            value, pick = stable_topk(torch.cat(logits, 1), topk)
            every = torch.cat([labels[c] for c in context], 1)  # L x (frames * keys)
            soft = (every[:, pick] * value.softmax(1)[None]).sum(-1)
        if minmax == "carried":
            low, high = soft.min(1, keepdim=True).values, soft.max(1, keepdim=True).values
            soft = (soft - low) / (high - low)
        labels[t] = soft
        outputs.append(soft.reshape(-1, h, w))
    return outputs


@pytest.mark.parametrize("window,topk_mode,radius_first_frame,fill", [
    ("disc", "joint", False, True), ("square", "joint", True, False), ("disc", "per-frame", True, False),
    ("square", "per-frame", False, True)])
def test_local_window_gives_the_labels_of_the_full_affinity(window, topk_mode, radius_first_frame, fill):
    """Local (tiled) windows against the plain full affinity and against the naive implementation above: the same
    labels on every cell of a small clip (grid 13 x 17, radius 3: tiles, frame edges and windows cut by them)."""
    g = torch.Generator().manual_seed(1)
    grid, frames = (13, 17), 6
    feats = [torch.nn.functional.normalize(torch.randn(16, *grid, generator=g), dim=0) for _ in range(frames)]
    first = torch.softmax(torch.randn(3, *grid, generator=g) * 3, dim=0)
    knobs = dict(n_context=2, topk=5, topk_mode=topk_mode, temperature=0.1, radius=3, window=window,
                 radius_first_frame=radius_first_frame, minmax="carried" if topk_mode == "per-frame" else "none",
                 fill_context=fill)
    runs = {a: torch.stack(list(propagate(iter(feats), first, chunk_size=40, affinity=a, **knobs)))
            for a in ("local", "full")}
    naive = torch.stack(naive_propagate(feats, first, **knobs))
    for a, soft in runs.items():
        assert torch.equal(soft.argmax(1), naive.argmax(1)), a
        assert torch.allclose(soft, naive, atol=1e-5), a
        ids = [dp.labels_to_ids(s, (52, 68), "native") for s in soft]
        assert all(np.array_equal(i, dp.labels_to_ids(s, (52, 68), "native")) for i, s in zip(ids, naive))


def test_windows_by_hand():
    """Radius 2: CRW's disc keeps distance < 2 (the 3 x 3 block, not (0, 2)); DINO's square keeps |dy|, |dx| <= 2."""
    d = torch.arange(-2, 3)
    disc = dp.in_window(d[:, None], d[None, :], 2, "disc")
    square = dp.in_window(d[:, None], d[None, :], 2, "square")
    assert torch.equal(disc, torch.tensor([[0, 0, 0, 0, 0],
                                           [0, 1, 1, 1, 0],
                                           [0, 1, 1, 1, 0],
                                           [0, 1, 1, 1, 0],
                                           [0, 0, 0, 0, 0]], dtype=torch.bool))
    assert square.all()
    mask = dp.window_mask(torch.tensor([2 * 5 + 2]), (5, 5), 2, "disc")  # the query at the centre of a 5 x 5 grid
    assert torch.equal(~mask.reshape(5, 5), disc)


def test_minmax_output_rescales_only_the_upsampled_prediction():
    """DINO: the raw soft labels are carried; only the argmax sees each channel rescaled to [0, 1]. Background 0.6
    everywhere but for one cell, the object at most 0.4 there: raw argmax says background, rescaled says object."""
    soft = torch.zeros(2, 4, 4)
    soft[0], soft[1] = 0.6, 0.1
    soft[0, 1, 1], soft[1, 1, 1] = 0.5, 0.4
    raw = dp.labels_to_ids(soft, (16, 16), "native")
    rescaled = dp.labels_to_ids(soft, (16, 16), "native", minmax_output=True)
    assert raw.max() == 0
    assert rescaled[4:8, 4:8].all() and rescaled.sum() < 16 * 3  # around the cell (1, 1), bilinear spread
    feats = [torch.nn.functional.normalize(torch.randn(8, 4, 4), dim=0) for _ in range(3)]
    first = torch.softmax(torch.randn(2, 4, 4), 0)
    kwargs = dict(n_context=1, topk=3, topk_mode="joint", temperature=0.1)
    carried = list(propagate(iter(feats), first, minmax="carried", **kwargs))
    output = list(propagate(iter(feats), first, minmax="output", **kwargs))
    plain = list(propagate(iter(feats), first, minmax="none", **kwargs))
    assert all(torch.equal(a, b) for a, b in zip(output, plain))  # 'output' carries the raw labels
    assert torch.allclose(carried[0], dp.minmax_rescale(plain[0]))
    assert all(torch.allclose(s.amax((1, 2)), torch.ones(2)) for s in carried)


def test_fill_context_with_copies_of_frame_zero():
    """TimeCycle / CRW: at frame 1 the context is frame 0 plus n copies of it. With a joint top-2 and one key that
    matches far better than the rest, the copies make both picks that key: the prediction is its label alone."""
    grid = (1, 3)
    f0 = torch.tensor([[[1.0, 0.0, 0.6]], [[0.0, 1.0, 0.8]]])  # keys: the query's match (x=0), others
    f1 = torch.tensor([[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]])
    first = torch.tensor([[[0.0, 1.0, 1.0]], [[1.0, 0.0, 0.0]]])  # object at x = 0 only
    kwargs = dict(n_context=2, topk=2, topk_mode="joint", temperature=0.1)
    filled = next(propagate(iter([f0, f1]), first, fill_context=True, **kwargs))
    bare = next(propagate(iter([f0, f1]), first, fill_context=False, **kwargs))
    assert torch.allclose(filled[1], torch.ones(grid))  # both picks are the x = 0 key (two copies of it)
    by_hand = 1 / (1 + math.exp((0.6 - 1.0) / 0.1))  # frame 0 alone: the x = 0 key and the x = 2 key
    assert torch.allclose(bare[1], torch.full(grid, by_hand))


# ---- each preset against its reference's loop, re-expressed ----
def cv2_linear(a, out_h, out_w):
    """cv2.resize(a, (out_w, out_h)) with INTER_LINEAR written out (a: H x W x C): output pixel x samples the
    input at (x + 0.5) * in / out - 0.5, clamped to the edge pixels, bilinearly and without antialiasing."""
    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low
    y0, y1, fy = axis(a.shape[0], out_h)
    x0, x1, fx = axis(a.shape[1], out_w)
    fx, fy = fx[None, :, None], fy[:, None, None]
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bottom = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def onehot_np(ids, num_objects):
    return (np.asarray(ids)[..., None] == np.arange(num_objects + 1)).astype(np.float64)  # H x W x L


def timecycle_loop(feats, first_ids, num_objects, side, stride, video_len=8, topk=5):
    """TimeCycle's test_davis.py with its DAVIS loader, re-expressed. The loader puts video_len copies of frame 0
    before the video, and its label map at side x side by nearest neighbour (PIL, as scipy's imresize); the one-hot
    map goes onto the grid by cv2's bilinear resize. Step i predicts slot i + video_len (frame i, from frame 0 on)
    from slot 0 and slots i+1 .. i+video_len-1: per context slot a softmax of cos * sqrt(512) over its keys, the
    top-k probabilities times their labels, summed; / video_len; each channel min-max rescaled; stored in the
    slot. Returns frames 1.. (frame 0's own prediction is only carried)."""
    g = side // stride
    ids = np.array(Image.fromarray(first_ids).resize((side, side), Image.NEAREST))
    first = torch.from_numpy(cv2_linear(onehot_np(ids, num_objects), g, g)).flatten(0, 1).double()  # keys x L
    video = [feats[0]] * video_len + list(feats)
    labels = [first] * video_len + [None] * len(feats)
    out = []
    for i in range(len(feats)):
        query = video[i + video_len].flatten(1).double()  # C x Q
        pred = torch.zeros(query.shape[1], num_objects + 1, dtype=torch.float64)  # Q x L
        for slot in [0] + list(range(i + 1, i + video_len)):
            prob = (video[slot].flatten(1).double().t() @ query * 512 ** 0.5).softmax(dim=0)  # keys x Q
            value, index = stable_topk(prob.t(), topk)  # Q x k
            pred += (labels[slot][index] * value[..., None]).sum(1)
        pred /= video_len
        pred = (pred - pred.min(0).values) / (pred.max(0).values - pred.min(0).values)
        labels[i + video_len] = pred
        out.append(pred.t().reshape(-1, g, g).float())
    return out[1:]


def crw_loop(feats, first_ids, num_objects, stride, n_context=20, topk=10, temperature=0.05, radius=12):
    """videowalk's test.py with its VOS loader, re-expressed. The loader repeats frame 0 n_context times before the
    video; each frame-0 slot's labels are its one-hot mask resized onto the grid by cv2's bilinear resize, later
    slots start empty. Query frame t (slot n_context + t, t from 0) sees the long-term slot 0 and the short-term
    slots t .. t + n_context - 1, the radius mask (0 where distance < r, else -1e10) added to the short-term ones;
    logits / temperature, the top-k over all context keys together, a softmax over the kept ones. Frame 0's
    prediction is replaced by its ground truth."""
    h, w = feats[0].shape[1:]
    first = torch.from_numpy(cv2_linear(onehot_np(first_ids, num_objects), h, w)).flatten(0, 1).double()
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    near = np.sqrt((yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2) < radius  # key x query
    mask = torch.from_numpy(np.where(near, 0.0, -1e10))
    video = [feats[0]] * n_context + list(feats)
    labels = [first] * (n_context + 1) + [None] * (len(feats) - 1)
    out = []
    for t in range(len(feats)):
        query = video[n_context + t].flatten(1).double()
        slots = [0] + list(range(t, t + n_context))
        A = torch.stack([video[s].flatten(1).double().t() @ query for s in slots])  # slots x keys x Q
        A[1:] += mask
        value, index = stable_topk((A / temperature).flatten(0, 1).t(), topk)  # Q x k, into slots * keys
        every = torch.cat([labels[s] for s in slots])  # (slots * keys) x L
        pred = (every[index] * value.softmax(1)[..., None]).sum(1)  # Q x L
        if t > 0:
            labels[n_context + t] = pred
            out.append(pred.t().reshape(-1, h, w).float())
    return out


def dino_loop(feats, first_ids, num_objects, stride, n_last=7, topk=5, radius=12):
    """DINO's eval_video_segmentation.py re-expressed. The first labels: the mask resized onto the grid by PIL's
    nearest neighbour, one-hot. A queue holds the n_last previous (features, labels). aff = exp(cos / 0.1) times a
    0/1 square window (|dy|, |dx| <= r) on every context frame; over all context keys, per query, entries below the
    k-th largest are set to 0 and the rest normalised to sum 1; the labels are the context labels times aff and are
    carried raw. Returns (soft labels, ids): ids = argmax of the x stride bilinear upsampling after norm_mask."""
    h, w = feats[0].shape[1:]
    small = np.array(Image.fromarray(first_ids).resize((w, h), Image.NEAREST))
    first = torch.from_numpy(onehot_np(small, num_objects)).flatten(0, 1).double()
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    window = torch.from_numpy(((np.abs(yy[:, None] - yy[None]) <= radius)
                               & (np.abs(xx[:, None] - xx[None]) <= radius)).astype(np.float64))
    queue, soft, ids = [], [], []
    for t in range(1, len(feats)):
        query = feats[t].flatten(1).double()
        context = [(feats[0], first)] + queue
        aff = torch.cat([torch.exp(f.flatten(1).double().t() @ query / 0.1) * window for f, _ in context])
        kth = aff.topk(topk, dim=0).values[-1]
        aff[aff < kth] = 0
        aff = aff / aff.sum(0, keepdim=True)
        pred = torch.cat([y for _, y in context]).t() @ aff  # L x Q
        queue = (queue + [(feats[t], pred.t())])[-n_last:]
        up = torch.nn.functional.interpolate(pred.reshape(1, -1, h, w), scale_factor=stride, mode="bilinear",
                                             align_corners=False)[0]
        for c in range(up.shape[0]):  # norm_mask
            if up[c].max() > 0:
                up[c] = (up[c] - up[c].min()) / (up[c] - up[c].min()).max()
        soft.append(pred.reshape(-1, h, w).float())
        ids.append(up.argmax(0).numpy())
    return soft, ids


def random_clip(num_frames, grid, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(16, *grid, generator=g), dim=0) for _ in range(num_frames)]


def box_ids(height, width):
    ids = np.zeros((height, width), np.uint8)
    ids[height // 5:height // 2, width // 6:width // 2] = 1
    ids[height // 2 - 3:height - 7, width // 2 + 5:width - 9] = 2  # touches object 1: edges between objects too
    return ids


def preset_run(protocol, feats, first_ids, resolution, stride, **typed):
    knobs = {k: v for k, v in dp.PROTOCOLS[protocol].items()
             if k not in ("resolution", "stride", "layer", "label_resample")}
    knobs.update(typed)
    grid = tuple(feats[0].shape[1:])
    first = dp.label_grid(first_ids, 2, grid, resolution, stride, dp.PROTOCOLS[protocol]["label_resample"])
    return list(propagate(iter(feats), first, chunk_size=50, **knobs))


def test_timecycle_preset_is_timecycles_loop():
    """Square 80 x 80 frames of a 60 x 100 video at stride 8 (a 10 x 10 grid, as 320 gives 40 x 40): labels,
    8 copies of frame 0, frame 0 predicted onto itself, per-frame top-5, min-max carried."""
    feats, first_ids = random_clip(7, (10, 10), 0), box_ids(60, 100)
    ours = preset_run("timecycle", feats, first_ids, "80", 8)
    theirs = timecycle_loop(feats, first_ids, 2, side=80, stride=8)
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(a.argmax(0), b.argmax(0))
    unfilled = preset_run("timecycle", feats, first_ids, "80", 8, fill_context=False, predict_first_frame=False)
    assert sum(int((a.argmax(0) != b.argmax(0)).sum()) for a, b in zip(unfilled, theirs)) > 20  # the copies
    ground_truth = preset_run("timecycle", feats, first_ids, "80", 8, predict_first_frame=False)
    assert (ground_truth[0] - theirs[0]).abs().max() > 1e-5  # frame 0 is carried as its own prediction


def test_crw_preset_is_crws_loop():
    """Native 64 x 96 frames at stride 8 (8 x 12), radius 3: 20 copies of frame 0, the disc window on every slot but
    the first (the copies too), joint top-10, bilinear labels, no min-max; the output ids after bilinear upsampling."""
    feats, first_ids = random_clip(6, (8, 12), 1), box_ids(64, 96)
    ours = preset_run("crw", feats, first_ids, "native", 8, radius=3)
    theirs = crw_loop(feats, first_ids, 2, stride=8, radius=3)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(a.argmax(0), b.argmax(0))
        up = cv2_linear(b.permute(1, 2, 0).double().numpy(), 64, 96)  # their output: resize, then argmax
        assert np.array_equal(dp.labels_to_ids(a, (64, 96), "native", 8), up.argmax(-1))


def test_dino_preset_is_dinos_loop():
    """Native 64 x 96 frames at stride 8, radius 3: no copies, the square window on all frames, exp(cos / 0.1) over
    the joint top-5, nearest-pixel labels, raw labels carried, norm_mask on the upsampled prediction only."""
    feats, first_ids = random_clip(6, (8, 12), 2), box_ids(64, 96)
    ours = preset_run("dino", feats, first_ids, "native", 8, radius=3)
    soft, ids = dino_loop(feats, first_ids, 2, stride=8, radius=3)
    for a, b, i in zip(ours, soft, ids):
        assert torch.allclose(a, b, atol=1e-6) and torch.equal(a.argmax(0), b.argmax(0))
        assert np.array_equal(dp.labels_to_ids(a, (64, 96), "native", 8, minmax_output=True), i)


# ---- first-frame labels on the grid ----
def test_bilinear_labels_sample_the_cell_centres():
    """Native, stride 4: cell (i, j) is the mean of pixels 4i+1..4i+2 x 4j+1..4j+2 (the frame edge-padded). Square
    (TimeCycle): the ids nearest-resized to S x S by PIL first, then the same at the cells of the square."""
    ids = np.random.default_rng(0).integers(0, 3, (30, 41)).astype(np.uint8)
    soft = dp.label_grid(ids, 2, (8, 11), "native", 4, "bilinear")
    padded = np.pad(onehot_np(ids, 2), ((0, 2), (0, 3), (0, 0)), mode="edge")  # 32 x 44
    by_hand = np.stack([[padded[4 * i + 1:4 * i + 3, 4 * j + 1:4 * j + 3].mean((0, 1)) for j in range(11)]
                        for i in range(8)])
    assert np.allclose(soft.permute(1, 2, 0).numpy(), by_hand, atol=1e-6)
    square = dp.label_grid(ids, 2, (10, 10), "80", 8, "bilinear")
    big = onehot_np(np.array(Image.fromarray(ids).resize((80, 80), Image.NEAREST)), 2)
    by_hand = np.stack([[big[8 * i + 3:8 * i + 5, 8 * j + 3:8 * j + 5].mean((0, 1)) for j in range(10)]
                        for i in range(10)])
    assert np.allclose(square.permute(1, 2, 0).numpy(), by_hand, atol=1e-6)


def test_nearest_labels_take_the_pixel_at_the_cell_centre():
    """Native, stride 8: the pixel (8i + 4, 8j + 4), clamped to the frame; square: PIL's NEAREST onto the grid."""
    ids = np.random.default_rng(1).integers(0, 4, (61, 90)).astype(np.uint8)
    cells = dp.label_grid(ids, 3, (8, 12), "native", 8, "nearest")
    rows, cols = np.minimum(8 * np.arange(8) + 4, 60), np.minimum(8 * np.arange(12) + 4, 89)
    assert np.array_equal(cells.argmax(0).numpy(), ids[rows][:, cols]) and set(cells.unique().tolist()) == {0, 1}
    for side, grid in ((480, (60, 60)), (320, (80, 80))):
        davis = np.random.default_rng(side).integers(0, 4, (480, 854)).astype(np.uint8)
        square = dp.label_grid(davis, 3, grid, str(side), side // grid[0], "nearest")
        assert np.array_equal(square.argmax(0).numpy(), np.array(Image.fromarray(davis).resize(grid[::-1], 0)))


def test_label_resampling_agrees_inside_objects():
    ids = box_ids(64, 96)
    grids = {m: dp.label_grid(ids, 2, (8, 12), "native", 8, m) for m in ("area", "bilinear", "nearest")}
    pure = grids["area"].max(0).values == 1  # cells inside one object
    assert pure.sum() > 40 and all(torch.equal(g[:, pure], grids["area"][:, pure]) for g in grids.values())


# ---- exact ties ----
def test_topk_first_breaks_ties_by_position_by_hand():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0]])
    assert dp.topk_first(scores, 2)[1].tolist() == [[1, 2]]
    assert dp.topk_first(scores, 4)[1].tolist() == [[1, 2, 4, 3]]  # by value, then position
    assert dp.topk_first(scores, 5)[0].tolist() == [[3.0, 3.0, 3.0, 2.0, 2.0]]


@pytest.mark.parametrize("window,topk_mode,fill", [("disc", "joint", True), ("square", "joint", False),
                                                   ("disc", "per-frame", True)])
def test_exact_ties_keep_the_same_keys_in_local_and_full(window, topk_mode, fill):
    """Features of four entries +-0.5: 16 distinct unit vectors whose dot products (0, +-0.5, +-1) are exact, so
    most top-k sets are cut inside a tie. Local and full affinity keep the same keys (the earlier frame, then the
    lower key index) and equal the plain implementation with a stable sort."""
    g = torch.Generator().manual_seed(3)
    grid, frames = (13, 17), 6
    feats = [(torch.randint(0, 2, (4, *grid), generator=g).float() - 0.5) for _ in range(frames)]
    first = torch.softmax(torch.randn(3, *grid, generator=g) * 3, dim=0)
    q, k = feats[1].reshape(4, -1), feats[0].reshape(4, -1)
    for probabilities in (False, True):
        full = dp.full_topk(q, k, grid, 0.1, 5, probabilities, radius=3, window=window, chunk_size=40)
        local = dp.local_topk(q, k, grid, 0.1, 5, probabilities, radius=3, window=window, chunk_size=40)
        assert torch.equal(full[1], local[1]) and torch.allclose(full[0], local[0], atol=1e-7)
    knobs = dict(n_context=2, topk=5, topk_mode=topk_mode, temperature=0.1, radius=3, window=window,
                 radius_first_frame=False, minmax="none", fill_context=fill)
    runs = {a: torch.stack(list(propagate(iter(feats), first, chunk_size=40, affinity=a, **knobs)))
            for a in ("local", "full")}
    naive = torch.stack(naive_propagate(feats, first, **knobs))
    for soft in runs.values():
        assert torch.equal(soft.argmax(1), naive.argmax(1)) and torch.allclose(soft, naive, atol=1e-6)


# ---- frames decoded by workers, frame 0's copies scored once ----
def test_workers_and_shared_copies_leave_the_features_and_labels_unchanged(tmp_path):
    """The stream's features with 0 and 2 loader workers equal the network run on each frame in turn; a context
    of one tensor repeated (scored once) gives the labels of distinct copies (each scored)."""
    torch.manual_seed(0)
    paths = []
    for t, frame in enumerate(grey_frames(5, 40, 56)):
        paths.append(str(tmp_path / f"{t:05d}.jpg"))
        Image.fromarray(frame).save(paths[-1])
    model = common.Res4ResNet("resnet18").eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        one_by_one = []
        for p in paths:
            x = common.to_uint8(common.load_image(p))[None]
            x = torch.nn.functional.pad(common.normalize(x, cpu), (0, 8, 0, 24))  # 64 x 64: multiples of 32
            one_by_one.append(torch.nn.functional.normalize(model(x)[0, :, :5, :7], dim=0))
    streams = {}
    for workers, batch in ((0, 1), (2, 1), (2, 3)):
        frames = iter(dp.frame_loader(paths, "native", workers, cpu))
        streams[workers, batch] = list(dp.FeatureStream(model, frames, paths, "native", 8, cpu, batch_size=batch))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(streams[workers, batch], one_by_one))
    assert all(torch.equal(a, b) for a, b in zip(streams[0, 1], streams[2, 1]))  # a batch of 3 rounds otherwise
    first = torch.softmax(torch.randn(3, 5, 7), 0)
    knobs = dict(topk=10, topk_mode="joint", temperature=0.05, radius=2, window="disc")
    context = [(one_by_one[0], first, 1), (one_by_one[0], first, 3)]  # frame 0, then 3 copies in the window
    once = dp.propagate_frame(one_by_one[1], context, (5, 7), dp.Propagation(**knobs))
    copies = propagate_frame(one_by_one[1], [one_by_one[0].clone() for _ in range(4)], [first] * 4, (5, 7), **knobs)
    assert torch.equal(once, copies)  # four copies scored once: what four separate frames give


def test_resnet_strides_match_torchvision_and_deeplabs_rule():
    """Strides 8 and 4 on a ResNet-50 are torchvision's replace_stride_with_dilation ([False, True, True] and
    [True, True, True]) with the same weights. On a ResNet-18, which torchvision refuses to dilate, the BasicBlocks'
    dilations follow the same rule (written out by hand), and 4 -> 8 -> 4 gives the stride-4 network back."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)
    for stride, dilate, grid in ((8, [False, True, True], (8, 12)), (4, [True, True, True], (16, 24))):
        ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate).eval()
        net = common.set_resnet_stride(torchvision.models.resnet50(weights=None), stride).eval()
        net.load_state_dict(ref.state_dict())
        with torch.no_grad():
            out = common.resnet_stages(net, x)[-1]
            assert out.shape == (1, 2048, *grid)
            assert torch.allclose(out, common.resnet_stages(ref, x)[-1], atol=1e-5)
    net = common.set_resnet_stride(common.resnet("resnet18"), 4).eval()
    # each block's (conv1, conv2) dilation at 1/4: the first block keeps the previous stage's in conv1
    expected = {"layer2": [(1, 2), (2, 2)], "layer3": [(2, 4), (4, 4)], "layer4": [(4, 8), (8, 8)]}
    for name, dilations in expected.items():
        layer = getattr(net, name)
        assert layer[0].conv1.stride == (1, 1) and layer[0].downsample[0].stride == (1, 1)
        assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in layer] == dilations
        assert all(b.conv1.padding == b.conv1.dilation and b.conv2.padding == b.conv2.dilation for b in layer)
    mine = common.set_resnet_stride(common.resnet("resnet18"), 8).eval()
    mine.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert common.resnet_stages(mine, x)[-1].shape == (1, 512, 8, 12)
        common.set_resnet_stride(mine, 4)  # and back
        assert torch.equal(common.resnet_stages(mine, x)[-1], common.resnet_stages(net, x)[-1])


def test_vader_output_at_stride_8_is_the_2x2_mean():
    torch.manual_seed(0)
    vader = VADeRNet("resnet18", dim=16).eval()
    model, description = dp.at_stride(vader, 8)
    x = torch.randn(1, 3, 40, 72)  # 1/4: 10 x 18, 1/8: 5 x 9
    with torch.no_grad():
        fine, coarse = vader(x), model(x)
    assert coarse.shape == (1, 16, 5, 9) and "average-pooled" in description
    assert torch.allclose(coarse[0, :, 2, 3], fine[0, :, 4:6, 6:8].mean((1, 2)), atol=1e-6)
    x = torch.randn(1, 3, 36, 36)  # 1/4: 9 x 9 -> the last row and column of 1/8 average what exists
    with torch.no_grad():
        fine, coarse = vader(x), model(x)
    pixels = dp.frame_pixels(Image.new("RGB", (36, 36)), "native")[None]
    assert coarse.shape[-2:] == (5, 5) and dp.network_input(pixels, "native", 8, torch.device("cpu"))[1] == (5, 5)
    assert torch.allclose(coarse[0, :, 4, 4], fine[0, :, 8, 8], atol=1e-6)


def test_label_grid_at_stride_8_covers_8x8_cells():
    ids = np.zeros((20, 20), np.uint8)
    ids[:8, :8] = 1  # exactly cell (0, 0)
    ids[8:12, 16:20] = 2  # a quarter of cell (1, 2), which is cut by the frame edge at x = 20 (edge-padded)
    soft = dp.label_grid(ids, 2, (3, 3), "native", stride=8)
    assert soft[1, 0, 0] == 1 and soft[1].sum() == 1
    assert soft[2, 1, 2] == pytest.approx(0.5)  # rows 8..11 x columns 16..19, edge-padded to 16..23: 32 of 64


def resolved(argv):
    """The stride and radius a run with `argv` uses (resolve_settings, then build_model, as main does)."""
    p = dp.get_parser()
    args = p.parse_args(["--data", ".", *argv])
    settings = dp.resolve_settings(p, args, ["--data", ".", *argv])
    _, description, stride, radius = dp.build_model(args, torch.device("cpu"))
    return settings, description, stride, radius


def test_preset_radius_keeps_its_pixel_extent_at_another_stride():
    for argv, stride, radius, window in ((["--protocol", "crw"], 8, 12, "disc"),
                                         (["--protocol", "crw", "--layer", "res5", "--stride", "4"], 4, 24, "disc"),
                                         (["--protocol", "dino", "--stride", "4", "--radius", "5"], 4, 5, "square")):
        settings, _, s, r = resolved(["--arch", "resnet18", *argv])
        assert (s, r, settings["window"]) == (stride, radius, window)


def test_each_preset_reads_a_resnet_at_its_references_layer(tmp_path):
    """CRW and TimeCycle read res4 (1/8), DINO its last layer (res5, dilated to the stride); a VADeR checkpoint is
    read at its own head, on VADeR's 1/4 grid under the timecycle preset ('network' stride); res4 at stride 4 is
    refused rather than re-dilated."""
    for protocol, layer, stride in (("timecycle", "res4", 8), ("crw", "res4", 8), ("dino", "res5", 8)):
        settings, description, s, _ = resolved(["--arch", "resnet18", "--protocol", protocol])
        assert (settings["layer"], s) == (layer, stride)
        assert ("res4 at 1/8" in description) == (layer == "res4")
    _, _, s, _ = resolved(["--arch", "resnet18", "--layer", "res5"])  # timecycle at VADeR's grid with C5
    assert s == 4
    path = tmp_path / "vader.pth"
    torch.save({"method": "vader", "model": VADeRNet("resnet18", dim=16).state_dict(),
                "args": {"arch": "resnet18", "embedding_dim": 16}}, path)
    _, description, s, _ = resolved(["--weights", str(path)])
    assert s == 4 and "its own dense head" in description
    with pytest.raises(common.UserError, match="--stride 4 with --layer res4"):
        resolved(["--arch", "resnet18", "--protocol", "crw", "--stride", "4"])


def res4_by_hand(arch, state, x):
    """torchvision's own ResNet with these weights and layer3's stride set to 1 (the strided 3x3 conv and the
    downsample's 1x1 conv of its first block), run stem -> layer1 -> layer2 -> layer3."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.load_state_dict(state)
    block = net.layer3[0]
    (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    net.eval()
    with torch.no_grad():
        return net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_res4_is_torchvisions_layer3_at_stride_1(arch, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None)
    for m in reference.modules():  # non-trivial batch-norm statistics, so that eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    x = torch.randn(1, 3, 64, 96)
    p = dp.get_parser()
    args = p.parse_args(["--data", ".", "--weights", str(path), "--protocol", "crw"])
    dp.resolve_settings(p, args, ["--data", ".", "--weights", str(path), "--protocol", "crw"])
    model, _, stride, _ = dp.build_model(args, torch.device("cpu"))
    with torch.no_grad():
        out = model(x)
    expected = res4_by_hand(arch, reference.state_dict(), x)
    assert stride == 8 and out.shape == expected.shape == (1, common.resnet_channels(arch)[2], 8, 12)
    assert torch.allclose(out, expected, atol=1e-5)


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


def test_sizes_are_checked_before_any_work(run_script, tmp_path):
    p = dp.get_parser()
    for flags, name in ((["--resolution", "0"], "--resolution 0"), (["--resolution", "16"], "--resolution 16"),
                        (["--synthetic-size", "0", "0"], "--synthetic-size 0"),
                        (["--synthetic-frames", "2"], "--synthetic-frames 2")):
        with pytest.raises(common.UserError, match=name):
            dp.resolve_settings(p, p.parse_args(flags), flags)
    r = run_script("davis_propagate.py", "--output-dir", tmp_path / "o", "--resolution", "0")
    assert_one_line_error(r, "--resolution 0", tmp_path / "o")
    assert not os.path.exists(tmp_path / "o") and "settings:" not in r.stdout


def test_missing_weights_file_is_reported_before_the_plan(run_script, small_davis, tmp_path):
    for data in ([], ["--data", small_davis]):
        r = run_script("davis_propagate.py", "--weights", tmp_path / "nope.pth", "--output-dir", tmp_path / "o", *data)
        assert_one_line_error(r, "nope.pth", tmp_path / "o")
        assert r.stdout.strip() == "" and not os.path.exists(tmp_path / "o")


def test_metrics_json_holds_null_not_nan(run_script, tmp_path):
    """A sequence whose first frame has no object has no J-Mean: null in metrics.json, which stays strict JSON."""
    a = box_masks(5, 40, 40, [(1, 10, 10, 15, 15, 1, 1)])
    empty = [np.zeros((40, 40), np.uint8) for _ in range(5)]
    root = write_davis(tmp_path / "davis", {"seqa": (grey_frames(5, 40, 40), a),
                                            "empty": (grey_frames(5, 40, 40), empty)})
    results = tmp_path / "results"
    shutil.copytree(os.path.join(root, "Annotations", "480p"), results)
    r = run_script("davis_propagate.py", "--data", root, "--eval-only", results)
    assert r.returncode == 0, r.stderr

    def refuse(constant):
        raise ValueError(f"{constant} in metrics.json")
    metrics = json.loads((results / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["per_sequence"]["empty"]["J_mean"] is None and metrics["per_sequence"]["seqa"]["J_mean"] == 1.0


def test_vader_checkpoint_with_its_own_embedding_dim(run_script, tmp_path):
    """A vader.py run with --embedding-dim 32 (not the default 128) is read with its own decoder, at both strides."""
    torch.manual_seed(0)
    path = tmp_path / "vader32.pth"
    torch.save({"method": "vader", "model": VADeRNet("resnet18", dim=32).state_dict(),
                "args": {"arch": "resnet18", "embedding_dim": 32}}, path)
    for stride in ("4", "8"):
        r = run_script("davis_propagate.py", "--weights", path, "--stride", stride, "--output-dir", tmp_path / stride,
                       "--synthetic-sequences", "1", "--synthetic-frames", "3", "--synthetic-size", "32", "48")
        assert r.returncode == 0, r.stderr
        assert "vader checkpoint" in r.stdout and f"stride={stride}" in r.stdout
        assert 0 <= json.loads(r.stdout.strip().splitlines()[-1])["J&F-Mean"] <= 1


# ---- damaged frames, and splits with the first masks only: main() in this process ----
def damage_huffman_table(path):
    """A JPEG whose header and end marker are intact but whose first Huffman table is not: PIL opens it and
    fails only when it decodes the pixels (as a frame corrupted on disk mid-file would)."""
    data = bytearray(open(path, "rb").read())
    table = data.index(b"\xff\xc4")
    data[table + 5:table + 21] = b"\xff" * 16  # 16 x 255 codes per length: no valid table
    open(path, "wb").write(data)


def one_line(error):
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_truncated_frame_is_reported_before_anything_is_written(small_davis, tmp_path):
    path = os.path.join(small_davis, "JPEGImages", "480p", "seqb", "00003.jpg")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(common.UserError) as e:
        dp.main(["--data", small_davis, "--arch", "resnet18", "--output-dir", str(tmp_path / "o")])
    assert one_line(e).startswith(path) and "truncated" in one_line(e)
    assert not os.path.exists(tmp_path / "o")


def test_a_frame_that_fails_mid_run_leaves_only_complete_folders_of_this_run(small_davis, tmp_path):
    """An earlier complete run, then one whose seqb frame 2 does not decode (in a loader worker): one line naming
    the frame; seqb leaves no folder (not even seqb.partial, nor the earlier run's), seqa is complete, and the
    earlier metrics.json is gone."""
    out = tmp_path / "o"
    argv = ["--data", small_davis, "--arch", "resnet18", "--output-dir", str(out), "--n-context", "2"]
    dp.main(argv)
    assert sorted(os.listdir(out)) == ["metrics.json", "seqa", "seqb"]
    bad = os.path.join(small_davis, "JPEGImages", "480p", "seqb", "00002.jpg")
    damage_huffman_table(bad)
    with pytest.raises(common.UserError) as e:
        dp.main(argv + ["--workers", "2"])
    assert one_line(e).startswith(f"{bad}: unreadable frame")
    assert sorted(os.listdir(out)) == ["seqa"]
    assert sorted(os.listdir(out / "seqa")) == [f"{t:05d}.png" for t in range(6)]


def test_first_frame_masks_only_are_propagated_not_scored(tmp_path, capsys):
    """A test-dev-like split (each sequence's first mask only): every frame's PNG is written, the last JSON line
    and metrics.json say that scoring was skipped and why; --eval-only on it has nothing to score; a split that
    mixes full and first-only ground truth is refused before any work."""
    masks = box_masks(5, 40, 48, [(1, 8, 8, 14, 16, 1, 1), (2, 24, 28, 10, 12, -1, 0)])
    first_only = {"seqa": (grey_frames(5, 40, 48), [masks[0]] + [None] * 4),
                  "seqb": (grey_frames(4, 40, 48), [masks[0]] + [None] * 3)}
    root = write_davis(tmp_path / "davis", first_only, split="test-dev")
    out = tmp_path / "o"
    dp.main(["--data", root, "--split", "test-dev", "--arch", "resnet18", "--output-dir", str(out)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["scoring"] == "skipped" and "test-dev.txt: the ground truth holds the first frames" in last["reason"]
    assert json.loads((out / "metrics.json").read_text())["scoring"] == "skipped"
    assert sorted(os.listdir(out / "seqa")) == [f"{t:05d}.png" for t in range(5)] and len(os.listdir(out / "seqb")) == 4
    with pytest.raises(common.UserError, match="nothing to score"):
        dp.main(["--data", root, "--split", "test-dev", "--eval-only", str(out)])
    mixed = write_davis(tmp_path / "mixed", {"full": (grey_frames(5, 40, 48), masks), **first_only})
    with pytest.raises(common.UserError) as e:
        dp.main(["--data", mixed, "--arch", "resnet18", "--output-dir", str(tmp_path / "m")])
    assert os.path.join("mixed", "Annotations", "480p", "seqa") in one_line(e) and "1 of 5 frames" in one_line(e)
    assert not os.path.exists(tmp_path / "m")
