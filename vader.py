"""VADeR: View-Agnostic Dense Representations, pixel-level momentum contrast.

Two views of an image are made by random crops and flips whose geometry is known, so every output cell of view 1
has a known matching cell in view 2. An encoder-decoder f (ResNet + FPN) embeds view 1 at 1/4 resolution and its
momentum copy g embeds view 2; for 32 matched cells per image, f's embedding must pick out g's embedding of the same
scene point among 65,536 pixel embeddings of other images kept in a queue (InfoNCE, MoCo style).

Paper: P. O. Pinheiro, A. Almahairi, R. Y. Benmalek, F. Golemo, A. Courville, "Unsupervised Learning of Dense Visual
Representations", NeurIPS 2020 (§3). There is no official code; everything here is rebuilt from the paper.

Usage
    python vader.py                                   # embedded demo: synthetic images, CPU-sized preset, < 10 min
    python vader.py --data /imagenet --init moco_v2_800ep_pretrain.pth.tar            # one GPU (or CPU)
    torchrun --nproc_per_node=4 vader.py --data /imagenet --init moco_v2_800ep_pretrain.pth.tar   # one node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 vader.py --data /imagenet --init ...              # two nodes (node_rank 1 too)
Re-running the same command resumes from <output-dir>/checkpoint.pth. --batch-size is global (split over ranks).

What the code implements, and where
    views: RandomResizedCrop(224, (0.2, 1)) + flip, boxes kept; MoCo v2 colour ops    -> PairedViews
    correspondence: view-1 cell centre -> the view-2 cell covering it (§3.2)          -> PairedViews.match
    f, g: ResNet-50 + FPN(256) + Panoptic-FPN semantic merge -> 128 x S/4 x S/4 (§3.2) -> VADeRNet
    Eq. 2 with c(x1, x2) = cos(x1, x2) / tau, negatives from a queue                  -> vader_loss, PixelQueue
    g <- 0.999 g + 0.001 f (parameters; g keeps its own BN statistics, as MoCo)      -> common.ema_update
    loss x 10, SGD(0.9), wd 1e-4, lr 3e-7 (encoder) / 3e-3 (decoder), batch 128     -> train
    shuffle BN for g under DDP (MoCo); one process: --shuffle-bn-splits sub-batches   -> key_embeddings
    Table 3 ablation: --matching diff-view (paper) | same-view | unmatch
    the reviewers' questions, each one switch away (defaults = the paper):
      --in-image-negatives --negative-radius R (Reviewers 1, 3: same-image negatives)  -> in_image_negatives
      --key-encoder shared (Reviewer 1: SimCLR-style, no momentum encoder, no queue)   -> shared_loss
      --objective global (Reviewer 2, footnote 1: MoCo v2 in this script)              -> GlobalNet, global_loss
      --objective crops (Reviewer 3: regions of an image as instances)                 -> PairedViews.region
      --keys-per-image K, --queue-size (Reviewer 1: size of the negative memory bank)  -> dense_momentum_loss
      --lr-schedule cosine (MoCo v2's; the paper names none)                           -> set_learning_rates

Public names: PairedViews, SemanticFPNDecoder, VADeRNet, GlobalNet, PixelQueue, vader_loss, in_image_negatives,
shared_loss, key_embeddings, train, main.

Choices the paper leaves open (our defaults, and why)
    - Correspondence is computed at the output resolution: cell (i, j) of view 1's (S/4)x(S/4) grid is matched to
      the view-2 cell that covers its centre in the original image. The paper matches "pixels"; the loss only ever
      sees output cells, so this is the same supervision without sub-cell ambiguity.
    - A pair of views is redrawn (view 2 only, up to 10 times) until >= --num-matches cells match, then view 2 falls
      back to view 1's box (same crop, new flip and colours), which always matches.
    - The loss is MoCo v2's: asymmetric (f sees view 1, g sees view 2); the 32 matched keys of each image are what
      is enqueued (global batch 128 -> 4096 keys per step; the queue size must be a multiple of that).
    - The learning rates are constant (the paper names no schedule). The default --epochs 600 is the paper's ~6M
      iterations at batch 128 (1.28M / 128 = 10k steps an epoch).
    - Shuffle BN (MoCo) keeps BN statistics from leaking between a query and its key. Under DDP the global batch
      is shuffled over the ranks. In one process, g runs a random permutation of the batch as --shuffle-bn-splits
      sub-batches (default 4: the paper's 4 GPUs x 32 images), each with its own BN statistics, as MoCo's single-GPU
      SplitBatchNorm demo does; a batch that does not split evenly gets sub-batches whose sizes differ by one
      (torch.tensor_split), never more sub-batches than images. --shuffle-bn-splits 1 is plain BN.
    - The decoder is ~5.0M parameters for ResNet-50 (FPN 3.3M + merge head 1.6M) with torchvision's FPN (the paper quotes "around 2M extra"; it counts fewer
      FPN convolutions than torchvision's default has).
    - From scratch (no --init) the paper's encoder lr 3e-7 would leave the encoder random: use
      --lr-encoder 0.003 --lr-decoder 0.003 (MoCo's 0.03 divided by the loss weight 10; 0.03 itself made the
      demo's loss jump and stall); the embedded demo does so.
    - The decoder's final 1x1 conv keeps PyTorch's default initialisation, not Detectron2's N(0, 0.001): the embedding
      is L2-normalised, and a tiny output norm multiplied the first gradients by 1/||z|| and collapsed training.
    - --in-image-negatives (off, as the paper's final model) adds the other matched pixels of the same image as
      negatives: the reviewers' question; the paper reports it did not work. --negative-radius R (Reviewers 1 and
      3) keeps only those whose original-image positions (the view-1 cell centres, carried in `matches`) lie farther
      than R pixels from the positive's. At any R, a key of the positive's own view-2 cell is no negative: it is a
      copy of the positive (two of the 32 view-1 cells fall in one view-2 cell in ~10% of ImageNet-sized images).
    - --key-encoder shared (Reviewer 1): one network, both views with gradients (one forward over the 2N views, so
      BN sees both), SimCLR's symmetric NT-Xent: each matched pixel of either view is an anchor, its match in the
      other view the positive, and the other matched pixels of both views of the whole global batch (all-gathered
      with gradients to the local part, SimCLR's GatherLayer) the negatives; same-image pixels only with
      --in-image-negatives, by the same radius rule. tau and the loss weight stay the dense ones (0.07, x 10).
    - --objective global is MoCo v2 (Chen et al. 2020) on the same data, views and budget: two independent MoCo v2
      crops (no overlap required), C5 average-pooled, MLP head C5-C5-128 (2048-2048-128 for ResNet-50), InfoNCE over
      an image-level queue (one key per image), tau 0.2. The loss weight 10 is kept, so lr x weight is MoCo's
      lr (0.03 from scratch at --lr-encoder 0.003). The ResNet stays under encoder.* with torchvision names, so the
      checkpoint evaluates like any other (VADeRNet.from_args returns None: the encoder is probed, dilated to 1/4).
    - --objective crops is Reviewer 3's baseline, built from the review's words ("taking different crops from the
      same image to get an expanded dataset, where crops from different locations of an image now become
      non-corresponding images"): each image is cut into --crop-regions x --crop-regions non-overlapping regions
      (default 2 x 2), each a separate instance of an expanded data set. A sample draws one region; both views are
      MoCo v2 crops of that region alone, and training is --objective global's: the other regions of the same image
      are negatives like any other image. The per-epoch budget is unchanged (one region per image per epoch).
    - --keys-per-image K enqueues the first K of each image's matches (they are in random order): the queue then
      spans 65536 / (128 K) steps (16 at K = 32, MoCo's 65536 / 256 = 256 at K = 2).
    - --lr-schedule cosine is MoCo v2's half-cosine, per step over --epochs (the paper names no schedule; default
      constant).
    - With --data, no --init and --lr-encoder below 1e-4, the run stops with an error: the paper's 3e-7 fine-tunes a
      MoCo v2 encoder and would leave a random one random for days (the embedded demo trains from scratch at 0.003).
"""
import argparse
import copy
import math
import os
import random
import time
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork

import common

# ---- arguments ----
DEMO_PRESET = dict(  # used when --data is not given: a CPU-sized run on the embedded dead-leaves images
    arch="resnet18", image_size=64, batch_size=32, epochs=5, queue_size=8192, lr_encoder=0.003, lr_decoder=0.003,
    save_every=100, log_every=10, workers=0, output_dir="runs/vader-demo",
)


def get_parser():
    p = argparse.ArgumentParser(description="VADeR pre-training (pixel-level MoCo).", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="image folder (DIR/train/<class>/<img> or any tree of images); "
                   "omit it for the embedded synthetic data set and the CPU demo preset")
    p.add_argument("--output-dir", default="runs/vader", help="checkpoint.pth, log.jsonl and result.json go here")
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet: resnet18/34/50/101/152")
    p.add_argument("--image-size", type=int, default=224, help="view size S (multiple of 32); output grid is S/4")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (images), split evenly over ranks")
    p.add_argument("--epochs", type=int, default=600, help="passes over the data (600 x 10k steps ~ the paper's 6M)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps in all (0: no limit)")
    p.add_argument("--save-every", type=int, default=1000, help="also checkpoint every N steps (0: only per epoch)")
    p.add_argument("--log-every", type=int, default=50, help="one log.jsonl line every N steps")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per rank (0: in the main process)")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation (same on every rank) and the views")
    p.add_argument("--init", default=None, help="encoder weights: official MoCo v2 checkpoint (module.encoder_q.*), "
                   "torchvision ResNet state dict, or a vader.py/clove.py checkpoint; the decoder starts random")
    p.add_argument("--resume", default="auto", help="'auto': continue from <output-dir>/checkpoint.pth when it "
                   "exists; 'never': start afresh (the old checkpoint is overwritten); or a checkpoint path")
    p.add_argument("--queue-size", type=int, default=65536, help="negatives in the queue (a multiple of global batch x "
                   "--num-matches); the paper saw MoCo's trend: larger is better, with diminishing returns")
    p.add_argument("--num-matches", type=int, default=32, help="matched cell pairs (positives) per image")
    p.add_argument("--matching", default="diff-view", choices=["diff-view", "same-view", "unmatch"],
                   help="Table 3: different crops (paper), the identical crop for both views, or random pairs")
    p.add_argument("--temperature", type=float, default=None, help="tau of c(x1, x2) = cos(x1, x2) / tau "
                   "(default: 0.07, the paper's, for --objective dense; 0.2, MoCo v2's, for global and crops)")
    p.add_argument("--momentum", type=float, default=0.999, help="momentum of g (MoCo)")
    p.add_argument("--lr-encoder", type=float, default=3e-7, help="SGD lr of the ResNet (paper, MoCo-initialised); "
                   "0.03 from scratch")
    p.add_argument("--lr-decoder", type=float, default=3e-3, help="SGD lr of the FPN and decoder; 0.03 from scratch")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--loss-weight", type=float, default=10.0, help="Eq. 2 is multiplied by this (paper: 10)")
    p.add_argument("--embedding-dim", type=int, default=128, help="d, the per-pixel embedding size")
    p.add_argument("--in-image-negatives", action="store_true", help="also contrast against the other matched "
                   "pixels of the same image (reviewers' question; the paper reports it failed)")
    p.add_argument("--negative-radius", type=float, default=0.0, help="with --in-image-negatives: only cells whose "
                   "original-image positions lie farther than R pixels from the positive's are negatives (Reviewers "
                   "1, 3: 'how spatially close can those negatives be'); a key of the positive's own view-2 cell "
                   "never is")
    p.add_argument("--key-encoder", default="momentum", choices=["momentum", "shared"], help="momentum: g is f's "
                   "momentum copy, negatives from the queue (paper); shared: no g and no queue, both views through f "
                   "with gradients, negatives are the other matched pixels of the global batch, symmetric loss "
                   "(SimCLR-style; Reviewer 1: 'is momentum contrast even needed')")
    p.add_argument("--objective", default="dense", choices=["dense", "global", "crops"], help="dense: VADeR's Eq. 2 "
                   "(paper); global: MoCo v2 itself (C5 avg-pool, MLP head, image-level queue; Reviewer 2, footnote "
                   "1: 'MoCo trained longer'); crops: MoCo v2 where each of --crop-regions^2 non-overlapping regions "
                   "of an image is its own instance (Reviewer 3's baseline)")
    p.add_argument("--crop-regions", type=int, default=2, help="--objective crops: each image is cut into R x R "
                   "non-overlapping regions, each a separate instance (2: four instances per image)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="constant (the paper "
                   "names no schedule) or MoCo v2's half-cosine to 0 over --epochs")
    p.add_argument("--keys-per-image", type=int, default=None, help="enqueue K of the --num-matches keys of each "
                   "image (default: all); fewer keys per step make the queue span more steps (queue staleness: "
                   "65536 / 4096 keys = 16 steps against MoCo's 256)")
    p.add_argument("--shuffle-bn-splits", type=int, default=4, help="one process: g runs a permuted batch in this "
                   "many sub-batches with their own BN statistics (MoCo's single-GPU SplitBatchNorm), emulating "
                   "shuffle BN over the paper's 4 GPUs; 1 = plain BN. Ignored under DDP (real shuffle BN)")
    p.add_argument("--precision", default="auto", choices=common.PRECISIONS, help=common.PRECISION_HELP)
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last memory format for the convolutions ('auto': on a GPU)")
    p.add_argument("--synthetic-images", type=int, default=2048, help="size of the embedded data set (no --data)")
    return p


# ---- views ----
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
    """Image -> (view1, view2, matches): two augmented views and the cells of their output grids that see the same
    point of the original image.

    Geometry (RandomResizedCrop box + horizontal flip) is drawn first and kept; appearance ops (MoCo v2: colour
    jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2, Gaussian blur sigma 0.1-2 with p=0.5) never move pixels.
    `matches` is a LongTensor [num_matches, 4]: row-major indices into the (S/4)x(S/4) grids of view 1 and view 2,
    then the original-image pixel (x, y), rounded, of the scene point (view-1 cell centre) that the pair sees.

    `independent=True` draws the two crops independently, with no overlap required (MoCo v2's views, for the
    image-level objectives; `matches` is then zeros). `regions=R` (the crops objective) first cuts the image into
    R x R non-overlapping regions and keeps one at random: both views are crops of that region alone.
    """

    def __init__(self, image_size=224, color=True, matching="diff-view", num_matches=32, scale=(0.2, 1.0),
                 stride=4, max_tries=10, independent=False, regions=1):
        if matching not in ("diff-view", "same-view", "unmatch"):
            raise ValueError(f"matching must be diff-view, same-view or unmatch, not {matching}")
        self.size, self.color, self.matching, self.num_matches = image_size, color, matching, num_matches
        self.scale, self.grid, self.max_tries = scale, image_size // stride, max_tries
        self.independent, self.regions = independent, regions
        if num_matches > self.grid**2:
            raise ValueError(f"num_matches {num_matches} > {self.grid}x{self.grid} cells")

    def match(self, rng, width, height):
        """Draw both views' geometry; returns (box1, flip1, box2, flip2, matches [M, 4])."""
        box1, flip1 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
        if self.independent:  # MoCo v2: two independent crops
            box2, flip2 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
            return box1, flip1, box2, flip2, torch.zeros(self.num_matches, 4, dtype=torch.long)
        centres = common.cell_centres(box1, flip1, self.grid)  # G*G x 2, original-image (x, y) of view-1 cells
        if self.matching == "same-view":
            box2, flip2 = box1, flip1
            cells2, inside = torch.arange(self.grid**2), torch.ones(self.grid**2, dtype=torch.bool)
        else:
            for _ in range(self.max_tries):
                box2, flip2 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
                cells2, inside = locate_in_view(centres, box2, flip2, self.grid)
                if int(inside.sum()) >= self.num_matches:
                    break
            else:  # guaranteed overlap: view 2 takes view 1's box (new flip); every cell then has a match
                box2, flip2 = box1, rng.random() < 0.5
                cells2, inside = locate_in_view(centres, box2, flip2, self.grid)
        candidates = inside.nonzero().flatten().tolist()
        cells1 = torch.tensor(rng.sample(candidates, self.num_matches))
        if self.matching == "unmatch":  # Table 3, row 1: positives ignore the correspondence map
            pairs = torch.tensor([[rng.randrange(self.grid**2), rng.randrange(self.grid**2)]
                                  for _ in range(self.num_matches)])
        else:
            pairs = torch.stack([cells1, cells2[cells1]], 1)
        position = centres[pairs[:, 0]].round().long()  # M x 2, original-image (x, y) of the view-1 cell
        return box1, flip1, box2, flip2, torch.cat([pairs, position], 1)

    def region(self, img, rng):
        """One of the R x R non-overlapping regions of `img` (the crops objective's instance)."""
        r = rng.randrange(self.regions**2)
        row, col = divmod(r, self.regions)
        xs = [round(i * img.width / self.regions) for i in range(self.regions + 1)]
        ys = [round(i * img.height / self.regions) for i in range(self.regions + 1)]
        return img.crop((xs[col], ys[row], xs[col + 1], ys[row + 1]))

    def appearance(self, img, rng):
        if rng.random() < 0.8:
            img = common.color_jitter(img, rng, 0.4, 0.4, 0.4, 0.1)
        if rng.random() < 0.2:
            img = common.grayscale(img)
        if rng.random() < 0.5:
            img = common.gaussian_blur(img, rng, (0.1, 2.0))
        return img

    def __call__(self, img, rng=None):
        rng = rng or random.Random()
        if self.regions > 1:
            img = self.region(img, rng)
        box1, flip1, box2, flip2, matches = self.match(rng, *img.size)
        views = []
        for box, flip in ((box1, flip1), (box2, flip2)):
            view = common.crop_resize(img, box, self.size, flip)
            views.append(common.to_uint8(self.appearance(view, rng) if self.color else view))
        return views[0], views[1], matches


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
        self.predictor = nn.Conv2d(channels, out_dim, 1)
        for m in self.levels.modules():  # Detectron2's initialisation of the blocks
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # The predictor keeps PyTorch's default init, not Detectron2's N(0, 0.001): the embedding is L2-normalised,
        # and a tiny output norm would blow the first gradients up by 1/||z|| and collapse the representation.

    def forward(self, pyramid):  # pyramid: [P2 (N x 256 x S/4 x S/4), P3, P4, P5]
        return self.predictor(sum(level(p) for level, p in zip(self.levels, pyramid)))  # N x out_dim x S/4 x S/4


class VADeRNet(nn.Module):
    """f (and g): ResNet encoder -> FPN over C2..C5 (256 ch) -> semantic merge -> N x dim x S/4 x S/4.

    `encoder` keeps torchvision's ResNet names, so MoCo and torchvision weights load into it directly.
    `fpn_norm` (e.g. nn.BatchNorm2d) adds normalisation to the FPN layers, as the fine-tuning protocol of §4.2 does.
    """

    def __init__(self, arch="resnet50", dim=128, fpn_norm=None):
        super().__init__()
        self.encoder = common.resnet(arch)
        self.fpn = FeaturePyramidNetwork(common.resnet_channels(arch), 256, norm_layer=fpn_norm)
        self.decoder = SemanticFPNDecoder(256, 128, dim)
        self.out_channels = dim

    @classmethod
    def from_args(cls, args):
        """The f that a vader.py run with these saved arguments (a checkpoint's `args`) trained, or None for the
        image-level objectives (global, crops): they train no dense head, so evaluation probes their `encoder.*`."""
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


class GlobalNet(nn.Module):
    """MoCo v2's f for --objective global and crops: ResNet -> C5 average-pooled -> MLP head (Linear C-C, ReLU,
    Linear C-dim; 2048-2048-128 for ResNet-50, the hidden width follows C5) -> N x dim.

    `encoder` keeps torchvision's ResNet names, so the checkpoint evaluates like any other (its encoder is probed).
    """

    def __init__(self, arch="resnet50", dim=128):
        super().__init__()
        self.encoder = common.resnet(arch)
        width = common.resnet_channels(arch)[-1]
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))
        self.out_channels = dim

    def dense(self, x):  # N x C x H/32 x W/32: the C5 map (feature pictures)
        return common.resnet_stages(self.encoder, x)[-1]

    def forward(self, x):  # x: N x 3 x H x W -> N x dim
        return self.head(self.dense(x).mean((2, 3)))


# ---- loss and queue ----
class PixelQueue(nn.Module):
    """MoCo's dictionary of negatives, holding pixel embeddings of g: a ring buffer of `size` unit vectors.

    Buffers, so the queue and its pointer are saved in checkpoints. Keys are all-gathered across ranks before they
    are enqueued, so every rank holds the same queue.
    """

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # K x d
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):  # keys: this rank's P x d
        keys = common.all_gather_cat(keys)
        n, size = keys.shape[0], self.keys.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the {n} keys enqueued per step")
        p = int(self.ptr)
        self.keys[p:p + n] = keys.to(self.keys.dtype)
        self.ptr[0] = (p + n) % size


def vader_loss(q, k, queue, temperature, in_image=None):
    """Eq. 2, averaged over the positives: -log exp(c(q, k)) / (exp(c(q, k)) + sum_{u' in queue} exp(c(q, u'))).

    q: P x d, f's embeddings at the matched cells of view 1; k: P x d, g's embeddings at their matches in view 2
    (both L2-normalised, so the dot product is the cosine); queue: K x d. `in_image` (N x M x M bool, from
    in_image_negatives; P = N * M) adds the keys of the same image that it marks as further negatives.
    With P = N image embeddings this is MoCo's InfoNCE (--objective global, crops).
    """
    q = q / temperature  # c(q, .) / tau: dividing the P x d queries, not the P x (1 + K) logits, saves two passes
    l_pos = (q * k).sum(1, keepdim=True)  # P x 1
    l_neg = q @ queue.t()  # P x K
    logits = [l_pos, l_neg]
    if in_image is not None:
        n, m = in_image.shape[:2]
        same = torch.bmm(q.view(n, m, -1), k.view(n, m, -1).transpose(1, 2))  # N x M x M
        logits.append(same.masked_fill(~in_image, float("-inf")).reshape(n * m, m))
    logits = torch.cat(logits, 1)  # P x (1 + K [+ M]), already divided by tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def in_image_negatives(matches, radius=0.0):
    """Which keys of the same image are negatives for each positive: N x M x M bool, [i, a, b] for query a, key b.

    matches: N x M x 4 (cell 1, cell 2, x, y). Key b is a negative for positive a when it comes from another view-2
    cell (a key of the positive's own view-2 cell is a copy of the positive, never a negative: with 32 random cells
    per image two of them often share a view-2 cell) and, for radius R > 0, when the original-image positions of
    the two pairs lie farther than R pixels apart (Reviewers 1 and 3).
    """
    cells2, position = matches[..., 1], matches[..., 2:].double()
    negative = cells2[:, :, None] != cells2[:, None, :]  # N x M x M, False on the diagonal too
    if radius > 0:
        negative &= torch.cdist(position, position) > radius
    return negative


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
    rule (radius, no copy of the positive's view-2 cell). Symmetric: z2_a is an anchor too, with positive z1_a.
    """
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


def gather_cells(z, cells):
    """z: N x d x H x W, cells: N x M row-major indices -> the L2-normalised embeddings N x M x d."""
    z = z.flatten(2)  # N x d x HW
    picked = torch.gather(z, 2, cells.unsqueeze(1).expand(-1, z.shape[1], -1))  # N x d x M
    return F.normalize(picked.transpose(1, 2).float(), dim=2)


def embed(net, x, cells=None):
    """Normalised embeddings: at `cells` (N x M) of a dense net's maps -> N x M x d, or a global net's N x d."""
    return F.normalize(net(x).float(), dim=1) if cells is None else gather_cells(net(x), cells)


@torch.no_grad()
def key_embeddings(g, view2, cells2=None, splits=1):
    """g's normalised embeddings at `cells2` (N x M) of view 2: N x M x d (or N x d for a global g, cells2=None).

    Under DDP this is MoCo's shuffle BN: the global batch is permuted (permutation from rank 0), each rank runs g
    on a random shard, so BN statistics never pair a key with its own query's batch; only the M gathered keys per
    image travel back, not the full maps. In one process, `splits` > 1 emulates it as MoCo's single-GPU
    SplitBatchNorm demo does: g runs a random permutation of the batch in `splits` sub-batches, each normalised
    with its own BN statistics (torch.tensor_split: sizes differ by at most one; never more splits than images).
    """
    if not common.distributed():
        if splits <= 1:
            return embed(g, view2, cells2)
        perm = torch.randperm(len(view2), device=view2.device)
        parts = [embed(g, view2[idx], None if cells2 is None else cells2[idx])
                 for idx in torch.tensor_split(perm, min(splits, len(view2)))]
        return torch.cat(parts)[torch.argsort(perm)]  # back to the original order
    world, rank = dist.get_world_size(), dist.get_rank()
    images = common.all_gather_cat(view2)
    cells = None if cells2 is None else common.all_gather_cat(cells2)
    perm = torch.randperm(len(images), device=images.device)
    dist.broadcast(perm, 0)
    mine = perm.view(world, -1)[rank]
    keys = common.all_gather_cat(embed(g, images[mine], None if cells is None else cells[mine]))  # permuted order
    keys = keys[torch.argsort(perm)]  # back to the original order
    return keys.view(world, -1, *keys.shape[1:])[rank]


# ---- training ----
def build_data(args, d):
    views = PairedViews(args.image_size, color=True, matching=args.matching, num_matches=args.num_matches,
                        independent=args.objective != "dense",
                        regions=args.crop_regions if args.objective == "crops" else 1)
    if args.data is None:
        return common.SyntheticDataset(views, length=args.synthetic_images, size=160, seed=args.seed)
    return common.ImageFolderDataset(args.data, views, seed=args.seed)


def check_args(args, d):
    common.autocast_dtype(d.device, args.precision)  # fp16 on a CPU: a one-line error now, not mid-run
    if args.image_size % 32:
        raise common.UserError(f"--image-size {args.image_size}: must be a multiple of 32 (the FPN's coarsest stride)")
    if args.batch_size % d.world_size:
        raise common.UserError(f"--batch-size {args.batch_size}: the global batch must split evenly over "
                               f"{d.world_size} ranks")
    keys_per_step = args.batch_size * keys_per_image(args)
    if args.key_encoder == "momentum" and args.queue_size % keys_per_step:
        raise common.UserError(f"--queue-size {args.queue_size}: must be a multiple of the {keys_per_step} keys "
                               "enqueued per step (--batch-size x --keys-per-image; x 1 for --objective global/crops)")
    if args.num_matches > (args.image_size // 4) ** 2:
        raise common.UserError(f"--num-matches {args.num_matches}: more than the {(args.image_size // 4) ** 2} cells")


MIN_SCRATCH_LR = 1e-4  # an encoder lr below this leaves a random encoder random (the paper's 3e-7 is for MoCo v2's)


def keys_per_image(args):
    """Keys each image adds to the queue per step: --keys-per-image of its matches (dense), its one embedding (else)."""
    if args.objective != "dense":
        return 1
    return args.num_matches if args.keys_per_image is None else args.keys_per_image


def temperature(args):
    """--temperature, or its default for --objective: 0.07 (VADeR §3.2) for dense, 0.2 (MoCo v2) for global, crops."""
    if args.temperature is not None:
        return args.temperature
    return 0.07 if args.objective == "dense" else 0.2


def resolve_defaults(args):
    """Fill the defaults that depend on other flags, so that the checkpoint's args record the values used."""
    args.temperature = temperature(args)


def check_switches(args):
    """One-line errors for the reviewers' switches and the frozen-random-encoder trap (before any work)."""
    if args.data is not None and not args.init and args.lr_encoder < MIN_SCRATCH_LR:
        raise common.UserError(
            f"--lr-encoder {args.lr_encoder:g} with --data and no --init: the encoder starts random and this lr "
            "leaves it random (the paper's 3e-7 fine-tunes a MoCo v2 encoder); pass --init "
            "moco_v2_800ep_pretrain.pth.tar (the paper's start) or train from scratch with e.g. --lr-encoder 0.003 "
            "--lr-decoder 0.003")
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


def build_networks(args, say=print):
    """f (with --init loaded), its momentum copy g and the queue; for --key-encoder shared, g and the queue are empty
    modules (nothing to update, save or resume)."""
    net = VADeRNet if args.objective == "dense" else GlobalNet
    f = net(args.arch, args.embedding_dim)
    if args.init:
        say(f"init: encoder from {load_init(f, args.init, args.objective)} weights {args.init}")
    if args.key_encoder == "shared":
        return f, nn.Module(), nn.Module()
    return f, copy.deepcopy(f).requires_grad_(False), PixelQueue(args.queue_size, args.embedding_dim)


def load_init(f, path, objective="dense"):
    kind, state, meta = common.read_weights(path)
    if kind == "vader" and meta["args"].get("objective", "dense") == objective:
        f.load_state_dict(state)
    else:
        if kind in ("vader", "clove"):
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        common.load_resnet_state(f.encoder, state, path)
    return kind


def set_learning_rates(optimizer, args, step, steps_per_epoch):
    """--lr-schedule cosine: MoCo v2's lr x 0.5 (1 + cos(pi t / T)) at step t of T = --epochs x steps per epoch
    (per step, not per epoch; --max-steps does not change it, so a run cut short resumes on the same curve)."""
    factor = 1.0 if args.lr_schedule == "constant" else common.cosine(step, args.epochs * steps_per_epoch, 1.0, 0.0)
    for group, base in zip(optimizer.param_groups, (args.lr_encoder, args.lr_decoder)):
        group["lr"] = base * factor


def dense_momentum_loss(model, f, g, queue, view1, view2, matches, args):
    """VADeR (§3.2): f on view 1, momentum update, g on view 2 (shuffle BN), Eq. 2 x loss weight.
    Returns (loss, keys to enqueue: --keys-per-image of each image's M, K' x d)."""
    n, m = matches.shape[:2]
    with common.autocast(view1.device, args.precision):
        q = gather_cells(model(view1), matches[:, :, 0])  # N x M x d
        common.ema_update(g, f, args.momentum, copy_buffers=False)  # MoCo: update g before computing keys
        k = key_embeddings(g, view2, matches[:, :, 1], args.shuffle_bn_splits)  # N x M x d
    in_image = in_image_negatives(matches, args.negative_radius) if args.in_image_negatives else None
    loss = args.loss_weight * vader_loss(q.reshape(n * m, -1), k.reshape(n * m, -1), queue.keys, temperature(args),
                                         in_image)
    return loss, k[:, :keys_per_image(args)].reshape(-1, k.shape[-1])  # matches are in random order: a random K


def dense_shared_loss(model, f, g, queue, view1, view2, matches, args):
    """--key-encoder shared: both views through f in one batch, symmetric NT-Xent (shared_loss) x loss weight."""
    n = len(view1)
    with common.autocast(view1.device, args.precision):
        z = model(torch.cat([view1, view2]))  # 2N x d x S/4 x S/4
        z1, z2 = gather_cells(z[:n], matches[:, :, 0]), gather_cells(z[n:], matches[:, :, 1])  # N x M x d
    loss = shared_loss(z1.flatten(0, 1), z2.flatten(0, 1), matches, temperature(args), args.in_image_negatives,
                       args.negative_radius)
    return args.loss_weight * loss, None


def global_loss(model, f, g, queue, view1, view2, matches, args):
    """--objective global / crops: MoCo v2, f and g pooled to one embedding per view, InfoNCE over the image-level
    queue, x loss weight (so that lr x weight matches MoCo's lr, as for Eq. 2). Returns (loss, keys N x d)."""
    with common.autocast(view1.device, args.precision):
        q = F.normalize(model(view1).float(), dim=1)  # N x d
        common.ema_update(g, f, args.momentum, copy_buffers=False)
        k = key_embeddings(g, view2, None, args.shuffle_bn_splits)  # N x d
    return args.loss_weight * vader_loss(q, k, queue.keys, temperature(args)), k


def forward_loss(model, f, g, queue, view1, view2, matches, args):
    """One step's forward for the chosen --objective / --key-encoder. `model` is f itself or its DDP wrapper.
    Returns (loss, keys P x d to enqueue after the optimiser step, or None without a queue)."""
    if args.objective != "dense":
        return global_loss(model, f, g, queue, view1, view2, matches, args)
    if args.key_encoder == "shared":
        return dense_shared_loss(model, f, g, queue, view1, view2, matches, args)
    return dense_momentum_loss(model, f, g, queue, view1, view2, matches, args)


def train(args):
    d = common.init_distributed()
    check_args(args, d)
    os.makedirs(args.output_dir, exist_ok=True)
    common.seed_all(args.seed)  # same initialisation on every rank
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    log = common.JsonLog(os.path.join(args.output_dir, "log.jsonl"), d.is_main)
    say = print if d.is_main else (lambda *a, **k: None)

    # ---- data ----
    dataset = build_data(args, d)
    per_rank = args.batch_size // d.world_size
    sampler = common.ResumableSampler(len(dataset), d.rank, d.world_size, args.seed)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise common.UserError(f"--data {args.data}: {len(dataset)} images are fewer than one batch per rank ({per_rank})")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    # ---- model: f, its momentum copy g, the queue ----
    f, g, queue = build_networks(args, say)
    cuda = d.device.type == "cuda"
    memory_format = common.memory_format(d.device, args.channels_last)
    f, g, queue = f.to(d.device, memory_format=memory_format), g.to(d.device, memory_format=memory_format), queue.to(d.device)
    groups = [dict(params=f.encoder.parameters(), lr=args.lr_encoder),  # the rest: FPN + decoder, or MoCo's head
              dict(params=[p for name, p in f.named_parameters() if not name.startswith("encoder.")],
                   lr=args.lr_decoder)]
    optimizer = torch.optim.SGD(groups, lr=args.lr_decoder, momentum=args.sgd_momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and args.precision == "fp16")

    # ---- resume: rank 0 decides; every rank starts from the same checkpoint ----
    facts = dict(world_size=d.world_size, images=len(dataset))  # exact resumption needs these unchanged too
    ckpt = common.resume_checkpoint(args, ckpt_path, "vader", facts, log,
                                     may_change={"lr_encoder", "lr_decoder"})
    step = 0
    if ckpt is not None:
        f.load_state_dict(ckpt["model"]), g.load_state_dict(ckpt["momentum_encoder"])
        queue.load_state_dict(ckpt["queue"]), optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        common.set_rng_states(ckpt["rng"])
        step = ckpt["step"]
    model = common.wrap_ddp(f, d, common.example_images((per_rank, 3, args.image_size, args.image_size), d.device,
                                                        memory_format))

    def save(epoch):
        if d.is_main:
            common.save_checkpoint(ckpt_path, dict(
                method="vader", model=f.state_dict(), momentum_encoder=g.state_dict(), queue=queue.state_dict(),
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=epoch, step=step,
                args=vars(args), rng=common.rng_states(), facts=facts))

    picture_images = common.picture_images(dataset, args.image_size)

    def picture():  # VADeR Figures 2 and 5 for a few fixed images: watch the features form
        if d.is_main:
            common.feature_picture(f, picture_images, os.path.join(args.output_dir, "features.png"),
                                   forward=f.dense if isinstance(f, GlobalNet) else None)

    say(f"VADeR: {args.arch}, {len(dataset)} images ({args.data or 'embedded synthetic dead leaves'}), "
        f"{d.world_size} rank(s) x {per_rank} images, {steps_per_epoch} steps/epoch, {total_steps} steps in all, "
        f"device {d.device}")
    log.write(event="start", step=step, world_size=d.world_size, per_rank_batch=per_rank,
              global_keys_per_step=args.batch_size * args.num_matches, steps_per_epoch=steps_per_epoch,
              total_steps=total_steps, images=len(dataset))

    # ---- loop ----
    loader = common.make_loader(dataset, sampler, per_rank, args.workers, d.device)
    bar = common.throughput_bar(None, total_steps, d.is_main, initial=step, desc="vader")
    first_loss = last_loss = None
    skipped = 0
    meter, t_start = common.Meter(), time.time()
    f.train(), g.train()
    epoch = step // steps_per_epoch
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=(step % steps_per_epoch) * per_rank)
        dataset.set_epoch(epoch)
        for view1, view2, matches, n_skipped in loader:
            view1 = common.normalize(view1, d.device).contiguous(memory_format=memory_format)  # N x 3 x S x S
            view2 = common.normalize(view2, d.device).contiguous(memory_format=memory_format)
            matches = matches.to(d.device, non_blocking=True)  # N x M x 2
            skipped += int(n_skipped.sum())

            loss, k = forward_loss(model, f, g, queue, view1, view2, matches, args)
            set_learning_rates(optimizer, args, step, steps_per_epoch)

            loss_value = common.all_reduce_mean(loss.item())
            if not math.isfinite(loss_value):
                bar.close()
                raise common.UserError(
                    f"non-finite loss ({loss_value}) at step {step + 1}; stopped without saving, so {ckpt_path} still "
                    "holds the last good state. Lower --lr-decoder/--lr-encoder or use --precision fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if k is not None:
                queue.enqueue(k.detach())
            step += 1

            first_loss = loss_value if first_loss is None else first_loss
            last_loss = loss_value
            rate = meter.rate(args.batch_size)
            bar.update(1)
            lr_encoder, lr_decoder = (group["lr"] for group in optimizer.param_groups)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr_decoder:.1e}", img_s=f"{rate:.1f}")
            if step % args.log_every == 0 or step == total_steps:
                log.write(step=step, epoch=epoch, loss=loss_value, lr_encoder=lr_encoder,
                          lr_decoder=lr_decoder, images_per_s=rate, skipped_files=skipped,
                          elapsed_s=round(time.time() - t_start, 1))
            if args.save_every and step % args.save_every == 0:
                save(epoch)
            if step >= total_steps:
                break
        save(epoch)  # end of an epoch (or of the run)
        picture()
    bar.close()

    result = dict(method="vader", steps=step, epochs=round(step / steps_per_epoch, 3), first_loss=first_loss,
                  final_loss=last_loss, seconds=round(time.time() - t_start, 1), skipped_files=skipped,
                  checkpoint=ckpt_path)
    log.write(event="end", **result)
    if d.is_main:
        if args.data is None:
            print(f"Trained VADeR ({args.arch}, {args.image_size}px views) on {len(dataset)} synthetic dead-leaves "
                  f"images for {step} steps in {result['seconds']} s; loss {first_loss:.2f} -> {last_loss:.2f} (the "
                  f"queue starts as random vectors, so the first steps are easy; with real keys in it, chance level "
                  f"is {args.loss_weight} x ln(1 + K) = {args.loss_weight * math.log(1 + args.queue_size):.1f}). "
                  f"Features: {os.path.join(args.output_dir, 'features.png')}. Checkpoint: "
                  f"{ckpt_path}; probe it with `python evaluate_linear.py --weights {ckpt_path}`.")
        common.print_result(result, os.path.join(args.output_dir, "result.json"))
    common.finish_distributed()
    return result


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.data is None:
        common.apply_preset(parser, args, DEMO_PRESET, argv, announce="embedded synthetic data")
    resolve_defaults(args)
    check_switches(args)
    train(args)


if __name__ == "__main__":
    common.run_main(main)
