"""DAVIS-2017 mask propagation with frozen features, scored by the official J&F (VADeR Table 2).

The first frame's object masks are carried through each video by nearest neighbours in feature space: every pixel
of frame t takes the labels of the pixels it resembles most in the first frame (ground truth) and in the few frames
before it (its own predictions). Nothing is learned: the score measures how well frozen features find
correspondences. J (region IoU) and F (boundary F-measure) are computed as the official davis2017-evaluation does.

Paper: P. O. Pinheiro et al., "Unsupervised Learning of Dense Visual Representations", NeurIPS 2020, §4.1, Table 2,
which follows TimeCycle's protocol (X. Wang, A. Jabri, A. Efros, CVPR 2019: github.com/xiaolonw/TimeCycle).
Metrics: J. Pont-Tuset et al., "The 2017 DAVIS Challenge on Video Object Segmentation" (davis2017-evaluation).

Usage (--weights: 'random', a vader.py/clove.py checkpoint or a format in common.WEIGHT_FORMATS)
    python davis_propagate.py                                      # demo: synthetic videos, random ResNet-18, CPU
    python davis_propagate.py --data DAVIS --weights checkpoint.pth                 # Table 2 at 320 x 320
    python davis_propagate.py --data DAVIS --weights checkpoint.pth --resolution 480  # Table 2 at 480 x 480
    python davis_propagate.py --data DAVIS --weights checkpoint.pth --protocol crw  # CRW's knobs (or: dino)
    python davis_propagate.py --data DAVIS --split test-dev --weights ...           # first masks only: no score
    python davis_propagate.py --data DAVIS --eval-only results/some_method          # score any results folder
    torchrun --nproc_per_node=4 davis_propagate.py --data DAVIS --weights ...       # sequences split over ranks

Read in this order: the protocol, step by step
    PROTOCOLS, Propagation        every preset's knobs, and the one row a run propagates with
    propagate                     context = frame 0 (ground truth) + the --n-context previous frames (predictions)
    propagate_frame               affinity cos / --temperature, --topk per frame or joint, optional --radius window
    full_topk, local_topk         one context frame's shortlist: the whole affinity, or only each query's window
    label_grid, labels_to_ids     first-frame labels onto the grid (--label-resample); soft labels -> indexed PNG
    score_sequence, summarise     J and F per object on frames 1 .. T-2; J&F-Mean over all objects (the official)
    FeatureStream, build_model    frames (--resolution: S x S square or native, padded to 32) -> L2-normalised
                                  features at --stride 4 or 8, each frame computed once (a dense head's own, or a
                                  ResNet at --layer: res4 = C4 at 1/8, res5 = dilated C5)
    run, run_propagation          every sequence of this rank, its PNGs written atomically, then the score
Then the DAVIS layout and PNG I/O with their checks (truncated files, sizes, ids), and the arguments.

Protocols: --protocol sets these knobs, a typed flag wins, the settings used are printed. Radii are in feature
cells; a preset's radius keeps its pixel extent at another --stride (CRW at --stride 4: 24), a typed one does not.
    timecycle (default, the VADeR paper's): 320 x 320 on the network's own grid (VADeR 1/4, res4 1/8), context
        1 + 7 that starts as copies of frame 0, frame 0 first propagated onto itself, a softmax with T = 1/sqrt(512)
        per context frame and its top-5, no window, each prediction min-max rescaled before it is carried.
    crw (ajabri/videowalk): native 480p at stride 8, context 1 + 20 that starts as copies of frame 0, a joint top-10
        with T = 0.05, a disc window (distance < 12 cells) on the previous frames only, no min-max.
    dino (facebookresearch/dino): native 480p at stride 8, context 1 + 7, a joint top-5 with T = 0.1, a square window
        (|dy|, |dx| <= 12 cells) on all frames, the raw labels carried and only the upsampled prediction rescaled.
    First-frame labels: bilinear (CRW; TimeCycle after a nearest resize to 320), nearest pixel (DINO).
Which layer (--layer, for ResNet weights): CRW and TimeCycle read res4 (layer3 at stride 1, layer4 dropped: 1/8,
40 x 40 at 320), and so do the crw and timecycle presets; dino reads the last layer, res5 dilated to the stride.
VADeR's Table 2 names no layer for its ResNet rows (supervised ImageNet, MoCo), but its footnote says it used
TimeCycle's evaluation code, whose network is res4 (resnet_res4s1): res4 it is. The dilated 1/4 C5 of §4.1 is
Table 1's. res4 exists at stride 8 only; a VADeR checkpoint is read at its own dense head.
What each preset still does differently from its reference code: the notes at the end of this file.

Output: <output-dir>/<seq>/<frame>.png (indexed, original size: the official evaluator's layout), metrics.json
(summary, per-sequence table, settings, speed), --save-overlays JPEGs; the last stdout line is the summary as JSON.
After a failure, every <seq>/ present is complete and from this run, and there is no metrics.json (run_propagation).
"""
import argparse
import collections
import dataclasses
import json
import math
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from vader import VADeRNet  # VADeR checkpoints carry their own dense head

# ---- the protocols: every preset's knobs ----
# Stride 4 is the grid of VADeR's decoder, on which the paper reads VADeR (§4.1); CRW and DINO read theirs at 8.
PROTOCOLS = {  # stride and radius in the published units: feature cells at the published stride
    "timecycle": dict(resolution="320", stride="network", layer="res4", n_context=7, topk=5, topk_mode="per-frame",
                      temperature=512 ** -0.5, radius=0, window="square", radius_first_frame=False,
                      minmax="carried", fill_context=True, predict_first_frame=True, label_resample="bilinear"),
    "crw": dict(resolution="native", stride=8, layer="res4", n_context=20, topk=10, topk_mode="joint",
                temperature=0.05, radius=12, window="disc", radius_first_frame=False, minmax="none",
                fill_context=True, predict_first_frame=False, label_resample="bilinear"),
    "dino": dict(resolution="native", stride=8, layer="res5", n_context=7, topk=5, topk_mode="joint",
                 temperature=0.1, radius=12, window="square", radius_first_frame=True, minmax="output",
                 fill_context=False, predict_first_frame=False, label_resample="nearest"),
}


@dataclasses.dataclass(frozen=True)
class Propagation:
    """The knobs propagate and propagate_frame use: one row of PROTOCOLS with the typed flags applied (radius in
    cells of the stride the run reads), plus how the affinity is computed (affinity, chunk_size: same labels)."""
    topk: int
    topk_mode: str  # "per-frame" (TimeCycle) or "joint" (CRW, DINO)
    temperature: float
    n_context: int = 0
    radius: int = 0
    window: str = "square"
    radius_first_frame: bool = False
    fill_context: bool = False
    predict_first_frame: bool = False
    minmax: str = "none"
    affinity: str = "local"
    chunk_size: int = 1024

    @classmethod
    def of(cls, values):
        """The row of `values` (a dict, e.g. vars(args)), ignoring the keys that are not knobs of propagation."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


# ---- propagating a video ----
def propagate(features, first_labels, s):
    """Carry `first_labels` (L x h x w) through a video with the knobs `s` (a Propagation); `features` yields
    C x h x w per frame (frame 0 first).

    Yields the soft labels (L x h x w) of frames 1, 2, ...: context = frame 0 + the `n_context` previous frames.
    `fill_context` (TimeCycle, CRW) starts that window full of copies of frame 0 with its ground truth, as their
    loaders prepend copies of frame 0 to the video (CRW 20; TimeCycle 8, one of them its first-frame slot); the
    copies are previous frames, so a radius that spares frame 0 applies to them (CRW's mask covers every slot but
    its first). They are one context entry with a count, scored once. Otherwise the window holds the frames that
    exist (DINO). `predict_first_frame` (TimeCycle): frame 0 is first propagated from that context and its
    prediction, not its ground truth, is carried as the newest previous frame, as TimeCycle's loop does with the
    frame 0 its loader replays after the copies (CRW's loop puts the ground truth there: one more copy). What the
    first frames predict is carried on, so these choices can change any later frame.
    `minmax` 'carried' (TimeCycle) rescales each frame's prediction per channel before it is carried forward (and
    output); 'output' (DINO) leaves the carried labels raw (labels_to_ids rescales the upsampled prediction).
    Only the context window's features and labels are kept in memory (at 480p, ResNet-50, stride 4: 210 MB a frame).
    """
    stream = iter(features)
    first = next(stream)  # C x h x w
    grid = tuple(first.shape[1:])
    recent = collections.deque(maxlen=s.n_context)  # (features, soft labels) of the previous frames

    def step(feat):
        copies = s.n_context - len(recent) if s.fill_context else 0  # of frame 0, not yet pushed out
        if s.radius == 0 or s.radius_first_frame:  # the copies see what frame 0 sees: one entry
            context = [(first, first_labels, 1 + copies)]
        else:
            context = [(first, first_labels, 1)] + ([(first, first_labels, copies)] if copies else [])
        context += [(f, y, 1) for f, y in recent]
        soft = propagate_frame(feat, context, grid, s)  # L x h x w
        if s.minmax == "carried":
            soft = minmax_rescale(soft)
        if s.n_context > 0:
            recent.append((feat, soft))
        return soft

    if s.predict_first_frame:
        step(first)
    for feat in stream:
        yield step(feat)


def propagate_frame(query, context, grid, s):
    """Soft labels of one frame from its context, with the knobs `s` (a Propagation).

    query: C x h x w; context: list of (keys C x h x w, labels L x h x w, copies), context[0] = the first frame; an
    entry stands for `copies` identical context frames (a filled context's copies of frame 0). Returns L x h x w.
    Each context entry is scored on its own and keeps its top-k per query, so memory stays at one chunk of one
    frame's affinity; a joint top-k (CRW, DINO) is the top-k of these shortlists, which contain it. With a radius,
    `affinity` 'local' computes only the neighbourhood of the queries (local_topk); 'full' the whole affinity, then
    the mask (full_topk, the plain way). Both give the same labels: exact ties go to the earlier context frame, then
    to the lower key index (topk_first).
    """
    C = query.shape[0]
    q = query.reshape(C, -1)  # C x Q
    keep = min(s.topk, q.shape[1])
    per_frame = s.topk_mode == "per-frame"
    L = context[0][1].shape[0]
    out = torch.zeros(L, q.shape[1], device=query.device)  # L x Q
    best_value = best_labels = None
    mask_cache = {}  # the full path's window masks, computed once for all context frames
    for t, (key, label, copies) in enumerate(context):
        r = s.radius if (t > 0 or s.radius_first_frame) else 0
        if r > 0 and s.affinity == "local":
            value, idx = local_topk(q, key.reshape(C, -1), grid, s.temperature, keep, per_frame, r, s.window,
                                    s.chunk_size)  # Q x keep
        else:
            value, idx = full_topk(q, key.reshape(C, -1), grid, s.temperature, keep, per_frame, r, s.window,
                                   s.chunk_size, mask_cache)  # Q x keep
        chosen = label.reshape(L, -1)[:, idx]  # L x Q x keep
        if per_frame:  # TimeCycle: probabilities over this frame, the k largest kept
            out += copies * (chosen * value[None]).sum(-1)
            continue
        value, chosen = value.repeat(1, copies), chosen.repeat(1, 1, copies)  # Q x copies*keep, L x Q x copies*keep
        if best_value is not None:  # CRW / DINO: the k best logits over all frames so far (earlier first among ties)
            value, chosen = torch.cat([best_value, value], 1), torch.cat([best_labels, chosen], 2)
        best_value, pick = topk_first(value, keep)  # Q x keep
        best_labels = chosen.gather(2, pick[None].expand(L, -1, -1))
    if per_frame:
        out /= sum(copies for _, _, copies in context)
    else:  # softmax over the kept logits
        out = (best_labels * best_value.softmax(dim=1)[None]).sum(-1)
    return out.reshape(-1, *grid)  # L x h x w


def topk_first(scores, k):
    """The k largest scores along the last dimension, ties broken by position (the lower one first): returns
    (values, positions), by value, then position. torch.topk leaves the order of exact ties unspecified, so the
    local and full affinities, whose keys sit at different positions, would keep different keys from the same
    tie; by position they keep the same ones (a box of local_topk lists its keys in the frame's order)."""
    value, position = scores.topk(k, dim=-1)  # ... x k
    kth = value[..., -1:]
    cut = (scores == kth).sum(-1) > (value == kth).sum(-1)  # rows where a tie with the k-th score is cut
    if cut.any():  # there, the tied entries are taken in position order
        rows, low = scores[cut], kth[cut]  # R x P, R x 1
        above, tied = rows > low, rows == low
        take = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # exactly k per row
        position[cut] = take.nonzero()[:, 1].reshape(-1, k)
        value[cut] = rows.gather(-1, position[cut])
    position, order = position.sort(dim=-1)
    value, by_value = value.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    return value, position.gather(-1, by_value)


def full_topk(queries, keys, grid, temperature, topk, probabilities, radius=0, window="square", chunk_size=1024,
              mask_cache=None):
    """The `topk` best keys of one context frame for every query, from the whole affinity (a radius masks it).

    queries: C x Q, keys: C x P (unit vectors). Returns (Q x topk scores, Q x topk key indices); the scores are the
    softmax over the frame's (windowed) keys when `probabilities` (TimeCycle), the logits cos / T otherwise. Only a
    chunk x P block of the affinity is held at a time; the window masks are kept in `mask_cache` (a dict) for the
    next context frame."""
    mask_cache = {} if mask_cache is None else mask_cache
    values, indices = [], []
    for start in range(0, queries.shape[1], chunk_size):
        index = torch.arange(start, min(start + chunk_size, queries.shape[1]), device=queries.device)  # B
        logits = queries[:, index].t() @ keys / temperature  # B x P
        if radius > 0:
            if (start, radius) not in mask_cache:
                mask_cache[start, radius] = window_mask(index, grid, radius, window)
            logits = logits.masked_fill(mask_cache[start, radius], float("-inf"))
        if probabilities:
            logits = logits.softmax(dim=1)
        value, idx = topk_first(logits, topk)  # B x topk
        values.append(value)
        indices.append(idx)
    return torch.cat(values), torch.cat(indices)


def local_topk(queries, keys, grid, temperature, topk, probabilities, radius, window="square", chunk_size=1024):
    """What full_topk returns with a radius, computing only the neighbourhood of each tile of queries.

    The query grid is cut into t x t tiles; each tile is a matrix product with the (t + 2r) x (t + 2r) box of keys
    around it (unfold of the key map, zero-padded by r), then the keys outside each query's own window, or outside
    the frame, are set to -inf, exactly as the full affinity's mask does. At 480p, stride 8, r = 12 (t = 12) this
    computes 20% of the full affinity (the exact windows are 7% (disc) and 10% (square) of it).
    """
    C = queries.shape[0]
    h, w = grid
    r, t = radius, window_tile(radius)
    box = t + 2 * r
    tiles_y, tiles_x = -(-h // t), -(-w // t)
    dev = queries.device
    q_grid = F.pad(queries.reshape(C, h, w), (0, tiles_x * t - w, 0, tiles_y * t - h))  # C x tiles_y*t x tiles_x*t
    k_grid = F.pad(keys.reshape(C, h, w), (r, r + tiles_x * t - w, r, r + tiles_y * t - h))  # ... + 2r on each side
    seen, rows_in_frame, cols_in_frame = box_visibility(grid, r, t, window, dev)
    out_value = torch.empty(tiles_y * t, tiles_x * t, topk, device=dev)
    out_index = torch.empty(tiles_y * t, tiles_x * t, topk, dtype=torch.long, device=dev)
    rows_per_block = max(1, chunk_size // (t * t * tiles_x))
    for ty0 in range(0, tiles_y, rows_per_block):  # a block of whole rows of tiles
        ty1 = min(tiles_y, ty0 + rows_per_block)
        n = ty1 - ty0
        qs = q_grid[:, ty0 * t:ty1 * t].reshape(C, n, t, tiles_x, t).permute(1, 3, 2, 4, 0) \
            .reshape(n * tiles_x, t * t, C)  # tiles x t*t x C
        ks = k_grid[:, ty0 * t:ty1 * t + 2 * r].unfold(1, box, t).unfold(2, box, t)  # C x n x tiles_x x box x box
        ks = ks.permute(1, 2, 0, 3, 4).reshape(n * tiles_x, C, box * box)  # tiles x C x box*box (a copy)
        logits = torch.bmm(qs, ks) / temperature  # tiles x t*t x box*box
        ok = (rows_in_frame[ty0:ty1, None, :, None] & cols_in_frame[None, :, None, :]) \
            .reshape(n * tiles_x, 1, box * box) & seen[None]  # tiles x t*t x box*box
        logits = logits.masked_fill(~ok, float("-inf"))
        if box * box < topk:  # fewer keys in a box than k: the full affinity's top-k would also pick -inf entries
            logits = F.pad(logits, (0, topk - box * box), value=float("-inf"))
        if probabilities:  # a query of the padding past the frame may see no key: its NaN row is cropped below
            logits = logits.softmax(dim=-1).nan_to_num_(0.0)
        value, idx = topk_first(logits, topk)  # tiles x t*t x topk, index into the box
        tile_y = torch.arange(ty0, ty1, device=dev).repeat_interleave(tiles_x)[:, None, None] * t
        tile_x = torch.arange(tiles_x, device=dev).repeat(n)[:, None, None] * t
        key_y = (tile_y - r + idx.div(box, rounding_mode="floor")).clamp(0, h - 1)  # -inf picks: any valid index
        key_x = (tile_x - r + idx % box).clamp(0, w - 1)
        out_value[ty0 * t:ty1 * t] = tiles_to_rows(value, n, tiles_x, t)
        out_index[ty0 * t:ty1 * t] = tiles_to_rows(key_y * w + key_x, n, tiles_x, t)
    return out_value[:h, :w].reshape(h * w, topk), out_index[:h, :w].reshape(h * w, topk)


def window_tile(radius):
    """Side t of the query tiles of local_topk. A tile of t x t queries meets the (t + 2r)^2 keys around it: a
    smaller tile wastes fewer dot products, a larger one makes a more efficient matrix product and copies fewer keys.
    Measured on a CPU at 480p, stride 8, r = 12, C = 2048 (one context frame): t = 4, 6, 8, 12, 16, 24, 32 took
    7.2, 5.0, 3.8, 2.4, 3.3, 3.9, 5.6 s (the full affinity 11.3 s); hence t = r, within [8, 16]."""
    return min(max(radius, 8), 16)


def box_visibility(grid, radius, tile, window, device):
    """Which keys of the (t + 2r) x (t + 2r) box around a t x t tile of queries local_topk may use.

    Returns seen (t*t x box*box: the key is in the query's window), rows_in_frame (tile rows x box: the box row lies
    inside the frame) and cols_in_frame (tile columns x box)."""
    h, w = grid
    box = tile + 2 * radius
    query = torch.arange(tile, device=device)
    cell = torch.arange(box, device=device)
    dy = cell[None, :] - radius - query[:, None]  # t x box: box row - query row (columns alike)
    seen = in_window(dy[:, None, :, None], dy[None, :, None, :], radius, window).reshape(tile * tile, box * box)
    first_row = torch.arange(-(-h // tile), device=device)[:, None] * tile - radius  # tile rows x 1: box's first row
    first_col = torch.arange(-(-w // tile), device=device)[:, None] * tile - radius  # tile columns x 1
    rows_in_frame = ((first_row + cell) >= 0) & ((first_row + cell) < h)  # tile rows x box
    cols_in_frame = ((first_col + cell) >= 0) & ((first_col + cell) < w)  # tile columns x box
    return seen, rows_in_frame, cols_in_frame


def tiles_to_rows(a, tiles_y, tiles_x, t):
    """(tiles_y*tiles_x) x t*t x k, tile by tile -> (tiles_y*t) x (tiles_x*t) x k, the queries' own grid."""
    k = a.shape[-1]
    return a.reshape(tiles_y, tiles_x, t, t, k).permute(0, 2, 1, 3, 4).reshape(tiles_y * t, tiles_x * t, k)


def in_window(dy, dx, radius, window):
    """Whether a key at offset (dy, dx) cells from its query is seen: square |dy|, |dx| <= r (DINO's
    restrict_neighborhood), disc sqrt(dy^2 + dx^2) < r (CRW's MaskedAttention: distance < radius)."""
    if window == "disc":
        return dy * dy + dx * dx < radius * radius
    return (dy.abs() <= radius) & (dx.abs() <= radius)


def window_mask(query_index, grid, radius, window="square"):
    """B x (h*w) bool: True where the key lies outside the window of the query (the full affinity's mask)."""
    h, w = grid
    qy, qx = query_index // w, query_index % w  # B, B
    ky = torch.arange(h, device=query_index.device).repeat_interleave(w)  # h*w
    kx = torch.arange(w, device=query_index.device).repeat(h)  # h*w
    return ~in_window(ky[None] - qy[:, None], kx[None] - qx[:, None], radius, window)  # B x h*w


def minmax_rescale(soft):
    """Each channel of a prediction rescaled to [0, 1] (a constant channel becomes 0): TimeCycle's carried
    predictions, DINO's norm_mask of the upsampled one (which makes a constant positive channel NaN, not 0)."""
    flat = soft.reshape(soft.shape[0], -1)  # L x P
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (flat - low) / span.clamp_min(1e-12), torch.zeros_like(flat)).reshape(soft.shape)


def label_grid(ids, num_objects, grid, resolution, stride=4, resample="area"):
    """H x W ids -> (N+1) x h x w soft labels of the feature grid's cells.

    At native size cell j covers pixels [stride*j, stride*(j+1)), so the mask is edge-padded to stride*h x stride*w
    first; in square mode the grid spans the whole frame. `resample`:
      area: the fraction of each cell covered by each object (in square mode: of the whole pixels its span touches);
      bilinear (CRW, TimeCycle): the one-hot masks at the network input's size (square mode: the ids resized to
        S x S by nearest neighbour first, TimeCycle's imresize) sampled bilinearly at each cell's centre without
        antialiasing, as their cv2.resize(INTER_LINEAR) does: at stride 8, the mean of the 2 x 2 central pixels;
      nearest (DINO): the object at the pixel nearest each cell's centre (PIL's NEAREST, DINO's read_seg).
    All agree inside an object and differ on the cells an edge crosses."""
    ids = torch.as_tensor(ids).long()
    ids = torch.where(ids > num_objects, torch.zeros_like(ids), ids)  # void (255) and ids unknown at frame 0 -> bg
    if resolution != "native" and resample == "bilinear":
        side = int(resolution)
        ids = F.interpolate(ids[None, None].float(), size=(side, side), mode="nearest-exact")[0, 0].long()
    onehot = F.one_hot(ids, num_objects + 1).permute(2, 0, 1).float()[None]  # 1 x (N+1) x H x W
    if resolution == "native":
        h, w = onehot.shape[2:]
        onehot = F.pad(onehot, (0, stride * grid[1] - w, 0, stride * grid[0] - h), mode="replicate")
    if resample == "area":
        return F.interpolate(onehot, size=grid, mode="area")[0]  # (N+1) x h x w
    if resample == "bilinear":
        return F.interpolate(onehot, size=grid, mode="bilinear", align_corners=False, antialias=False)[0]
    return F.interpolate(onehot, size=grid, mode="nearest-exact")[0]


def labels_to_ids(soft, size, resolution, stride=4, minmax_output=False):
    """(N+1) x h x w soft labels -> H x W uint8 ids: bilinear to the frame (or stride*h x stride*w, cropped), then
    (DINO, `minmax_output`) each channel rescaled to [0, 1], then argmax.

    At native size each cell is upsampled by exactly the stride and the padding cropped; CRW stretches the grid
    over the frame (854 / 107 = 7.98 px a cell), DINO upsamples to its resized frame and resizes the argmax."""
    h, w = soft.shape[1:]
    canvas = size if resolution != "native" else (stride * h, stride * w)
    up = F.interpolate(soft[None], size=canvas, mode="bilinear", align_corners=False)[0]  # (N+1) x H' x W'
    up = up[:, :size[0], :size[1]]  # (N+1) x H x W
    if minmax_output:
        up = minmax_rescale(up)
    return up.argmax(0).to(torch.uint8).cpu().numpy()


# ---- scoring: the official davis2017-evaluation definitions ----
def seg2bmap(mask):
    """1-pixel boundary of a binary H x W mask: a pixel differs from its east, south or south-east neighbour
    (zeros beyond the image); the last row compares east only, the last column south only, the corner is 0."""
    m = np.asarray(mask, dtype=bool)
    east, south, south_east = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
    b = (m ^ east) | (m ^ south) | (m ^ south_east)
    b[-1, :] = m[-1, :] ^ east[-1, :]
    b[:, -1] = m[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def dilate_disk(b, r):
    """Binary dilation of b (H x W bool) by the disk {dx^2 + dy^2 <= r^2}, zeros outside the image.

    The disk is a stack of horizontal runs: row dy has half-width floor(sqrt(r^2 - dy^2)). Each run is a sliding
    OR along x (a cumulative-sum window), then shifted by dy."""
    H, W = b.shape
    csum = np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(b, axis=1, dtype=np.int64)], axis=1)  # H x (W+1)
    x = np.arange(W)
    rows = {}
    out = np.zeros_like(b, dtype=bool)
    for dy in range(-r, r + 1):
        half = math.isqrt(r * r - dy * dy)
        if half not in rows:  # any(b[y, x-half .. x+half])
            rows[half] = (csum[:, np.minimum(x + half + 1, W)] - csum[:, np.maximum(x - half, 0)]) > 0
        run = rows[half]
        if dy >= 0:  # out[y] |= run[y + dy]
            out[:H - dy] |= run[dy:]
        else:
            out[-dy:] |= run[:H + dy]
    return out


def region_similarity(gt, pred):
    """J: |P & G| / |P | G|, and 1 when both masks are empty."""
    union = np.logical_or(gt, pred).sum()
    return 1.0 if union == 0 else float(np.logical_and(gt, pred).sum() / union)


def boundary_f_measure(gt, pred):
    """F: boundary precision/recall within ceil(0.008 * image diagonal) pixels, with the official empty rules."""
    r = int(math.ceil(0.008 * math.hypot(*gt.shape)))
    bg, bp = seg2bmap(gt), seg2bmap(pred)
    n_g, n_p = int(bg.sum()), int(bp.sum())
    if n_p == 0 and n_g == 0:
        precision, recall = 1.0, 1.0
    elif n_p == 0:
        precision, recall = 1.0, 0.0
    elif n_g == 0:
        precision, recall = 0.0, 1.0
    else:
        ys, xs = np.nonzero(bg | bp)  # crop to the boundaries + r: the counts below only involve boundary pixels
        y0, y1 = max(ys.min() - r, 0), min(ys.max() + r + 1, gt.shape[0])
        x0, x1 = max(xs.min() - r, 0), min(xs.max() + r + 1, gt.shape[1])
        bg, bp = bg[y0:y1, x0:x1], bp[y0:y1, x0:x1]
        precision = float((bp & dilate_disk(bg, r)).sum() / n_p)
        recall = float((bg & dilate_disk(bp, r)).sum() / n_g)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def mean_recall_decay(values):
    """Per-object statistics over its scored frames: mean, fraction > 0.5, first-quarter minus last-quarter mean."""
    v = np.asarray(values, dtype=np.float64)
    ids = np.round(np.linspace(1, len(v), 5) + 1e-10).astype(int) - 1
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return float(v.mean()), float((v > 0.5).mean()), float(bins[0].mean() - bins[3].mean())


def score_sequence(gt_paths, result_dir):
    """Per-object (J, F) arrays, objects x frames, of one sequence over frames 1..T-2, reading <result_dir>/<frame>.png.

    Objects are 1..N with N the largest id of the first frame; void (255) counts as background, as the official
    semi-supervised evaluation does; an object never predicted scores its empty masks."""
    first = read_annotation(gt_paths[0])
    first[first == VOID] = 0
    num_objects = int(first.max())
    scored = gt_paths[1:-1]
    J, F_measure = np.zeros((num_objects, len(scored))), np.zeros((num_objects, len(scored)))
    for t, gt_path in enumerate(scored):
        gt = read_annotation(gt_path)
        gt[gt == VOID] = 0
        res_path = os.path.join(result_dir, stem(gt_path) + ".png")
        if not os.path.isfile(res_path):
            raise common.UserError(f"{res_path}: result missing (every frame but the first and last is scored)")
        res = read_annotation(res_path)
        if res.shape != gt.shape:
            raise common.UserError(f"{res_path}: size {res.shape[1]}x{res.shape[0]} differs from the ground truth "
                                   f"{gt_path} ({gt.shape[1]}x{gt.shape[0]})")
        if res.max() > num_objects:
            raise common.UserError(f"{res_path}: id {int(res.max())} but the first frame has {num_objects} objects")
        for o in range(num_objects):
            J[o, t] = region_similarity(gt == o + 1, res == o + 1)
            F_measure[o, t] = boundary_f_measure(gt == o + 1, res == o + 1)
    return J, F_measure


def summarise(per_sequence):
    """{seq: (J, F) arrays objects x frames} -> the official summary, averaged over all objects of all sequences."""
    stats = {"J": [], "F": []}
    for J, F_measure in per_sequence.values():
        for name, values in (("J", J), ("F", F_measure)):
            stats[name] += [mean_recall_decay(v) for v in values]
    out = {}
    for name in ("J", "F"):
        m, r, d = np.array(stats[name]).reshape(-1, 3).T
        out.update({f"{name}-Mean": float(m.mean()), f"{name}-Recall": float(r.mean()),
                    f"{name}-Decay": float(d.mean())})
    return {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}


def evaluate(root, sequences, result_dir):
    """Score every sequence; returns (summary, per-sequence table). Prints the table."""
    per_sequence, table = {}, {}
    for seq in common.throughput_bar(sequences, len(sequences), True, desc="score"):
        _, anns = sequence_files(root, seq)
        J, F_measure = score_sequence(anns, os.path.join(result_dir, seq))
        per_sequence[seq] = (J, F_measure)
        table[seq] = dict(objects=J.shape[0], J=[mean_recall_decay(v)[0] for v in J],
                          F=[mean_recall_decay(v)[0] for v in F_measure])
    if not any(J.shape[0] for J, _ in per_sequence.values()):
        raise common.UserError(f"{root}: no objects in the first frames of the split; nothing to score")
    print(f"{'sequence':<24} {'objects':>7} {'J-Mean':>7} {'F-Mean':>7} {'J&F':>7}")
    for seq, row in table.items():
        j = float(np.mean(row["J"])) if row["J"] else float("nan")  # a sequence without objects has no mean
        f = float(np.mean(row["F"])) if row["F"] else float("nan")
        row.update(J_mean=j, F_mean=f)
        print(f"{seq:<24} {row['objects']:>7} {j:>7.3f} {f:>7.3f} {(j + f) / 2:>7.3f}")
    return summarise(per_sequence), table


# ---- features of the frames ----
def feature_grid(height, width, resolution, stride):
    """The feature grid (h, w) of an H x W frame: its sides (or the square's) divided by the stride, rounded up."""
    if resolution == "native":
        return math.ceil(height / stride), math.ceil(width / stride)
    side = int(resolution)
    return math.ceil(side / stride), math.ceil(side / stride)


def frame_pixels(frame, resolution):
    """PIL frame -> uint8 3 x H' x W' network pixels: stretched to S x S by PIL's bilinear resize (TimeCycle's
    square) or the native frame. uint8 is what the loader's workers hand over (a quarter of float32's bytes)."""
    if resolution != "native":
        frame = frame.resize((int(resolution), int(resolution)), Image.BILINEAR)
    return common.to_uint8(frame)


def network_input(pixels, resolution, stride, device):
    """uint8 B x 3 x H x W frame pixels -> (the ImageNet-normalised network input on `device`, the feature grid).

    At native size the input is zero-padded after normalisation (zero = the mean colour) to a multiple of 32 for
    the network; FeatureStream crops the features back to the grid, so the padding never reaches the labels."""
    x = common.normalize(pixels, device)  # B x 3 x H x W, float32
    h, w = x.shape[-2:]
    if resolution == "native":
        x = F.pad(x, (0, -w % 32, 0, -h % 32))  # B x 3 x H' x W', multiples of 32
    return x, feature_grid(h, w, resolution, stride)


class AveragePooled(nn.Module):
    """A network with output at 1/4 seen at 1/8: each stride-8 cell is the mean of the 2 x 2 stride-4 cells it
    covers (a partial cell at an odd edge: of those that exist), i.e. the area average of the features."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return F.avg_pool2d(self.model(x), 2, ceil_mode=True)  # N x C x ceil(h/2) x ceil(w/2)


def at_stride(model, stride):
    """The frozen network with its features at 1/stride; returns (model, description).

    common.dense_feature_model gives VADeR's decoder (1/4), a ResNet dilated to 1/4 (res5, common.DilatedResNet, as
    §4.1 does for Table 1's baselines) or res4 (common.Res4ResNet, 1/8: build_model allows it at stride 8 only). At
    stride 8 the dilated ResNet is re-dilated to 1/8 only (layer2 keeps its stride: C5 on res4's grid), and VADeR's
    decoder output is average-pooled 2 x 2 (AveragePooled)."""
    if isinstance(model, common.Res4ResNet):
        return model, "at stride 8: res4's own grid"
    if stride == 4:
        return model, "at stride 4"
    if isinstance(model, common.DilatedResNet):
        common.set_resnet_stride(model.net, stride)
        return model, f"at stride {stride}: re-dilated to 1/{stride} (layer2 keeps its stride)"
    return AveragePooled(model), f"at stride {stride}: the 1/4 output average-pooled 2 x 2"


class FrameDataset(torch.utils.data.Dataset):
    """The frames of every sequence a rank propagates, in order, as uint8 network pixels (frame_pixels), decoded by
    the loader's workers while the main process runs the network. A frame that does not decode (damaged past the
    checks of image_size) comes back as its error message, which FeatureStream raises as a one-line error: an
    exception inside a worker would reach the user wrapped in the worker's traceback."""

    def __init__(self, paths, resolution):
        self.paths, self.resolution = paths, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return frame_pixels(common.load_image(self.paths[i]), self.resolution)
        except (OSError, ValueError, SyntaxError) as e:
            return f"{type(e).__name__}: {e}"


def frame_loader(paths, resolution, workers, device):
    """The frames of `paths` one at a time, in order, decoded by `workers` processes ahead of the network
    (0: in this process)."""
    return torch.utils.data.DataLoader(FrameDataset(paths, resolution), batch_size=None, num_workers=workers,
                                       pin_memory=device.type == "cuda")


class FeatureStream:
    """Yields the L2-normalised features (C x h x w) of one sequence's frames in order, each computed once, in
    batches; `frames` yields their pixels (frame_loader), in the order of `paths`. `seconds` accumulates the time
    spent waiting for frames and running the network."""

    def __init__(self, model, frames, paths, resolution, stride, device, batch_size=1, precision="fp32"):
        self.model, self.frames, self.paths, self.resolution, self.stride = model, frames, paths, resolution, stride
        self.device, self.batch_size, self.precision = device, batch_size, precision
        self.seconds = 0.0

    @torch.no_grad()
    def __iter__(self):
        for start in range(0, len(self.paths), self.batch_size):
            begin = time.perf_counter()
            batch = []
            for path in self.paths[start:start + self.batch_size]:
                pixels = next(self.frames)  # 3 x H' x W' uint8, or why the frame did not decode
                if isinstance(pixels, str):
                    raise common.UserError(f"{path}: unreadable frame ({pixels}); re-extract or re-download it")
                batch.append(pixels)
            x, (gh, gw) = network_input(torch.stack(batch), self.resolution, self.stride, self.device)
            with common.autocast(self.device, self.precision):
                feats = self.model(x)  # B x C x H'/stride x W'/stride
            feats = F.normalize(feats[:, :, :gh, :gw].float(), dim=1)  # B x C x h x w, unit vectors
            if not torch.isfinite(feats).all():
                raise common.UserError(f"{path}: the network's features are not finite (a diverged checkpoint?)")
            feats = [f.clone() for f in feats]  # own storage: the batch is freed once the window moves on
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # so that `seconds` counts the GPU's work
            self.seconds += time.perf_counter() - begin
            yield from feats


def build_model(args, device):
    """The frozen network and the grid it is read on: (model, description, stride, radius).

    --stride 'network' is the network's own (VADeR's decoder 4, res4 8, res5 4). res4 exists at stride 8 only:
    --stride 4 with it is an error, not a quietly different network (a dilated layer2 would no longer give res4's
    features). A preset's radius keeps its pixel extent at the stride. A bad weights file fails here, before
    anything is written."""
    common.autocast_dtype(device, args.precision)  # e.g. fp16 without a GPU: one-line error now, not mid-run
    model, description = common.dense_feature_model(args.weights, args.arch, {"vader": VADeRNet}, layer=args.layer)
    res4 = isinstance(model, common.Res4ResNet)
    stride = (8 if res4 else 4) if args.stride == "network" else args.stride
    if res4 and stride != 8:
        raise common.UserError(f"--stride {stride} with --layer res4: res4 exists at stride 8 only (layer3 at stride "
                               "1 on layer2's 1/8 grid); use --stride 8 or network, or --layer res5 for stride 4")
    preset = PROTOCOLS[args.protocol]
    radius = args.radius if args.radius is not None else \
        round(preset["radius"] * preset["stride"] / stride) if preset["radius"] else 0
    model, strided = at_stride(model, stride)
    return model.to(device).eval(), f"{description}; {strided}", stride, radius


# ---- a run: every sequence propagated, written and scored ----
def propagate_sequence(args, model, device, frames, frame_paths, first_ids, num_objects):
    """The soft labels of frames 1, 2, ... of one sequence, and its FeatureStream (which times the network);
    `frames` yields the pixels of `frame_paths` (frame_loader)."""
    grid = feature_grid(*first_ids.shape, args.resolution, args.stride)
    first_labels = label_grid(first_ids, num_objects, grid, args.resolution, args.stride,
                              args.label_resample).to(device)
    stream = FeatureStream(model, frames, frame_paths, args.resolution, args.stride, device, args.batch_size,
                           args.precision)
    return propagate(stream, first_labels, Propagation.of(vars(args))), stream


def write_sequence(args, root, seq, frame_paths, num_objects, folder, model, device, frames, bar):
    """Propagate one sequence and write its PNGs (and overlays) into `folder`; returns its FeatureStream."""
    first_ids = read_annotation(first_annotation_path(root, seq, frame_paths))
    first_ids[first_ids == VOID] = 0
    save_indexed_png(os.path.join(folder, stem(frame_paths[0]) + ".png"), first_ids.astype(np.uint8))
    predictions, stream = propagate_sequence(args, model, device, frames, frame_paths, first_ids, num_objects)
    bar.update(1)
    for path, soft in zip(frame_paths[1:], predictions):
        ids = labels_to_ids(soft, first_ids.shape, args.resolution, args.stride,
                            minmax_output=args.minmax == "output")  # H x W uint8
        save_indexed_png(os.path.join(folder, stem(path) + ".png"), ids)
        if args.save_overlays:
            overlay_dir = os.path.join(args.output_dir, "overlays", seq)
            os.makedirs(overlay_dir, exist_ok=True)
            overlay(common.load_image(path), ids).save(os.path.join(overlay_dir, stem(path) + ".jpg"), quality=90)
        bar.update(1)
    return stream


def run_propagation(args, root, sequences, checked, d, model):
    """Propagate every sequence of this rank and write the PNGs; returns a dict of speed figures.

    The folders an earlier run left for these sequences are removed first; each sequence is written to
    <seq>.partial/ and renamed to <seq>/ once complete (removed if it fails): a <seq>/ present is complete and
    from this run."""
    mine = sequences[d.rank::d.world_size]
    for seq in mine:
        for old in (seq, seq + ".partial", os.path.join("overlays", seq)):
            shutil.rmtree(os.path.join(args.output_dir, old), ignore_errors=True)
    frames = iter(frame_loader([p for s in mine for p in checked[s][0]], args.resolution, args.workers, d.device))
    total = sum(len(checked[s][0]) for s in mine)
    frames_done, network_s, start = 0, 0.0, time.perf_counter()
    with common.throughput_bar(None, total, d.is_main, desc="propagate") as bar:  # closed before an error prints
        for seq in mine:
            frame_paths, _, num_objects, _ = checked[seq]
            partial = os.path.join(args.output_dir, seq + ".partial")
            os.makedirs(partial)
            try:
                stream = write_sequence(args, root, seq, frame_paths, num_objects, partial, model, d.device, frames,
                                        bar)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            os.replace(partial, os.path.join(args.output_dir, seq))
            frames_done += len(frame_paths)
            network_s += stream.seconds
            bar.set_postfix(seq=seq, fps=f"{frames_done / (time.perf_counter() - start):.2f}")
    seconds = time.perf_counter() - start
    return dict(frames=frames_done, seconds=round(seconds, 2), frames_per_s=round(frames_done / max(seconds, 1e-9), 4),
                network_seconds=round(network_s, 2), propagation_seconds=round(seconds - network_s, 2),
                peak_memory_mb=round(peak_memory_mb(d.device), 1), device=str(d.device), workers=args.workers)


def run(args, settings, root, built=None):
    """Propagate (unless --eval-only) and score the split under `root`; `built` is what build_model returned
    earlier (the demo builds it before it writes its videos). A split with first masks only is not scored."""
    d = common.init_distributed()
    sequences = list_sequences(root, args.split, args.sequences)
    checked = {s: check_sequence(root, s) for s in sequences}  # fail before any work
    unscored = scoring_plan(os.path.join(root, "ImageSets", "2017", f"{args.split}.txt"), checked)
    if unscored and args.eval_only is not None:
        raise common.UserError(f"--eval-only {args.eval_only}: nothing to score ({unscored})")
    metrics_path = os.path.join(args.eval_only or args.output_dir, "metrics.json")
    speed = {}
    if args.eval_only is None:
        model, description, args.stride, args.radius = built or build_model(args, d.device)
        settings.update(stride=args.stride, radius=args.radius, weights_format=common.weights_format(args.weights))
        model = model.to(d.device)
        os.makedirs(args.output_dir, exist_ok=True)
        if d.is_main:
            if os.path.exists(metrics_path):
                os.remove(metrics_path)  # a stale score must never sit next to new masks
            print("settings: " + " ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
            print(f"features: {description}", flush=True)
        speed = run_propagation(args, root, sequences, checked, d, model)
        if d.is_main:
            print(f"propagation: {speed['frames']} frames in {speed['seconds']:.1f} s ({speed['frames_per_s']} "
                  f"frames/s, rank 0; network {speed['network_seconds']:.1f} s, propagation "
                  f"{speed['propagation_seconds']:.1f} s), peak memory {speed['peak_memory_mb']:.0f} MiB "
                  f"({'max allocated' if d.device.type == 'cuda' else 'peak RSS'})", flush=True)
        if common.distributed():
            dist.barrier()  # every rank's PNGs are written before rank 0 scores them
    if d.is_main:
        if unscored:
            unscored += f"; the masks in {args.output_dir} are not scored: submit them to the DAVIS evaluation server"
            summary, table = dict(scoring="skipped", reason=unscored), {}
            print(f"scoring skipped: {unscored}", flush=True)
        else:
            summary, table = evaluate(root, sequences, args.eval_only or args.output_dir)
        write_json(metrics_path, dict(summary, per_sequence=table, settings=settings if args.eval_only is None else {},
                                      speed=speed, data=args.data or "embedded synthetic", split=args.split))
        common.print_result(summary)
    common.finish_distributed()


# ---- data: the DAVIS layout, palette PNGs, the checks before any work ----
def voc_palette():
    """The PASCAL VOC colour map (256 RGB triples, flat): bit k of the index goes to bit 7-k//3 of channel k%3."""
    palette = []
    for index in range(256):
        rgb, c = [0, 0, 0], index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
        palette += rgb
    return palette


PALETTE = voc_palette()
VOID = 255  # DAVIS marks "void" pixels with 255 in the ground truth; object ids must stay below it


def save_indexed_png(path, labels):
    """labels: H x W uint8 object ids -> indexed ('P') PNG with the VOC palette, written atomically."""
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    img.putpalette(PALETTE)
    tmp = f"{path}.tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def read_annotation(path):
    """An annotation or result PNG as H x W int64 ids (palette index or grey value). One-line error otherwise."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                raise common.UserError(f"{path}: mode {img.mode}; expected an indexed (palette) or grey PNG of ids")
            ids = np.array(img).astype(np.int64)
    except OSError as e:
        raise common.UserError(f"{path}: unreadable annotation ({e})")
    return ids


def list_sequences(root, split, only=None):
    """Sequence names of ImageSets/2017/<split>.txt (optionally a subset), checked to exist."""
    split_file = os.path.join(root, "ImageSets", "2017", f"{split}.txt")
    if not os.path.isfile(split_file):
        raise common.UserError(f"{split_file}: split file not found (--data must be a DAVIS-2017 root, --split "
                               "one of its lists)")
    with open(split_file) as f:
        names = [line.strip() for line in f if line.strip()]
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise common.UserError(f"--sequences {' '.join(missing)}: not in {split_file}")
        names = [n for n in names if n in only]
    if not names:
        raise common.UserError(f"{split_file}: lists no sequences")
    return names


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def sequence_files(root, seq):
    """(frame paths, annotation paths), each sorted by name; the frame order is the name order, as in DAVIS."""
    frame_dir = os.path.join(root, "JPEGImages", "480p", seq)
    ann_dir = os.path.join(root, "Annotations", "480p", seq)
    frames = sorted(os.path.join(frame_dir, f) for f in os.listdir(frame_dir) if f.lower().endswith(".jpg")) \
        if os.path.isdir(frame_dir) else []
    if not frames:
        raise common.UserError(f"{frame_dir}: no .jpg frames for sequence {seq}")
    anns = sorted(os.path.join(ann_dir, f) for f in os.listdir(ann_dir) if f.endswith(".png")) \
        if os.path.isdir(ann_dir) else []
    return frames, anns


def first_annotation_path(root, seq, frames):
    """The ground truth of the first frame, where propagation starts."""
    return os.path.join(root, "Annotations", "480p", seq, stem(frames[0]) + ".png")


END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}  # a truncated copy lacks its format's last bytes


def image_size(path, what):
    """(width, height) from the header, after a cheap test for truncation: a JPEG ends with the end-of-image marker,
    a PNG with its IEND chunk. A file without it is decoded once (bytes after the marker are legal); one that does
    not decode is a one-line error naming it, before any work. A frame that fails later: see FrameDataset."""
    try:
        with Image.open(path) as img:
            size, marker = img.size, END_MARKERS.get(img.format)
            if marker is not None:
                with open(path, "rb") as f:
                    f.seek(max(os.path.getsize(path) - len(marker), 0))
                    if f.read() != marker:
                        img.load()  # raises on a truncated file (PIL's LOAD_TRUNCATED_IMAGES is off)
    except (OSError, SyntaxError, ValueError) as e:
        raise common.UserError(f"{path}: unreadable {what} ({e}); re-extract or re-download it") from None
    return size


def check_sequence(root, seq):
    """Validate one sequence before anything is computed; returns (frames, annotations, number of objects,
    whether every frame is annotated). A sequence with its first mask only (test-dev) is propagated, not scored."""
    frames, anns = sequence_files(root, seq)
    first_ann = first_annotation_path(root, seq, frames)
    if not os.path.isfile(first_ann):
        raise common.UserError(f"{first_ann}: first-frame annotation missing (propagation starts from it)")
    size = image_size(frames[0], "frame")
    for path in frames[1:]:
        w, h = image_size(path, "frame")
        if (w, h) != size:
            raise common.UserError(f"{path}: frame size {w}x{h} differs from {frames[0]} ({size[0]}x{size[1]})")
    for path in anns:
        w, h = image_size(path, "annotation")
        if (w, h) != size:
            raise common.UserError(f"{path}: mask size {w}x{h} differs from the frames ({size[0]}x{size[1]}, "
                                   f"{frames[0]})")
    first = read_annotation(first_ann)
    ids = first[first != VOID]
    num_objects = int(ids.max()) if ids.size else 0
    if num_objects >= VOID or first.max() > VOID:
        raise common.UserError(f"{first_ann}: object id {int(first.max())} does not fit the 255-colour palette "
                               f"(ids 1..254, 255 = void)")
    complete = [stem(a) for a in anns] == [stem(f) for f in frames]
    if complete and len(anns) < 3:
        raise common.UserError(f"{os.path.dirname(first_ann)}: {len(anns)} annotated frames; scoring needs >= 3 "
                               "(the first and the last are not scored)")
    return frames, anns, num_objects, complete


def scoring_plan(split_file, checked):
    """None when every sequence is annotated in full (scored), else why scoring is skipped: the first masks only in
    every sequence (a test-dev split, which the DAVIS server scores). A mixture is a one-line error before any
    work: scores on part of a split would read as the split's."""
    partial = [s for s, c in checked.items() if not c[3]]
    if not partial:
        return None
    first_only = [s for s in partial if len(checked[s][1]) == 1]
    if len(first_only) == len(checked):
        return f"{split_file}: the ground truth holds the first frames only (as test-dev's does)"
    s = partial[0]
    frames, anns = checked[s][:2]
    raise common.UserError(f"{os.path.dirname(anns[0])}: annotations for {len(anns)} of {len(frames)} frames; "
                           "scoring needs every frame annotated in every sequence, or the first masks only (test-dev)")


def leaves_video(leaves, index, num_frames=12, num_objects=(1, 3), height=160, width=160, speed=2.0):
    """Frames (PIL) and instance masks (uint8, 0 = background, 1..N objects) of a short video painted with
    `leaves` (a common.DeadLeaves): a dead-leaves background pans slowly and N textured objects move with their own
    constant velocity (pixels per frame, up to `speed`) in a fixed depth order, so the masks are the exact visible
    parts of each object. Deterministic by (leaves.seed, index); a random stream of its own (kind 1)."""
    rng = leaves.rng(1, index)
    h, w = height, width
    margin = int(speed * num_frames) + 2
    big_h, big_w = h + 2 * margin, w + 2 * margin
    bg = leaves.background(rng, big_h, big_w)
    bl, bi = np.zeros((big_h, big_w), np.uint8), np.zeros((big_h, big_w), np.int32)
    for _ in range(int(rng.integers(leaves.shapes[0], leaves.shapes[1] + 1)) * 2):
        leaves.paint(bg, bl, bi, leaves.leaf(rng, big_h, big_w), 1)
    pan = rng.uniform(-0.5, 0.5, 2) * speed
    objects = []
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        leaf = leaves.leaf(rng, h, w)
        leaf.update(r=rng.uniform(0.12, 0.22) * min(h, w), cy=rng.uniform(0.3, 0.7) * h, cx=rng.uniform(0.3, 0.7) * w)
        objects.append((leaf, rng.uniform(-1, 1, 2) * speed))
    frames, masks = [], []
    for t in range(num_frames):
        oy, ox = int(round(margin + pan[0] * t)), int(round(margin + pan[1] * t))
        canvas = bg[oy:oy + h, ox:ox + w].copy()
        labels, inst = np.zeros((h, w), np.uint8), np.zeros((h, w), np.int32)
        for k, (leaf, velocity) in enumerate(objects):
            leaves.paint(canvas, labels, inst, leaf, k + 1, offset=tuple(velocity * t))
        frames.append(Image.fromarray(np.clip(canvas * 255, 0, 255).astype(np.uint8)))
        masks.append(inst.astype(np.uint8))
    return frames, masks


def write_synthetic_davis(root, num_sequences, num_frames, height, width, seed=0):
    """A DAVIS-layout set of moving textured shapes with exact masks (leaves_video) under `root`."""
    leaves = common.DeadLeaves(size=max(height, width), seed=seed)
    names = [f"synthetic{i:02d}" for i in range(num_sequences)]
    for i, name in enumerate(names):
        frames, masks = leaves_video(leaves, i, num_frames=num_frames, num_objects=(1, 3), height=height,
                                     width=width, speed=max(height, width) / 48)
        for sub in ("JPEGImages", "Annotations"):
            os.makedirs(os.path.join(root, sub, "480p", name), exist_ok=True)
        for t, (frame, mask) in enumerate(zip(frames, masks)):
            frame.save(os.path.join(root, "JPEGImages", "480p", name, f"{t:05d}.jpg"), quality=95)
            save_indexed_png(os.path.join(root, "Annotations", "480p", name, f"{t:05d}.png"), mask)
    os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    return root


def overlay(frame, ids, alpha=0.5):
    """The frame with each object painted in its palette colour (H x W uint8 ids; 0 stays the frame)."""
    colours = np.array(PALETTE, dtype=np.float32).reshape(256, 3)[ids]  # H x W x 3
    rgb = np.asarray(frame, dtype=np.float32)
    mixed = np.where(ids[..., None] > 0, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(mixed.astype(np.uint8))


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: peak resident set


def write_json(path, record):
    """Strict JSON (common.finite_or_none: a sequence without objects has no J-Mean), written atomically: a reader
    never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(common.finite_or_none(record), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


# ---- arguments and input checks ----
DEMO_PRESET = dict(arch="resnet18", resolution="native", output_dir="runs/davis-demo")  # no --data: CPU-sized


def stride_value(text):
    """--stride: 4, 8 or 'network' (the network's own output stride)."""
    if text == "network":
        return text
    if text in ("4", "8"):
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: expected 4, 8 or network")


def get_parser():
    p = argparse.ArgumentParser(description="DAVIS-2017 mask propagation with frozen features and the official J&F.",
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="DAVIS-2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017); none: the demo")
    p.add_argument("--split", default="val",
                   help="sequence list ImageSets/2017/<split>.txt (test-dev: first masks only, propagated unscored)")
    p.add_argument("--sequences", nargs="*", default=None, help="only these sequences of the split")
    p.add_argument("--output-dir", default="runs/davis", help="<seq>/<frame>.png, metrics.json and overlays go here")
    p.add_argument("--weights", default="random",
                   help="'random', a vader.py/clove.py checkpoint or a format in common.WEIGHT_FORMATS")
    p.add_argument("--arch", default="resnet50", help="ResNet depth for 'random' and for files that do not say it")
    p.add_argument("--protocol", default="timecycle", choices=sorted(PROTOCOLS),
                   help="preset of the knobs whose default is None (timecycle: the VADeR paper's); typed flags win")
    p.add_argument("--layer", default=None, choices=["res4", "res5"],
                   help="where a ResNet is read: res4 = layer3 at 1/8 (CRW, TimeCycle), res5 = dilated C5")
    p.add_argument("--resolution", default=None,
                   help="square input side (320 and 480 are TimeCycle's; any integer >= 32) or 'native' (480p)")
    p.add_argument("--stride", type=stride_value, default=None,
                   help="feature stride 4 or 8 (16x cheaper affinity), or 'network': its own (VADeR 4, res4 8)")
    p.add_argument("--n-context", type=int, default=None, help="previous predicted frames in the context")
    p.add_argument("--topk", type=int, default=None, help="neighbours whose labels are mixed")
    p.add_argument("--topk-mode", default=None, choices=["per-frame", "joint"],
                   help="top-k of a softmax over each context frame (TimeCycle) or of all context keys (CRW, DINO)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature on the cosine similarity")
    p.add_argument("--radius", type=int, default=None, help="only keys within this many cells of the query; 0: all")
    p.add_argument("--window", default=None, choices=["square", "disc"],
                   help="shape of the --radius window: |dy|, |dx| <= r (DINO) or distance < r (CRW)")
    p.add_argument("--radius-first-frame", action=argparse.BooleanOptionalAction, default=None,
                   help="apply --radius to the first frame too (DINO), not only to the previous frames (CRW)")
    p.add_argument("--minmax", default=None, choices=["none", "carried", "output"],
                   help="rescale each channel to [0, 1]: each carried prediction (TimeCycle) or only the output (DINO)")
    p.add_argument("--fill-context", action=argparse.BooleanOptionalAction, default=None,
                   help="start the context as --n-context copies of frame 0 (TimeCycle, CRW), not the frames seen")
    p.add_argument("--predict-first-frame", action=argparse.BooleanOptionalAction, default=None,
                   help="propagate frame 0 onto itself first and carry that prediction as a previous frame (TimeCycle)")
    p.add_argument("--label-resample", default=None, choices=["area", "bilinear", "nearest"],
                   help="first-frame masks onto the grid: cell area, bilinear at cell centres (CRW, TimeCycle), "
                        "nearest pixel (DINO)")
    p.add_argument("--affinity", default="local", choices=["local", "full"],
                   help="with a --radius: score only each query's neighbourhood, or all keys then mask (same labels)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="queries per affinity block; lower it if memory runs out (results do not change)")
    p.add_argument("--batch-size", type=int, default=1, help="frames per forward pass of the network")
    p.add_argument("--workers", type=int, default=None,
                   help="frame-decoding processes (default: 4, or the CPUs this process may use if fewer); 0: none")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="network autocast (fp16 needs a GPU); the affinity is always fp32")
    p.add_argument("--eval-only", default=None, metavar="DIR",
                   help="score the results in DIR/<seq>/<frame>.png against --data; no network is run")
    p.add_argument("--save-overlays", action="store_true", help="also write colour overlays of the predictions")
    p.add_argument("--synthetic-sequences", type=int, default=12,
                   help="videos in the embedded set (no --data); more give a steadier J&F")
    p.add_argument("--synthetic-frames", type=int, default=10, help="frames per embedded video")
    p.add_argument("--synthetic-size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"),
                   help="frame size of the embedded videos")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded videos and of random weights")
    return p


def resolve_settings(parser, args, argv):
    """Fill the knobs left unset from --protocol (and the demo preset), check every path, then every size, before
    any work; returns the settings to print (build_model adds the stride and the radius, which depend on the
    network)."""
    for k, v in PROTOCOLS[args.protocol].items():
        if getattr(args, k) is None and k != "radius":  # an untyped radius follows the stride (build_model)
            setattr(args, k, v)
    if args.data is None and args.eval_only is None:
        common.apply_preset(parser, args, DEMO_PRESET, argv)
    if args.workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.workers = min(4, cpus)
    check_paths(args)
    if args.resolution != "native" and not (str(args.resolution).isdigit() and int(args.resolution) >= 32):
        raise common.UserError(f"--resolution {args.resolution}: expected a square size >= 32 (320 and 480 are "
                               "TimeCycle's) or native")
    for flag, value, low in (("--n-context", args.n_context, 0), ("--topk", args.topk, 1),
                             ("--radius", args.radius or 0, 0), ("--chunk-size", args.chunk_size, 1),
                             ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--synthetic-sequences", args.synthetic_sequences, 1),
                             ("--synthetic-frames", args.synthetic_frames, 3),
                             ("--synthetic-size", min(args.synthetic_size), 16)):
        if value < low:
            raise common.UserError(f"{flag} {value}: must be >= {low}")
    if not args.temperature > 0:
        raise common.UserError(f"--temperature {args.temperature}: must be > 0")
    return dict(protocol=args.protocol, layer=args.layer, resolution=args.resolution, stride=args.stride,
                n_context=args.n_context, topk=args.topk, topk_mode=args.topk_mode, temperature=args.temperature,
                radius=args.radius, window=args.window, radius_first_frame=args.radius_first_frame,
                minmax=args.minmax, fill_context=args.fill_context, predict_first_frame=args.predict_first_frame,
                label_resample=args.label_resample, affinity=args.affinity, chunk_size=args.chunk_size,
                workers=args.workers)


def check_paths(args):
    """Every path the run reads or writes, checked before anything is printed or computed (one-line errors)."""
    if args.data is not None and not os.path.isdir(args.data):
        raise common.UserError(f"--data {args.data}: no such folder")
    if args.eval_only is not None:
        if not os.path.isdir(args.eval_only):
            raise common.UserError(f"--eval-only {args.eval_only}: no such results folder")
        if args.data is None:
            raise common.UserError(f"--eval-only {args.eval_only}: needs --data, the DAVIS root with the ground truth")
        return
    if args.weights != "random" and not os.path.isfile(args.weights):
        raise common.UserError(f"--weights {args.weights}: no such file ('random', or a checkpoint / state dict file)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise common.UserError(f"--output-dir {args.output_dir}: exists and is not a folder")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    settings = resolve_settings(parser, args, argv)  # every size and path checked here
    torch.manual_seed(args.seed)  # random weights are the same on every rank and every run
    if args.data is not None:
        return run(args, settings, args.data)
    built = build_model(args, torch.device("cpu"))  # a bad weights file fails before the videos are written
    if common.job_place().rank == 0:
        print(f"no --data: {args.synthetic_sequences} embedded synthetic videos of {args.synthetic_frames} frames "
              f"({args.synthetic_size[0]}x{args.synthetic_size[1]}); demo preset "
              + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in DEMO_PRESET), flush=True)
    root = tempfile.mkdtemp(prefix="davis-synthetic-")
    try:
        write_synthetic_davis(root, args.synthetic_sequences, args.synthetic_frames, *args.synthetic_size,
                              seed=args.seed)
        run(args, settings, root, built)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    common.run_main(main)


# ---- notes ----
# What each preset still does differently from its reference code (all three: any --weights, not the reference's
# own network; exact ties in a top-k go to the earlier context frame, then the lower key index, where the
# references' torch.topk / argpartition leave them unspecified):
#   timecycle (TimeCycle's test_davis.py and its DAVIS loader): it shrinks frames to 320 x 320 with cv2's bilinear
#     resize, which does not antialias (here PIL's bilinear, which does); its label set keeps only the colours of
#     more than 11 pixels of frame 0 at 320 x 320 (here every id 1..N); its min-max makes a constant channel NaN
#     (here 0); it upsamples the prediction to 320 x 320, takes the argmax and resizes the ids to the frame by
#     nearest neighbour (here: bilinear soft labels at the frame's size, then the argmax). Its code reads its 1/8
#     grid only: the paper does not say how VADeR's 1/4 output was read (here on the 1/4 grid, 80 x 80 at 320).
#   crw (videowalk's test.py): it stretches the grid over the frame, for the labels (cv2's bilinear resize to
#     ceil(H/8) x ceil(W/8)) and for the output (854 / 107 = 7.98 px a cell); here a cell is exactly 8 x 8 pixels,
#     as the features' cells are (at most 2 px apart at the right edge of an 854-wide frame); its window adds
#     -1e10 to the logits (here -inf: the same unless fewer than k keys are in it).
#   dino (eval_video_segmentation.py): it resizes every frame to 480 x (W * 480 / H rounded down to a multiple of
#     64), 480 x 832 for DAVIS's 854 (here: the native frame, zero-padded to a multiple of 32), and its labels with
#     it; it writes the argmax at that size and resizes it to the frame by nearest neighbour (here: bilinear soft
#     labels at native size, then the argmax); its top-k keeps every key tied with the k-th; its norm_mask makes a
#     constant positive channel NaN (here 0); ViT-S/16's grid is stride 16, which a ResNet here does not offer
#     (stride 8 is the grid of DINO's /8 models).
# Speed and memory: at 480 x 854, a random ResNet-50 at stride 8 with CRW's knobs (21 distinct context frames), the
# local windows propagate a frame 1.9x faster than --affinity full on a CPU (1.7x in frames/s once the network's
# time is counted), peak RSS 2.4 GB. CRW's code builds the full affinity in chunks; DINO's a full (n_ctx, HW, HW)
# one, which runs out of memory on 16 GB GPUs at 480 x 1152. At native 480p a ResNet-50's activations take about
# 1 GB a frame (--batch-size); the affinity memory is --chunk-size x the keys of one frame (with a window: at least
# one row of query tiles, each with its box of keys). The copies of frame 0 in a filled context are scored once: with
# CRW's knobs on the embedded videos (10 frames, 20 copies) that halves the propagation time; on DAVIS (70 frames
# a video on average) it saves about a seventh of it. Loader workers decode the next frames while the network runs;
# on a 2-core CPU, where the network takes seconds a frame at 480p, they change nothing measurable.
