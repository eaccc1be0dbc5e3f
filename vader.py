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
    shuffle BN for g under DDP (MoCo)                                                -> key_embeddings
    Table 3 ablation: --matching diff-view (paper) | same-view | unmatch

Public names: PairedViews, SemanticFPNDecoder, VADeRNet, PixelQueue, vader_loss, key_embeddings, train, main.

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
    - Shuffle BN needs several ranks; one process uses plain BN for g, as MoCo's single-GPU code does.
    - The decoder is ~5.0M parameters for ResNet-50 (FPN 3.3M + merge head 1.6M) with torchvision's FPN (the paper quotes "around 2M extra"; it counts fewer
      FPN convolutions than torchvision's default has).
    - From scratch (no --init) the paper's encoder lr 3e-7 would leave the encoder random: use
      --lr-encoder 0.003 --lr-decoder 0.003 (MoCo's 0.03 divided by the loss weight 10; 0.03 itself made the
      demo's loss jump and stall); the embedded demo does so.
    - The decoder's final 1x1 conv keeps PyTorch's default initialisation, not Detectron2's N(0, 0.001): the embedding
      is L2-normalised, and a tiny output norm multiplied the first gradients by 1/||z|| and collapsed training.
    - --in-image-negatives (off, as the paper's final model) adds the other matched pixels of the same image as
      negatives: the reviewers' question; the paper reports it did not work.
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
    p.add_argument("--temperature", type=float, default=0.07, help="tau of c(x1, x2) = cos(x1, x2) / tau")
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
    p.add_argument("--precision", default="auto", choices=common.PRECISIONS, help=common.PRECISION_HELP)
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last memory format for the convolutions ('auto': on a GPU)")
    p.add_argument("--synthetic-images", type=int, default=2048, help="size of the embedded data set (no --data)")
    return p


# ---- views ----
class PairedViews:
    """Image -> (view1, view2, matches): two augmented views and the cells of their output grids that see the same
    point of the original image.

    Geometry (RandomResizedCrop box + horizontal flip) is drawn first and kept; appearance ops (MoCo v2: colour
    jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2, Gaussian blur sigma 0.1-2 with p=0.5) never move pixels.
    `matches` is a LongTensor [num_matches, 2] of row-major indices into the (S/4)x(S/4) grids of view 1 and view 2.
    """

    def __init__(self, image_size=224, color=True, matching="diff-view", num_matches=32, scale=(0.2, 1.0),
                 stride=4, max_tries=10):
        if matching not in ("diff-view", "same-view", "unmatch"):
            raise ValueError(f"matching must be diff-view, same-view or unmatch, not {matching}")
        self.size, self.color, self.matching, self.num_matches = image_size, color, matching, num_matches
        self.scale, self.grid, self.max_tries = scale, image_size // stride, max_tries
        if num_matches > self.grid**2:
            raise ValueError(f"num_matches {num_matches} > {self.grid}x{self.grid} cells")

    def match(self, rng, width, height):
        """Draw both views' geometry; returns (box1, flip1, box2, flip2, matches [M, 2])."""
        box1, flip1 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
        centres = common.cell_centres(box1, flip1, self.grid)  # G*G x 2, original-image (x, y) of view-1 cells
        if self.matching == "same-view":
            box2, flip2 = box1, flip1
            cells2, inside = torch.arange(self.grid**2), torch.ones(self.grid**2, dtype=torch.bool)
        else:
            for _ in range(self.max_tries):
                box2, flip2 = common.sample_crop_box(rng, width, height, self.scale), rng.random() < 0.5
                cells2, inside = common.locate_in_view(centres, box2, flip2, self.grid)
                if int(inside.sum()) >= self.num_matches:
                    break
            else:  # guaranteed overlap: view 2 takes view 1's box (new flip); every cell then has a match
                box2, flip2 = box1, rng.random() < 0.5
                cells2, inside = common.locate_in_view(centres, box2, flip2, self.grid)
        candidates = inside.nonzero().flatten().tolist()
        cells1 = torch.tensor(rng.sample(candidates, self.num_matches))
        if self.matching == "unmatch":  # Table 3, row 1: positives ignore the correspondence map
            pairs = torch.tensor([[rng.randrange(self.grid**2), rng.randrange(self.grid**2)]
                                  for _ in range(self.num_matches)])
        else:
            pairs = torch.stack([cells1, cells2[cells1]], 1)
        return box1, flip1, box2, flip2, pairs

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
        box1, flip1, box2, flip2, matches = self.match(rng, *img.size)
        views = []
        for box, flip in ((box1, flip1), (box2, flip2)):
            view = common.crop_resize(img, box, self.size, flip)
            views.append(common.to_tensor(self.appearance(view, rng) if self.color else view))
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
        """The f that a vader.py run with these saved arguments (a checkpoint's `args`) trained."""
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
    (both L2-normalised, so the dot product is the cosine); queue: K x d. With `in_image` = (images, matches) the
    keys of the other matched cells of the same image are added as negatives.
    """
    q = q / temperature  # c(q, .) / tau: dividing the P x d queries, not the P x (1 + K) logits, saves two passes
    l_pos = (q * k).sum(1, keepdim=True)  # P x 1
    l_neg = q @ queue.t()  # P x K
    logits = [l_pos, l_neg]
    if in_image is not None:
        n, m = in_image
        same = torch.bmm(q.view(n, m, -1), k.view(n, m, -1).transpose(1, 2))  # N x M x M
        same = same.masked_fill(torch.eye(m, dtype=torch.bool, device=q.device), float("-inf"))
        logits.append(same.reshape(n * m, m))  # the own key (the positive) excluded
    logits = torch.cat(logits, 1)  # P x (1 + K [+ M]), already divided by tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def gather_cells(z, cells):
    """z: N x d x H x W, cells: N x M row-major indices -> the L2-normalised embeddings N x M x d."""
    z = z.flatten(2)  # N x d x HW
    picked = torch.gather(z, 2, cells.unsqueeze(1).expand(-1, z.shape[1], -1))  # N x d x M
    return F.normalize(picked.transpose(1, 2).float(), dim=2)


@torch.no_grad()
def key_embeddings(g, view2, cells2):
    """g's normalised embeddings at `cells2` (N x M) of view 2: N x M x d.

    Under DDP this is MoCo's shuffle BN: the global batch is permuted (permutation from rank 0), each rank runs g
    on a random shard, so BN statistics never pair a key with its own query's batch; only the M gathered keys per
    image travel back, not the full maps.
    """
    if not common.distributed():
        return gather_cells(g(view2), cells2)
    world, rank = dist.get_world_size(), dist.get_rank()
    images, cells = common.all_gather_cat(view2), common.all_gather_cat(cells2)
    perm = torch.randperm(len(images), device=images.device)
    dist.broadcast(perm, 0)
    mine = perm.view(world, -1)[rank]
    keys = common.all_gather_cat(gather_cells(g(images[mine]), cells[mine]))  # in permuted order
    keys = keys[torch.argsort(perm)]  # back to the original order
    return keys.view(world, -1, *keys.shape[1:])[rank]


# ---- training ----
def build_data(args, d):
    views = PairedViews(args.image_size, color=True, matching=args.matching, num_matches=args.num_matches)
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
    keys_per_step = args.batch_size * args.num_matches
    if args.queue_size % keys_per_step:
        raise common.UserError(f"--queue-size {args.queue_size}: must be a multiple of --batch-size x --num-matches "
                               f"= {keys_per_step} keys enqueued per step")
    if args.num_matches > (args.image_size // 4) ** 2:
        raise common.UserError(f"--num-matches {args.num_matches}: more than the {(args.image_size // 4) ** 2} cells")


def load_init(f, path):
    kind, state, _ = common.read_weights(path)
    if kind == "vader":
        f.load_state_dict(state)
    else:
        if kind == "clove":
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        common.load_resnet_state(f.encoder, state, path)
    return kind


def forward_loss(model, f, g, queue, view1, view2, matches, args):
    """One step's forward: f on view 1, momentum update, g on view 2 (shuffle BN), Eq. 2 x loss weight.
    `model` is f itself or its DDP wrapper. Returns (loss, keys P x d to enqueue after the optimiser step)."""
    n, m = matches.shape[:2]
    with common.autocast(view1.device, args.precision):
        q = gather_cells(model(view1), matches[:, :, 0])  # N x M x d
        common.ema_update(g, f, args.momentum, copy_buffers=False)  # MoCo: update g before computing keys
        k = key_embeddings(g, view2, matches[:, :, 1])  # N x M x d
    q, k = q.reshape(n * m, -1), k.reshape(n * m, -1)  # P x d, P = N * M
    loss = args.loss_weight * vader_loss(q, k, queue.keys, args.temperature,
                                         (n, m) if args.in_image_negatives else None)
    return loss, k


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
    f = VADeRNet(args.arch, args.embedding_dim)
    if args.init:
        say(f"init: encoder from {load_init(f, args.init)} weights {args.init}")
    g = copy.deepcopy(f).requires_grad_(False)
    queue = PixelQueue(args.queue_size, args.embedding_dim)
    cuda = d.device.type == "cuda"
    memory_format = common.memory_format(d.device, args.channels_last)
    f, g, queue = f.to(d.device, memory_format=memory_format), g.to(d.device, memory_format=memory_format), queue.to(d.device)
    groups = [dict(params=f.encoder.parameters(), lr=args.lr_encoder),
              dict(params=list(f.fpn.parameters()) + list(f.decoder.parameters()), lr=args.lr_decoder)]
    optimizer = torch.optim.SGD(groups, lr=args.lr_decoder, momentum=args.sgd_momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and args.precision == "fp16")

    # ---- resume ----
    step = 0
    resume = ckpt_path if args.resume == "auto" else (None if args.resume == "never" else args.resume)
    if resume and os.path.isfile(resume):
        ckpt = common.load_checkpoint(resume)
        f.load_state_dict(ckpt["model"]), g.load_state_dict(ckpt["momentum_encoder"])
        queue.load_state_dict(ckpt["queue"]), optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        common.set_rng_states(ckpt["rng"])
        step = ckpt["step"]
        say(f"resumed from {resume} at step {step}")
    elif args.resume not in ("auto", "never"):
        raise common.UserError(f"--resume {args.resume}: no such checkpoint")
    model = nn.parallel.DistributedDataParallel(f, device_ids=[d.local_rank] if cuda else None) if d.world_size > 1 else f

    def save(epoch):
        if d.is_main:
            common.save_checkpoint(ckpt_path, dict(
                method="vader", model=f.state_dict(), momentum_encoder=g.state_dict(), queue=queue.state_dict(),
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=epoch, step=step,
                args=vars(args), rng=common.rng_states()))

    picture_images = common.picture_images(dataset, args.image_size)

    def picture():  # VADeR Figures 2 and 5 for a few fixed images: watch the features form
        if d.is_main:
            common.feature_picture(f, picture_images, os.path.join(args.output_dir, "features.png"))

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
            view1 = view1.to(d.device, non_blocking=True, memory_format=memory_format)
            view2 = view2.to(d.device, non_blocking=True, memory_format=memory_format)
            matches = matches.to(d.device, non_blocking=True)  # N x M x 2
            skipped += int(n_skipped.sum())

            loss, k = forward_loss(model, f, g, queue, view1, view2, matches, args)

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
            queue.enqueue(k.detach())
            step += 1

            first_loss = loss_value if first_loss is None else first_loss
            last_loss = loss_value
            rate = meter.rate(args.batch_size)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{args.lr_decoder:.1e}", img_s=f"{rate:.1f}")
            if step % args.log_every == 0 or step == total_steps:
                log.write(step=step, epoch=epoch, loss=loss_value, lr_encoder=args.lr_encoder,
                          lr_decoder=args.lr_decoder, images_per_s=rate, skipped_files=skipped,
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
    train(args)


if __name__ == "__main__":
    common.run_main(main)
