"""VADeR: View-Agnostic Dense Representations, pixel-level momentum contrast (MoCo).

Two random crops of an image are taken with known geometry, so every output cell of view 1 has a known matching
cell in view 2. An encoder-decoder f (ResNet + FPN) embeds view 1 at 1/4 resolution and its momentum copy g embeds
view 2; at 32 matched cells per image, f's embedding must pick out g's embedding of the same scene point among
65,536 pixel embeddings of other images kept in a queue (Eq. 2, InfoNCE).

Paper: P. O. Pinheiro, A. Almahairi, R. Y. Benmalek, F. Golemo, A. Courville, "Unsupervised Learning of Dense Visual
Representations", NeurIPS 2020 (§3). There is no official code; this file is rebuilt from the paper.

Usage
    python vader.py                                                  # demo: embedded synthetic images, CPU, minutes
    python vader.py --data /imagenet --init moco_v2_800ep_pretrain.pth.tar              # one GPU (or CPU)
    torchrun --nproc_per_node=4 vader.py --data /imagenet --init moco_v2_800ep_pretrain.pth.tar     # the paper
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        vader.py --data /imagenet --init ...                        # two nodes (--node_rank 1 on the other)
    srun python vader.py --data /imagenet --init ...               # SLURM, without torchrun (README: sbatch)
--batch-size is global. Re-running the same command resumes from <output-dir>/checkpoint.pth.

The paper, and the name that computes it
    views: MoCo v2 crops + flips with boxes kept; colour ops on the device     -> PairedViews, common.apply_appearance
    correspondence: a view-1 cell centre -> the view-2 cell covering it       -> PairedViews.match
    f, g: ResNet-50 + FPN + Panoptic FPN's semantic merge -> 128 x S/4 x S/4  -> VADeRNet, SemanticFPNDecoder
    dictionary of 65,536 pixel embeddings of g                                -> PixelQueue
    Eq. 2: -log exp(c(q, k+)) / sum exp(c(q, k)), c = cos / tau, tau = 0.07   -> vader_loss
    g <- 0.999 g + 0.001 f; shuffle BN (MoCo)                                 -> vader_step, key_embeddings
    loss x 10, SGD, lr 3e-7 (encoder) / 3e-3 (decoder), batch 128             -> train
Ablations (Table 3's --matching; the reviewers' --in-image-negatives, --key-encoder shared, --objective global |
crops, --keys-per-image; --lr-schedule cosine) are at the bottom of the file, each a class or function of its own,
chosen by the table in ablation_parts. The notes at the very end give the choices the paper leaves open.

To copy (piece -> the pieces of this file it calls; then, after "common:", what it needs from common.py)
    PairedViews  -> cell_centres, locate_in_view; common: Box, sample_crop_box, crop_resize, cell_axes,
        draw_appearance
    VADeRNet     -> SemanticFPNDecoder; common: RESNETS, resnet, resnet_channels, resnet_stages
    PixelQueue   -> (torch only)
    vader_loss   -> (torch only)
    vader_step   -> vader_loss, gather_cells, key_embeddings, shard_keys, exchange, host_index, match_top1;
        common: apply_appearance, APPEARANCE, colour_jitter, shift_hue, grey, GREY, gaussian_blur, BLUR_TAPS,
        imagenet_constants, IMAGENET_MEAN, IMAGENET_STD, ema_update, distributed, all_gather_cat
The views take a PIL image and hand over uint8 pixels with their appearance parameters; vader_step colours and
normalises them on the device. The common.py names are plain functions and constants: copy them with its imports
(numpy, torch, torchvision, PIL).
"""
import argparse
import copy
import functools
import math
import os
import random
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import FeaturePyramidNetwork
from torchvision.transforms.functional import pil_to_tensor

import common

# ---- arguments ----
DEMO_PRESET = dict(  # without --data: a CPU-sized run on the embedded dead-leaves images, from scratch with MoCo
    # v2's update (lr 0.03, weight decay 1e-4, loss weight 1: see the notes, "from scratch")
    arch="resnet18", image_size=64, batch_size=32, epochs=5, queue_size=8192, lr_encoder=0.03, lr_decoder=0.03,
    loss_weight=1.0, save_every=100, log_every=10, workers=0, output_dir="runs/vader-demo",
)
MIN_SCRATCH_LR = 1e-4  # an encoder lr below this leaves a random encoder random (the paper's 3e-7 is for MoCo v2's)


def get_parser():
    p = argparse.ArgumentParser(description="VADeR pre-training (pixel-level MoCo).", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="folder of images (any tree); omit it for the embedded demo")
    p.add_argument("--output-dir", default="runs/vader", help="checkpoint.pth, log.jsonl, result.json, features.png")
    p.add_argument("--arch", default="resnet50", choices=common.RESNETS, help="torchvision ResNet")
    p.add_argument("--image-size", type=int, default=224, help="view size S, a multiple of 32; the output is S/4")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (images), split over the ranks")
    p.add_argument("--epochs", type=int, default=600, help="passes over the data (600 x 10k steps: the paper's 6M)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps (0: no limit)")
    p.add_argument("--save-minutes", type=float, default=30, help="checkpoint every N minutes (rank 0's clock); also "
                   "at each epoch's end, at the end and on SIGTERM or SIGUSR1")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: off)")
    p.add_argument("--log-every", type=int, default=50, help="one log.jsonl line every N steps")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per rank")
    p.add_argument("--seed", type=int, default=0, help="initialisation (the same on every rank) and views")
    p.add_argument("--init", default=None, help="encoder weights: ours or a format in common.WEIGHT_FORMATS")
    p.add_argument("--resume", default="auto", help="auto (<output-dir>/checkpoint.pth), never, or a checkpoint path")
    p.add_argument("--queue-size", type=int, default=65536, help="negatives K in the queue")
    p.add_argument("--num-matches", type=int, default=32, help="matched cell pairs (positives) per image")
    p.add_argument("--temperature", type=float, default=None, help="tau of c = cos / tau (default 0.07; 0.2 for "
                   "--objective global/crops, MoCo v2's)")
    p.add_argument("--momentum", type=float, default=0.999, help="momentum of g")
    p.add_argument("--lr-encoder", type=float, default=3e-7, help="SGD lr of the ResNet (MoCo v2-initialised)")
    p.add_argument("--lr-decoder", type=float, default=3e-3, help="SGD lr of the FPN and the decoder")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--loss-weight", type=float, default=None, help="Eq. 2 is multiplied by this (default 10; 1 for "
                   "--objective global/crops, MoCo v2's)")
    p.add_argument("--embedding-dim", type=int, default=128, help="d, the per-pixel embedding size")
    p.add_argument("--shuffle-bn-splits", type=int, default=4, help="one process: g's BN sub-batches (shuffle BN)")
    p.add_argument("--precision", default="auto", choices=common.PRECISIONS, help=common.PRECISION_HELP)
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="NHWC (auto: on a GPU)")
    p.add_argument("--deterministic", action="store_true", help="deterministic GPU algorithms where PyTorch has them")
    p.add_argument("--synthetic-images", type=int, default=2048, help="size of the embedded data set (no --data)")
    a = p.add_argument_group("ablations (the bottom of the file)")
    a.add_argument("--matching", default="diff-view", choices=list(VIEWS), help="Table 3's positives")
    a.add_argument("--in-image-negatives", action="store_true", help="also contrast with the image's other pixels")
    a.add_argument("--negative-radius", type=float, default=0.0, help="in-image negatives lie farther than R px")
    a.add_argument("--key-encoder", default="momentum", choices=["momentum", "shared"], help="shared: no g, no queue")
    a.add_argument("--objective", default="dense", choices=["dense", "global", "crops"], help="global: MoCo v2")
    a.add_argument("--crop-regions", type=int, default=2, help="--objective crops: R x R regions an image")
    a.add_argument("--keys-per-image", type=int, default=None, help="enqueue K of each image's matched keys")
    a.add_argument("--lr-schedule", default="constant", choices=list(SCHEDULES), help="constant or MoCo v2's cosine")
    return p


# ---- views ----
def cell_centres(box, flip, grid):
    """Original-image (x, y) of the centres of a view's grid x grid cells, row-major: grid^2 x 2 (float64).
    Needs common.cell_axes."""
    xs, ys = common.cell_axes(box, flip, grid)
    xx, yy = np.meshgrid(xs, ys)  # grid x grid: rows of the view, then columns
    return torch.from_numpy(np.stack([xx.reshape(-1), yy.reshape(-1)], 1))


def locate_in_view(points, box, flip, grid):
    """Row-major index of the cell of a view's grid that covers each original-image point, and whether it is inside."""
    u = (points[:, 0] - box.x0) / box.width * grid
    v = (points[:, 1] - box.y0) / box.height * grid
    if flip:
        u = grid - u
    inside = (u >= 0) & (u < grid) & (v >= 0) & (v < grid)
    col, row = u.floor().clamp(0, grid - 1).long(), v.floor().clamp(0, grid - 1).long()
    return row * grid + col, inside


class PairedViews:
    """A PIL image (any mode; converted to RGB) -> (view1, view2, matches, appearance), all tensors: two uint8 views
    and the cells of their output grids that see the same point of the original image (§3.2).

    The geometry (RandomResizedCrop box + horizontal flip) is drawn first and applied here, in the loader's workers;
    view1 and view2 are uint8 3 x S x S. MoCo v2's appearance ops (colour jitter 0.4/0.4/0.4/0.1 with p 0.8,
    grayscale p 0.2, Gaussian blur sigma 0.1-2 with p 0.5) never move pixels: their parameters are drawn here too,
    from the same `rng`, as `appearance` (2 x 12, one row per view), and common.apply_appearance applies them on the
    training device, batched. `matches` is a LongTensor M x 4: row-major cell indices into the (S/4) x (S/4) grids of
    view 1 and view 2, then the original-image pixel (x, y), rounded, that the pair sees.
    The training step takes them as they are: vader_step normalises on the device.
    Needs common.sample_crop_box, Box, crop_resize, cell_axes (through cell_centres) and draw_appearance.
    """

    def __init__(self, image_size=224, num_matches=32, scale=(0.2, 1.0), stride=4, max_tries=10):
        if image_size < stride or image_size % stride:
            raise ValueError(f"image_size {image_size} must be a positive multiple of the output stride {stride}")
        self.size, self.num_matches, self.scale, self.grid = image_size, num_matches, scale, image_size // stride
        self.max_tries = max_tries
        if not 1 <= num_matches <= self.grid**2:
            raise ValueError(f"num_matches {num_matches}: expected 1 to the {self.grid}x{self.grid} cells of a view")

    def match(self, rng, width, height):
        """Draw both views' geometry; returns (box1, flip1, box2, flip2, matches M x 4)."""
        box1, flip1 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
        centres = cell_centres(box1, flip1, self.grid)  # G*G x 2: original-image (x, y) of view-1 cells
        box2, flip2, cells2, inside = self.second_view(rng, width, height, box1, flip1, centres)
        cells1 = torch.tensor(rng.sample(inside.nonzero().flatten().tolist(), self.num_matches))  # M
        pairs = self.pair(rng, cells1, cells2)  # M x 2
        position = centres[pairs[:, 0]].round().long()  # M x 2
        return box1, flip1, box2, flip2, torch.cat([pairs, position], 1)

    def second_view(self, rng, width, height, box1, flip1, centres):
        """View 2 is redrawn (up to max_tries) until >= num_matches view-1 cell centres fall inside it; then it takes
        view 1's box with a new flip, which always matches. Returns (box2, flip2, cell of each centre, inside)."""
        for _ in range(self.max_tries):
            box2, flip2 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
            cells2, inside = locate_in_view(centres, box2, flip2, self.grid)
            if int(inside.sum()) >= self.num_matches:
                return box2, flip2, cells2, inside
        box2, flip2 = box1, rng.random() < 0.5
        return (box2, flip2, *locate_in_view(centres, box2, flip2, self.grid))

    def pair(self, rng, cells1, cells2):
        return torch.stack([cells1, cells2[cells1]], 1)  # M x 2: each cell with the view-2 cell that sees its centre

    def appearance(self, rng):
        return common.draw_appearance(rng, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5)

    def __call__(self, img, rng=None):
        if not isinstance(img, Image.Image):
            raise TypeError(f"PairedViews takes a PIL image, not {type(img).__name__} (common.load_image reads one)")
        rng = rng or random.Random()
        box1, flip1, box2, flip2, matches = self.match(rng, *img.size)
        img = img if img.mode == "RGB" else img.convert("RGB")
        view1, view2 = (pil_to_tensor(common.crop_resize(img, box, self.size, flip))
                        for box, flip in ((box1, flip1), (box2, flip2)))
        return view1, view2, matches, torch.stack([self.appearance(rng), self.appearance(rng)])


# ---- model ----
class SemanticFPNDecoder(nn.Module):
    """Panoptic FPN's semantic branch (Kirillov et al. 2019) as VADeR §3.2 uses it: each pyramid level P_s gets
    max(1, log2(s) - 2) blocks of [3x3 conv (no bias), GroupNorm(32), ReLU, 2x bilinear upsampling while coarser
    than 1/4]; the four 1/4 maps are summed and a 1x1 conv gives the embedding."""

    def __init__(self, in_channels=256, channels=128, out_dim=128, strides=(4, 8, 16, 32)):
        super().__init__()
        self.levels = nn.ModuleList()
        for stride in strides:
            blocks = []
            for i in range(max(1, int(math.log2(stride)) - 2)):
                blocks += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                           nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
                if stride > 4:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.levels.append(nn.Sequential(*blocks))
        self.predictor = nn.Conv2d(channels, out_dim, 1)  # PyTorch's default init: see the notes (decoder init)
        for m in self.levels.modules():  # Detectron2's initialisation of the blocks
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, pyramid):  # pyramid: [P2 (N x 256 x S/4 x S/4), P3, P4, P5]
        return self.predictor(sum(level(p) for level, p in zip(self.levels, pyramid)))  # N x out_dim x S/4 x S/4


class VADeRNet(nn.Module):
    """f (and g): ResNet encoder -> FPN over C2..C5 (256 ch) -> semantic merge -> N x dim x S/4 x S/4.

    `encoder` keeps torchvision's ResNet names, so MoCo and torchvision weights load into it directly. `fpn_norm`
    (e.g. nn.BatchNorm2d) adds normalisation to the FPN layers, as the fine-tuning protocol of §4.2 does. Needs
    common.resnet (with RESNETS), resnet_channels and resnet_stages (a torchvision ResNet and its C2..C5).
    """

    def __init__(self, arch="resnet50", dim=128, fpn_norm=None):
        super().__init__()
        self.encoder = common.resnet(arch)
        self.fpn = FeaturePyramidNetwork(common.resnet_channels(arch), 256, norm_layer=fpn_norm)
        self.decoder = SemanticFPNDecoder(256, 128, dim)
        self.out_channels = dim

    @classmethod
    def from_args(cls, args):
        """The f that a vader.py run with these saved arguments trained, or None for the image-level objectives
        (global, crops), which train no dense head: evaluations then probe their `encoder.*`."""
        if args.get("objective", "dense") != "dense":
            return None
        return cls(args["arch"], args.get("embedding_dim", 128))

    def forward(self, x):  # x: N x 3 x H x W
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % 32, -w % 32  # the 2x upsampling chain needs sides that are multiples of 32
        if pad_h or pad_w:  # (evaluation frames, e.g. DAVIS 854 x 480): pad, then crop the output back
            x = F.pad(x, (0, pad_w, 0, pad_h))
        c2, c3, c4, c5 = common.resnet_stages(self.encoder, x)
        pyramid = self.fpn(OrderedDict(c2=c2, c3=c3, c4=c4, c5=c5))
        out = self.decoder(list(pyramid.values()))  # N x dim x (H+pad)/4 x (W+pad)/4
        return out[:, :, : -(-h // 4), : -(-w // 4)]  # N x dim x ceil(H/4) x ceil(W/4)


# ---- queue ----
class PixelQueue(nn.Module):
    """MoCo's dictionary of negatives, holding pixel embeddings of g: a ring buffer of `size` unit vectors.

    Buffers, so the queue and its pointer are checkpointed. `enqueue` takes the keys of the whole global batch
    (key_embeddings gathers them once), so every rank holds the same queue. The pointer moves on the device: the
    step never waits to read it.
    """

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # K x d
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):  # keys: the global batch's P x d, the same on every rank
        n, size = keys.shape[0], self.keys.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the {n} keys enqueued per step")
        index = self.ptr + torch.arange(n, device=keys.device)  # n; never wraps, as size is a multiple of n
        self.keys.index_copy_(0, index, keys.to(self.keys.dtype))
        self.ptr.add_(n).remainder_(size)


# ---- loss ----
def vader_loss(q, k, queue, temperature):
    """Eq. 2, averaged over the positives: -log exp(c(q, k)) / (exp(c(q, k)) + sum_{u in queue} exp(c(q, u))).

    q: P x d, f's embeddings at the matched cells of view 1; k: P x d, g's embeddings at their matches in view 2;
    queue: K x d. The caller's side of the contract:
      - q, k and the queue's rows are unit vectors, so that q.k is the cosine (gather_cells and PixelQueue make them
        so; an unnormalised q scales every logit: norm 5 turns a loss of 8.4 into 33.7). Not checked: reading a norm
        would make the step wait for the device;
      - k carries no gradient: g is moved by EMA (ema_update), never by this loss. Checked;
      - the shapes agree. Checked.
    Computed in fp32 whatever the inputs' dtype (a bf16 step's q, a bf16 queue), outside autocast; fp32 inputs are
    used as they are. Imports only torch.
    """
    if q.dim() != 2 or q.shape != k.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"vader_loss: q and k must be P x d and the queue K x d; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, queue {tuple(queue.shape)}")
    if k.requires_grad:
        raise ValueError("vader_loss: k must carry no gradient (compute g's keys under torch.no_grad())")
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()  # no copy for fp32 inputs: the same bits as before
        q = q / temperature  # c(q, .) = cos / tau: dividing the P x d queries saves two passes over P x (1 + K)
        l_pos = (q * k).sum(1, keepdim=True)  # P x 1
        l_neg = q @ queue.t()  # P x K
        logits = torch.cat([l_pos, l_neg], 1)  # P x (1 + K): the positive is class 0
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


# ---- step ----
def gather_cells(z, cells):
    """z: N x d x H x W, cells: N x M row-major indices -> the L2-normalised embeddings N x M x d."""
    z = z.flatten(2)  # N x d x HW
    picked = torch.gather(z, 2, cells.unsqueeze(1).expand(-1, z.shape[1], -1))  # N x d x M
    return F.normalize(picked.transpose(1, 2).float(), dim=2)


@torch.no_grad()
def key_embeddings(g, view2, appearance2, cells2, splits=4, seed="", memory_format=torch.contiguous_format):
    """g's normalised embeddings at `cells2` (N x M) of view 2, with MoCo's shuffle BN: (this rank's keys N x M x d,
    the global batch's keys N_global x M x d in rank order, gathered once: what the queue takes).

    view2: uint8 N x 3 x S x S with its appearance parameters (N x 12, PairedViews). A permutation of the global
    batch, drawn from `seed` (the same on every rank and new every step, so no rank has to send it), cuts it into
    shards, and g runs each shard as one batch, so BN statistics never pair a key with its own query's batch. Under
    DDP, shard r runs on rank r: only the uint8 views that change rank travel (one all_to_all, with their
    appearance parameters and cells), the appearance ops run after the exchange, and only the keys come back. In one
    process, `splits` shards emulate it, as MoCo's single-GPU SplitBatchNorm does (sizes differ by at most one;
    1: plain BN over the batch; the default 4 is the paper's 4 GPUs, as vader_step's and --shuffle-bn-splits').
    Needs common.distributed, all_gather_cat and apply_appearance (through shard_keys, with APPEARANCE, colour_jitter,
    shift_hue, grey, GREY, gaussian_blur, BLUR_TAPS, imagenet_constants, IMAGENET_MEAN, IMAGENET_STD).
    """
    world, rank = (dist.get_world_size(), dist.get_rank()) if common.distributed() else (1, 0)
    if world == 1 and splits <= 1:  # plain BN over the batch
        keys = shard_keys(g, view2, appearance2, cells2, memory_format)
        return keys, keys
    n = len(view2)
    order = list(range(n * world))
    random.Random(seed).shuffle(order)
    if world == 1:
        splits = max(1, min(splits, n))
        shards = [order[i * n // splits:(i + 1) * n // splits] for i in range(splits)]
        parts = [[x[host_index(shard, x.device)] for x in (view2, appearance2, cells2)] for shard in shards]
        keys = torch.cat([shard_keys(g, *part, memory_format) for part in parts])
        arrival = [i for shard in shards for i in shard]  # the global index of each row of `keys`
    else:
        shards = [order[r * n:(r + 1) * n] for r in range(world)]
        mine = exchange([view2, appearance2, cells2], shards, rank)
        keys = common.all_gather_cat(shard_keys(g, *mine, memory_format))  # rank by rank, each in arrival order
        arrival = [i for shard in shards for source in range(world) for i in shard if i // n == source]
    position = [0] * len(arrival)
    for row, i in enumerate(arrival):
        position[i] = row
    keys = keys[host_index(position, keys.device)]  # N_global x M x d, back in the global batch's order
    return keys[rank * n:(rank + 1) * n], keys


def shard_keys(g, images, appearance, cells, memory_format=torch.contiguous_format):
    """g's normalised embeddings at `cells` of a shard of uint8 views, its BN statistics the shard's own.
    Needs common.apply_appearance (with APPEARANCE, colour_jitter, shift_hue, grey, GREY, gaussian_blur, BLUR_TAPS,
    imagenet_constants, IMAGENET_MEAN, IMAGENET_STD)."""
    return gather_cells(g(common.apply_appearance(images, appearance, memory_format)), cells)


def exchange(tensors, shards, rank):
    """Shuffle BN's exchange: every rank sends the rows of `tensors` (the same N first, e.g. the uint8 views, their
    appearance and cells) that shard r holds to rank r, in one all_to_all of their bytes. Returns the rows of this
    rank's shard, grouped by the rank they came from, each group in the shard's order."""
    world, n = len(shards), len(tensors[0])
    send = [[i - rank * n for i in shard if i // n == rank] for shard in shards]  # my rows, shard by shard
    received = [sum(1 for i in shards[rank] if i // n == source) for source in range(world)]
    rows = [t[host_index([i for part in send for i in part], t.device)].flatten(1) for t in tensors]
    widths = [r.shape[1] * r.element_size() for r in rows]
    packed = torch.cat([r.contiguous().view(torch.uint8) for r in rows], 1)  # N x bytes per row
    out = packed.new_empty(sum(received), packed.shape[1])
    dist.all_to_all_single(out, packed, received, [len(part) for part in send])
    return [part.contiguous().view(t.dtype).view(-1, *t.shape[1:])
            for part, t in zip(out.split(widths, 1), tensors)]


def host_index(values, device):
    """A list of indices as a tensor on `device`, copied from pinned memory on a GPU: a copy from ordinary host
    memory would wait for the device."""
    index = torch.tensor(values, dtype=torch.long)
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index


def vader_step(model, g, queue, view1, view2, matches, appearance, temperature=0.07, momentum=0.999, bn_splits=4,
               shuffle_seed="", memory_format=torch.contiguous_format):
    """The forward half of a training step (§3.2): Eq. 2 on a batch, the global batch's keys, to enqueue after the
    update, and match_top1 (what Eq. 2 trains, watched as training goes; a device scalar).

    model: f (VADeRNet), or f in DDP; g: its momentum copy; queue: a PixelQueue. On the device, PairedViews'
    batch as the loader stacks it: view1, view2 uint8 N x 3 x S x S (raw pixels: they are coloured and
    ImageNet-normalised here, by common.apply_appearance), matches int64 N x M x 4 and `appearance` float32
    N x 2 x 12. `shuffle_seed`: the same on every rank, new every step (shuffle BN's permutation). Returns (loss,
    N_global x M x d keys, top-1). Needs common.apply_appearance (with APPEARANCE, colour_jitter, shift_hue, grey,
    GREY, gaussian_blur, BLUR_TAPS, imagenet_constants, IMAGENET_MEAN, IMAGENET_STD), ema_update, and through
    key_embeddings distributed and all_gather_cat.
    """
    f = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    x1 = common.apply_appearance(view1, appearance[:, 0], memory_format)  # N x 3 x S x S, normalised
    q = gather_cells(model(x1), matches[:, :, 0])  # N x M x d: f's embeddings of the matched view-1 cells
    common.ema_update(g, f, momentum, copy_buffers=False)  # MoCo: g moves towards f, then computes the keys
    k, keys = key_embeddings(g, view2, appearance[:, 1], matches[:, :, 1], bn_splits, shuffle_seed, memory_format)
    loss = vader_loss(q.flatten(0, 1), k.flatten(0, 1), queue.keys, temperature)
    return loss, keys, match_top1(q, k, matches[:, :, 1])


@torch.no_grad()
def match_top1(q, k, cells2):
    """A cheap correspondence accuracy: the fraction of matched queries whose most similar key, among their image's
    M matched keys, sees their own view-2 cell (cells2: N x M; two of the M may share one). Chance is about 1/M: on
    ties the first key wins, so constant features score chance. q, k: N x M x d."""
    best = torch.bmm(q.float(), k.float().transpose(1, 2)).argmax(2)  # N x M: the most similar key of each query
    return (cells2.gather(1, best) == cells2).float().mean()  # a device scalar: read with the loss, not here


# ---- training ----
def train(args):
    d = common.init_distributed(args.deterministic)
    check_args(args, d)
    common.seed_all(args.seed)  # the same initialisation on every rank

    # the paper's views, networks and step; an ablation switch replaces some of them (ablation_parts, at the bottom)
    memory_format = common.memory_format(d.device, args.channels_last)
    eq2_step = functools.partial(vader_step, temperature=args.temperature, momentum=args.momentum,
                                 bn_splits=args.shuffle_bn_splits, memory_format=memory_format)
    parts = dict(views=PairedViews(args.image_size, args.num_matches), network=VADeRNet, key_encoder=momentum_copy,
                 queue=PixelQueue, step=eq2_step, negatives=args.queue_size)
    parts.update(ablation_parts(args, memory_format))
    dataset = common.ViewDataset(args.data, parts["views"], args.seed, args.synthetic_images)
    per_rank = args.batch_size // d.world_size
    sampler, loader = common.make_loader(dataset, d, per_rank, args.workers, args.seed)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise common.UserError(f"--data {args.data}: {len(dataset)} images are fewer than one batch per rank "
                               f"({per_rank})")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    f = parts["network"](args.arch, args.embedding_dim)
    if args.init:
        kind = load_init(f, args.init, args.objective)
        if d.is_main:
            print(f"init: encoder from {kind} weights {args.init}", flush=True)
    g, queue = parts["key_encoder"](f), parts["queue"](args.queue_size, args.embedding_dim)
    f, g = f.to(d.device, memory_format=memory_format), g.to(d.device, memory_format=memory_format)
    queue = queue.to(d.device)
    decoder = [p for name, p in f.named_parameters() if not name.startswith("encoder.")]  # FPN + decoder (or a head)
    groups = [dict(params=f.encoder.parameters(), lr=args.lr_encoder), dict(params=decoder, lr=args.lr_decoder)]
    optimizer = torch.optim.SGD(groups, lr=args.lr_decoder, momentum=args.sgd_momentum, weight_decay=args.weight_decay)
    scaler = common.grad_scaler(d.device, args.precision)

    run = common.TrainingRun("vader", args, d, dataset, dict(model=f, momentum_encoder=g, queue=queue,
                             optimizer=optimizer, scaler=scaler), may_change={"lr_encoder", "lr_decoder"},
                             remedy="Lower --lr-decoder/--lr-encoder or use --precision fp32")
    step = run.resume()
    model = common.wrap_ddp(f, d, [(2, 3, args.image_size, args.image_size)], memory_format, args.precision)
    keys_per_image, matches_per_image = args.keys_per_image or parts["views"].num_matches, parts["views"].num_matches
    run.start(step, total_steps, f"VADeR: {args.arch}, {d.world_size} rank(s) x {per_rank} images, device {d.device}",
              per_rank_batch=per_rank, steps_per_epoch=steps_per_epoch,
              global_keys_per_step=args.batch_size * keys_per_image * (args.key_encoder == "momentum"),
              chance_loss=args.loss_weight * math.log(1 + parts["negatives"]), match_chance=1 / matches_per_image)
    f.train(), g.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=(step % steps_per_epoch) * per_rank)
        dataset.set_epoch(epoch)
        for batch in loader:  # uint8 views and their appearance parameters (PairedViews), pinned on a GPU
            view1, view2, matches, appearance, skipped = (x.to(d.device, non_blocking=True) for x in batch)
            with common.autocast(d.device, args.precision):
                loss, keys, top1 = parts["step"](model, g, queue, view1, view2, matches, appearance,
                                                 shuffle_seed=f"{args.seed}/{step}")  # vader_step: Eq. 2
            loss = args.loss_weight * loss  # the paper multiplies Eq. 2 by 10
            lr_encoder, lr_decoder = set_learning_rates(optimizer, args, step, steps_per_epoch)
            values = run.read_step(step, loss, skipped, match_top1=top1)  # a non-finite loss stops the run here

            optimizer.zero_grad(set_to_none=True)  # the optimisation step
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            queue.enqueue(keys[:, :keys_per_image].flatten(0, 1))  # after the update, as MoCo
            step += 1

            run.step_done(step, epoch, values, args.batch_size, postfix=dict(lr=f"{lr_decoder:.1e}"),
                          lr_encoder=lr_encoder, lr_decoder=lr_decoder)
            if step >= total_steps:
                break
        run.end_epoch(epoch, step, f)
    return run.finish(step, steps_per_epoch, args.data is None and functools.partial(demo_message, args))


def load_init(f, path, objective="dense"):
    """--init: a vader.py checkpoint of the same objective fills f; any other weights fill its ResNet encoder."""
    kind, state, meta = common.read_weights(path)
    if kind == "vader" and meta["args"].get("objective", "dense") == objective:
        f.load_state_dict(state)
    else:
        common.load_resnet_state(f.encoder, common.encoder_state(state) if kind in ("vader", "clove") else state, path)
    return kind


def momentum_copy(f):
    """g: a copy of f that takes no gradient (it moves by the momentum update)."""
    return copy.deepcopy(f).requires_grad_(False)


def set_learning_rates(optimizer, args, step, steps_per_epoch):
    """The encoder's and the decoder's lr at `step`: constant (the paper names no schedule), or --lr-schedule's."""
    factor = SCHEDULES[args.lr_schedule](step, args.epochs * steps_per_epoch)
    for group, base in zip(optimizer.param_groups, (args.lr_encoder, args.lr_decoder)):
        group["lr"] = base * factor
    return [group["lr"] for group in optimizer.param_groups]


def demo_message(args, result):
    chance = args.loss_weight * math.log(1 + args.queue_size)
    return (f"Trained VADeR ({args.arch}, {args.image_size}px views) on synthetic dead leaves for {result['steps']} "
            f"steps in {result['seconds']} s; loss {result['first_loss']:.2f} -> {result['final_loss']:.2f} (the "
            f"queue starts as random vectors, so the first steps are easy; with real keys in it, chance is "
            f"{args.loss_weight:g} x ln(1 + K) = {chance:.1f}). Pictures: {args.output_dir}/features.png and "
            f"curves.png; probe the checkpoint with `python evaluate_linear.py --weights {result['checkpoint']}`.")


def check_args(args, d):
    """Every flag checked before any work: a one-line error naming it."""
    if args.data is not None and not os.path.isdir(args.data):  # paths first
        raise common.UserError(f"--data {args.data}: no such folder; point it at a folder of images")
    if args.init and not os.path.isfile(args.init):
        raise common.UserError(f"--init {args.init}: no such weights file")
    common.autocast_dtype(d.device, args.precision)  # fp16 on a CPU: a one-line error now, not mid-run
    if args.image_size % 32:
        raise common.UserError(f"--image-size {args.image_size}: must be a multiple of 32 (the FPN's coarsest stride)")
    if args.batch_size % d.world_size:
        raise common.UserError(f"--batch-size {args.batch_size}: the global batch must split evenly over "
                               f"{d.world_size} ranks")
    if args.num_matches > (args.image_size // 4) ** 2:
        raise common.UserError(f"--num-matches {args.num_matches}: more than the {(args.image_size // 4) ** 2} cells")
    if args.data is not None and not args.init and args.lr_encoder < MIN_SCRATCH_LR:
        raise common.UserError(
            f"--lr-encoder {args.lr_encoder:g} with --data and no --init: the encoder starts random and this lr "
            "leaves it random (the paper's 3e-7 fine-tunes a MoCo v2 encoder); pass --init "
            "moco_v2_800ep_pretrain.pth.tar (the paper's start) or train from scratch with MoCo v2's update, "
            "--lr-encoder 0.03 --lr-decoder 0.03 --loss-weight 1")
    check_ablation_args(args)


def parse_args(argv=None):
    """The command line, with the demo preset (no --data) and the defaults that depend on other flags filled in
    once, so that the checkpoint records the values used."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        common.apply_preset(parser, args, DEMO_PRESET, argv, announce="embedded synthetic data")
    if args.temperature is None:
        args.temperature = TEMPERATURES[args.objective]
    if args.loss_weight is None:
        args.loss_weight = LOSS_WEIGHTS[args.objective]
    return args


def main(argv=None):
    train(parse_args(argv))


# ---- ablations ----
# Table 3 (--matching), the reviewers' questions (--in-image-negatives, --negative-radius, --key-encoder shared,
# --objective global | crops, --keys-per-image) and --lr-schedule cosine. Each replaces one part of the paper's
# run: ablation_parts is the table that says which.
def ablation_parts(args, memory_format=torch.contiguous_format):
    """The parts of train()'s run that the ablation switches replace: {} for the paper's setting."""
    parts = {}
    if args.objective == "dense":
        parts["views"] = VIEWS[args.matching](args.image_size, args.num_matches)
    else:  # MoCo v2 itself: one embedding per image, as a 1 x 1 "map" with one match
        parts.update(views=TwoCrops(args.image_size) if args.objective == "global" else
                     RegionCrops(args.image_size, regions=args.crop_regions), network=GlobalNet)
    if args.in_image_negatives and args.key_encoder == "momentum":
        parts["step"] = functools.partial(in_image_step, temperature=args.temperature, momentum=args.momentum,
                                          bn_splits=args.shuffle_bn_splits, radius=args.negative_radius,
                                          memory_format=memory_format)
        parts["negatives"] = args.queue_size + args.num_matches - 1
    if args.key_encoder == "shared":
        parts.update(key_encoder=lambda f: nn.Module(), queue=lambda *_: NoQueue(),
                     step=functools.partial(shared_step, temperature=args.temperature, in_image=args.in_image_negatives,
                                            radius=args.negative_radius, memory_format=memory_format),
                     negatives=2 * args.batch_size * args.num_matches - 2)
    return parts


def check_ablation_args(args):
    keys_per_image = 1 if args.objective != "dense" else args.keys_per_image or args.num_matches
    keys_per_step = args.batch_size * keys_per_image
    if args.key_encoder == "momentum" and args.queue_size % keys_per_step:
        raise common.UserError(f"--queue-size {args.queue_size}: must be a multiple of the {keys_per_step} keys "
                               "enqueued per step (--batch-size x --keys-per-image; x 1 for --objective global/crops)")
    if args.negative_radius and not args.in_image_negatives:
        raise common.UserError(f"--negative-radius {args.negative_radius:g}: applies to in-image negatives; "
                               "add --in-image-negatives")
    if args.negative_radius < 0:
        raise common.UserError(f"--negative-radius {args.negative_radius:g}: must be >= 0 (original-image pixels)")
    if args.objective != "dense" and (args.key_encoder != "momentum" or args.in_image_negatives
                                      or args.matching != "diff-view" or args.keys_per_image is not None):
        raise common.UserError(f"--objective {args.objective}: image-level MoCo v2; --key-encoder shared, "
                               "--in-image-negatives, --matching and --keys-per-image apply to --objective dense")
    if args.keys_per_image is not None and not 1 <= args.keys_per_image <= args.num_matches:
        raise common.UserError(f"--keys-per-image {args.keys_per_image}: must be 1 .. --num-matches "
                               f"({args.num_matches})")
    if args.key_encoder == "shared" and args.keys_per_image is not None:
        raise common.UserError("--keys-per-image: --key-encoder shared has no queue")
    if args.crop_regions < 1 or args.shuffle_bn_splits < 1:
        raise common.UserError("--crop-regions and --shuffle-bn-splits must be >= 1")


TEMPERATURES = {"dense": 0.07, "global": 0.2, "crops": 0.2}  # VADeR §3.2; MoCo v2's for the image-level objectives
LOSS_WEIGHTS = {"dense": 10.0, "global": 1.0, "crops": 1.0}  # VADeR §3.2; MoCo v2 weights its loss by 1
SCHEDULES = {"constant": lambda step, total: 1.0,  # the paper names no schedule
             "cosine": lambda step, total: common.cosine(step, total, 1.0, 0.0)}  # MoCo v2's, per step over --epochs


class SameViewPairs(PairedViews):
    """Table 3, "same view": view 2 is view 1's crop and flip (other colours), and each cell is its own match."""

    def second_view(self, rng, width, height, box1, flip1, centres):
        return box1, flip1, torch.arange(self.grid**2), torch.ones(self.grid**2, dtype=torch.bool)


class UnmatchedPairs(PairedViews):
    """Table 3, "unmatch": the positives are random pairs of cells, ignoring the correspondence."""

    def pair(self, rng, cells1, cells2):
        cells = self.grid**2
        return torch.tensor([[rng.randrange(cells), rng.randrange(cells)] for _ in range(self.num_matches)])


VIEWS = {"diff-view": PairedViews, "same-view": SameViewPairs, "unmatch": UnmatchedPairs}  # Table 3, --matching


class TwoCrops(PairedViews):
    """MoCo v2's views for --objective global: two independent crops, no overlap required; one dummy match per
    image (cell 0 of each 1 x 1 map)."""

    def __init__(self, image_size=224, scale=(0.2, 1.0)):
        super().__init__(image_size, 1, scale, stride=image_size)

    def match(self, rng, width, height):
        box1, flip1 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
        box2, flip2 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
        return box1, flip1, box2, flip2, torch.zeros(1, 4, dtype=torch.long)


class RegionCrops(TwoCrops):
    """Reviewer 3's baseline (--objective crops): each image is cut into R x R non-overlapping regions, each an
    instance of an expanded data set; both views are MoCo v2 crops of one region drawn at random."""

    def __init__(self, image_size=224, regions=2, scale=(0.2, 1.0)):
        super().__init__(image_size, scale)
        self.regions = regions

    def __call__(self, img, rng=None):
        rng = rng or random.Random()
        if self.regions == 1:
            return super().__call__(img, rng)
        row, col = divmod(rng.randrange(self.regions**2), self.regions)
        xs = [round(i * img.width / self.regions) for i in range(self.regions + 1)]
        ys = [round(i * img.height / self.regions) for i in range(self.regions + 1)]
        return super().__call__(img.crop((xs[col], ys[row], xs[col + 1], ys[row + 1])), rng)


class GlobalNet(nn.Module):
    """MoCo v2's f for --objective global and crops: ResNet -> C5 average-pooled -> MLP head (Linear C-C, ReLU,
    Linear C-dim; 2048-2048-128 for ResNet-50) -> N x dim x 1 x 1, a one-cell map, so that vader_step with one
    match per image is MoCo v2's step. `encoder` keeps torchvision's names (evaluations probe it)."""

    def __init__(self, arch="resnet50", dim=128):
        super().__init__()
        self.encoder = common.resnet(arch)
        width = common.resnet_channels(arch)[-1]
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
        self.out_channels = dim

    def feature_map(self, x):  # N x C x H/32 x W/32: the C5 map (feature pictures)
        return common.resnet_stages(self.encoder, x)[-1]

    def forward(self, x):  # x: N x 3 x H x W -> N x dim x 1 x 1
        return self.head(self.feature_map(x).mean((2, 3)))[:, :, None, None]


def in_image_negatives(matches, radius=0.0):
    """Which keys of the same image are negatives for each positive: N x M x M bool, [i, a, b] for query a, key b.

    matches: N x M x 4 (cell 1, cell 2, x, y). Key b is a negative for positive a when it comes from another view-2
    cell (a key of the positive's own view-2 cell is a copy of the positive) and, for R > 0, when the two pairs'
    original-image positions lie farther than R pixels apart (Reviewers 1 and 3).
    """
    cells2, position = matches[..., 1], matches[..., 2:].double()
    negative = cells2[:, :, None] != cells2[:, None, :]  # N x M x M, False on the diagonal too
    if radius > 0:
        negative &= torch.cdist(position, position) > radius
    return negative


def in_image_loss(q, k, queue, temperature, in_image):
    """Eq. 2 with the keys of the same image that `in_image` (N x M x M, in_image_negatives) marks as further
    negatives. q, k: P x d with P = N * M; queue: K x d."""
    with torch.autocast(q.device.type, enabled=False):
        q = q / temperature
        n, m = in_image.shape[:2]
        l_pos, l_neg = (q * k).sum(1, keepdim=True), q @ queue.t()  # P x 1, P x K (in this order: autograd sums
        same = torch.bmm(q.view(n, m, -1), k.view(n, m, -1).transpose(1, 2))  # q's gradients in creation order)
        logits = torch.cat([l_pos, l_neg, same.masked_fill(~in_image, float("-inf")).reshape(n * m, m)], 1)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def in_image_step(model, g, queue, view1, view2, matches, appearance, temperature=0.07, momentum=0.999,
                  bn_splits=4, radius=0.0, shuffle_seed="", memory_format=torch.contiguous_format):
    """vader_step with --in-image-negatives: the image's other matched pixels are negatives too (the reviewers'
    question; the paper reports that it did not work)."""
    f = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    x1 = common.apply_appearance(view1, appearance[:, 0], memory_format)
    q = gather_cells(model(x1), matches[:, :, 0])  # N x M x d
    common.ema_update(g, f, momentum, copy_buffers=False)
    k, keys = key_embeddings(g, view2, appearance[:, 1], matches[:, :, 1], bn_splits, shuffle_seed, memory_format)
    loss = in_image_loss(q.flatten(0, 1), k.flatten(0, 1), queue.keys, temperature,
                         in_image_negatives(matches, radius))
    return loss, keys, match_top1(q, k, matches[:, :, 1])


class NoQueue(nn.Module):
    """--key-encoder shared has no queue: nothing is enqueued, saved or resumed."""

    def enqueue(self, keys):
        pass


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own part (SimCLR's GatherLayer)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):  # every rank's loss depends on every part: sum the gradients, keep my slice
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def all_gather_with_grad(x):
    """Concatenate `x` over ranks (rank order); gradients flow back to each rank's own part."""
    return _GatherWithGrad.apply(x) if common.distributed() else x


def shared_loss(z1, z2, matches, temperature, in_image=False, radius=0.0):
    """--key-encoder shared: SimCLR's symmetric NT-Xent over matched pixels, with no momentum encoder and no queue.

    z1, z2: P x d, f's normalised embeddings of this rank's matched cells in view 1 and view 2 (P = N * M);
    matches: N x M x 4. Every pixel of both views of the global batch is gathered (gradients flow to the local
    part). Anchor z1_a's positive is z2_a; its negatives are the other 2G - 2 gathered pixels (G = global P),
    except the other pairs of its own image, which count only with `in_image` and then by in_image_negatives'
    rule. Symmetric: z2_a is an anchor too, with positive z1_a. In fp32, outside autocast.
    """
    with torch.autocast(z1.device.type, enabled=False):
        n, m = matches.shape[:2]
        p = n * m
        all1, all2 = all_gather_with_grad(z1), all_gather_with_grad(z2)  # G x d
        all_matches = common.all_gather_cat(matches)  # N_g x M x 4
        start = (dist.get_rank() if common.distributed() else 0) * p
        mine = torch.arange(start, start + p, device=z1.device)  # global indices of the local pairs
        image = torch.arange(len(all_matches), device=z1.device).repeat_interleave(m)  # G: image of each pair
        allowed = image[mine][:, None] != image[None, :]  # P x G: other images' pairs are negatives
        if in_image:
            same = in_image_negatives(all_matches, radius)[image[mine], (mine % m)]  # P x M: same-image rule
            rows = torch.arange(p, device=z1.device)[:, None]
            allowed[rows, image[mine][:, None] * m + torch.arange(m, device=z1.device)] = same
        losses = []
        for anchor, positive_side, same_side in ((z1, all2, all1), (z2, all1, all2)):
            to_positive_side = (anchor @ positive_side.t()).masked_fill(~allowed, float("-inf"))  # P x G
            to_positive_side[torch.arange(p), mine] = (anchor * positive_side[mine]).sum(1)  # the positive
            to_same_side = (anchor @ same_side.t()).masked_fill(~allowed, float("-inf"))  # P x G (self: own image)
            logits = torch.cat([to_positive_side, to_same_side], 1) / temperature  # P x 2G
            losses.append(F.cross_entropy(logits, mine))
        return (losses[0] + losses[1]) / 2


def shared_step(model, g, queue, view1, view2, matches, appearance, temperature=0.07, in_image=False, radius=0.0,
                shuffle_seed=None, memory_format=torch.contiguous_format):
    """--key-encoder shared (Reviewer 1: "is momentum contrast even needed"): both views through f in one batch
    (BN sees both), with gradients; shared_loss. There are no keys to enqueue, and no shuffle BN (`shuffle_seed` is
    unused)."""
    n = len(view1)
    x = common.apply_appearance(torch.cat([view1, view2]), appearance.transpose(0, 1).flatten(0, 1), memory_format)
    z = model(x)  # 2N x d x S/4 x S/4
    z1, z2 = gather_cells(z[:n], matches[:, :, 0]), gather_cells(z[n:], matches[:, :, 1])  # N x M x d
    return shared_loss(z1.flatten(0, 1), z2.flatten(0, 1), matches, temperature, in_image, radius), z2.detach(), \
        match_top1(z1, z2, matches[:, :, 1])


if __name__ == "__main__":
    common.run_main(main)

# ---- notes: choices the paper leaves open ----
# - Appearance: MoCo v2's colour jitter, grayscale and blur run batched on the training device
#   (common.apply_appearance) in torchvision's fp32 tensor arithmetic; MoCo's code runs them with PIL in the loader
#   (uint8 rounding after each op, PIL's box approximation of the Gaussian). The parameters are drawn in the loader
#   from each item's random stream, after the geometry, so the views' correspondences do not depend on them.
# - Correspondence at the output resolution: cell (i, j) of view 1's (S/4)^2 grid is matched to the view-2 cell that
#   covers its centre in the original image. The paper matches "pixels"; the loss only sees output cells.
# - A pair of views is redrawn (view 2, up to 10 times) until >= --num-matches cells match; then view 2 takes view
#   1's box with a new flip, which always matches (PairedViews.second_view).
# - The loss is MoCo v2's: asymmetric (f sees view 1, g view 2); the 32 matched keys of each image are enqueued
#   (batch 128 -> 4096 keys a step; the queue size must be a multiple of that).
# - Constant learning rates (the paper names no schedule); --epochs 600 is the paper's ~6M iterations at batch 128.
# - Shuffle BN: under DDP the global batch is shuffled over the ranks (MoCo); in one process g runs
#   --shuffle-bn-splits sub-batches (default 4, the paper's 4 GPUs), MoCo's single-GPU SplitBatchNorm. On the demo
#   (8 images a sub-batch) 1, 2 and 4 splits differ by less than their seed spread on every score (README).
# - The decoder has ~5.0M parameters for ResNet-50 (FPN 3.3M + merge head 1.6M) with torchvision's FPN; the paper
#   quotes "around 2M extra" (it counts fewer FPN convolutions).
# - Decoder init: the final 1x1 conv keeps PyTorch's default, not Detectron2's N(0, 0.001). The embedding is
#   L2-normalised, and a tiny output norm multiplied the first gradients by 1/||z|| and collapsed training.
# - From scratch (no --init) the paper's encoder lr 3e-7 would leave the encoder random, so --data without --init and
#   with an encoder lr below 1e-4 is an error. The from-scratch recipe is MoCo v2's update: lr 0.03, weight decay
#   1e-4, loss weight 1 (the demo preset's). Eq. 2 x 10 at lr 0.003 takes the same gradient step, 0.03 g, but only
#   a tenth of MoCo's weight decay (0.003 x 1e-4 p); the paper's x 10 belongs to its MoCo-initialised fine-tuning
#   (3e-7 / 3e-3 with weight decay 1e-4), which stays the default with --init.
# - --objective global is MoCo v2 on the same data and budget: two independent crops, C5 average-pooled, an MLP head
#   C5-C5-128, an image-level queue, tau 0.2 and loss weight 1, so that lr 0.03 is MoCo v2's update exactly. Its
#   ResNet stays under encoder.*, so the checkpoint evaluates like any other.
# - --objective crops is Reviewer 3's baseline in the review's words: "taking different crops from the same image
#   to get an expanded dataset, where crops from different locations of an image now become non-corresponding
#   images". One region per image per epoch keeps the budget unchanged.
# - --keys-per-image K enqueues the first K of each image's matches (they are in random order): the queue then spans
#   65536 / (128 K) steps (16 at K = 32; MoCo's 65536 / 256 = 256).
# - --key-encoder shared keeps tau and the loss weight of the dense objective; its negatives are the other matched
#   pixels of the whole global batch (gathered with gradients, SimCLR's GatherLayer).
# - Determinism: with --deterministic (no cuDNN benchmarking, torch.use_deterministic_algorithms) a GPU run is
#   repeatable except for the ops PyTorch has no deterministic CUDA kernel for: here the backward of the decoder's
#   bilinear upsampling and the cross-entropy's NLL loss (PyTorch warns). On a CPU every run is bitwise exact.
