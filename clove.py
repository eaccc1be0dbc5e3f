"""CLoVE: Contextualized Local Visual Embeddings, dense self-supervision with a normalised self-attention predictor.

Two views of an image go through a student ResNet + 1x1-conv projector and its EMA copy, the teacher; the student's
local features are mixed by a normalised multi-head self-attention layer (NMHSA) into one contextualised embedding per
feature cell. Cells of the two views whose centres lie close together in the original image are positives (Eq. 1),
and a margin ranking loss (Eq. 2) pulls each contextualised embedding towards its positive teacher cells and away
from an average of the most similar other teacher cells of the same image.

Paper: T. Silva, H. Pedrini, A. Ramirez Rivera, "Self-supervised Learning of Contextualized Local Visual
Embeddings", ICCV Workshops 2023 (§3, §5, §6). Official code: github.com/sthalles/CLoVE (a PixPro fork).

Usage
    python clove.py                                   # embedded demo: synthetic images, CPU-sized preset
    python clove.py --data /imagenet --batch-size 256                                 # one GPU (or CPU)
    torchrun --nproc_per_node=4 clove.py --data /imagenet                             # one node, global batch 2048
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 clove.py --data /imagenet                          # two nodes (node_rank 1 too)
Re-running the same command resumes from <output-dir>/checkpoint.pth. --batch-size is global (split over ranks and
--accum-steps micro-batches); the learning rate is derived from it: lr = --base-lr x global batch / 256. With
--accum-steps, an epoch ends on an optimiser step: the micro-batches left over (fewer than one step) are dropped, as
drop_last drops a partial batch, so no gradient crosses an epoch or a checkpoint.

What the code implements, and where
    views: BYOL's recipe, two global crops + 6 local crops, boxes and flips kept      -> CLoVEViews
    Eq. 1: positive cells = centre distance < T_pos x the larger cell diagonal        -> match_cells (in CLoVEViews)
    f_s, f_t: ResNet C5 -> projector (1x1 conv 4096, BN, ReLU, 1x1 conv 256, BN) (§6) -> CLoVENet
    q_s: normalised multi-head self-attention, softmax(cos(Q, K) / tau) V (§3.4)      -> NMHSA
    Eq. 2: margin ranking, intra-image top-k negatives (§3.3), fp32; Table 10 queue   -> clove_loss, NegativeQueue
    symmetrised over the global views; local crops are student-only                  -> clove_step
    teacher <- m teacher + (1 - m) student, m cosine 0.99 -> 1 (§3.1)                -> teacher_momentum
    LARS, wd 2e-5, lr 1.0 x B/256, warm-up + cosine, batch 2048 (§6)                 -> LARS, learning_rate, train
    Ablations: --loss rank|l2 (Table 8), --local-crops (Table 8), --attention nmhsa|mhsa (Table 9),
               --negatives intra|inter|inter-avg (Table 10), --t-pos (Table 11)

Public names: CLoVEViews, match_cells, NMHSA, CLoVENet, make_teacher, teacher_momentum, update_teacher, NegativeQueue,
hard_negatives, clove_loss, official_rank_loss, clove_step, LARS, build_optimizer, learning_rate,
epoch_micro_batches, train, main. Eq. 1 is evaluated in the data-loading workers (CLoVEViews returns the masks), as
vader.py's correspondences are, so it costs the training step nothing.

The rule for defaults. Where the paper states a value, the paper wins: NMHSA (Table 9), T_pos 0.7 (Table 11), k = 10
and the averaged negative vector (§3.3), mu 100, lr 1.0 x B/256, wd 2e-5, batch 2048, 8 heads of 32, D 256, hidden
4096 (§6). Where the paper is silent or ambiguous, or its hyperparameters were tuned on the official code's form,
the official code decides, because it produced the numbers. Every difference stays one flag away:

Decided by the official code (the paper silent or ambiguous; our default = the code; the flag gives the other)
    - Multi-crop: 2 global + 6 local 96-px crops (scale 0.08-0.3, blur p 0.5). §6 describes BYOL's two views, but the
      default rows of Tables 9 and 10 (58.7 / 83.3 / 65.9 AP) equal Table 8's rank + multi-crop row (58.8 / 83.3 /
      65.9), not its two-view row (58.5 / 82.8 / 65.6), and the official loader (contrast/data/dataset.py) always
      makes 6, whatever its --local-crops-number says. --local-crops 0: two views.
    - Global crop scale (0.2, 1): §6 says "we follow BYOL's protocol", which would be (0.08, 1), but every official
      launch script, config.json and log.txt has --crop 0.2 (the 50/100-epoch scripts 0.24). --global-scale 0.08 1.
    - Eq. 1 in the code's frame (contrast/loss.py on RandomResizedCropCoord's boxes): a crop of pixels j..j+w-1 is
      [j, j+w-1] / (W-1) (y by H-1), so x and y are scaled separately and the grid spans the first and last pixels'
      centres. §3.2 says "pixel space"; T_pos = 0.7 was tuned in the code's frame. The two differ in ~1% of the mask
      entries on 4:3 images (identical for square ones up to that half-pixel). --match-coords pixels.
    - Eq. 2's scale: the printed Eq. 2 is a SUM over M, whose size varies with the overlap; the code works on
      s = -2 cos (both terms doubled) and averages per image: max(0, lambda mean_{M_n} s(C_i, F_j) - mean_i
      s(C_i, F_neg,i) + mu), mean over images (the mean over i includes cells with no positive; an image with no
      positive pair keeps its negative term). lr 1.0 and wd 2e-5 were tuned at that scale, and LARS is not
      scale-free (weight decay; the 1-D parameters move by the raw lr x gradient), so the default trains at it: on
      realistic masks the gradient norm is 1.0-1.2x the code's (tested), where a mean of the per-pair hinge is
      ~0.5-0.6x. --loss-reduction pair: the printed per-pair hinge, averaged over M.
    - Projector: §6 says "a two-layer MLP with 4096 hidden units, ReLU, batch normalization"; the code's ends with a
      bias-free conv and a BatchNorm without affine parameters (contrast/models/CLoVE.py, MLP2d). --no-projector-final-bn.
    - Zero-initialised last BN of each residual block (the code's ResNet); the paper is silent. --no-zero-init-residual.
    - Schedule: §6 says "cosine decay"; the code (main_pretrain.py, util.cosine_scheduler) warms up linearly for 5
      epochs from lr/100 (--warmup-multiplier 100) and decays to 1% of the peak. --warmup-start-ratio, --min-lr-ratio,
      --warmup-epochs.
    - lambda = 2 (--lamb) and the NMHSA temperature tau = 0.2 (--attention-temperature): the paper gives no values;
      2 is the code's --lamb and 0.2 its --attn-temp default (defined there, unused by its plain attention).
    - Eq. 2 in fp32 outside autocast, as the code (its loss takes .float() maps outside the autocast block): in bf16,
      cos 0.901 and 0.904 are the same number, so the top-k negatives would be chosen among ties.
Where our default follows the paper and the code differs (a flag gives the code's behaviour)
    - Predictor: the code uses a plain nn.MultiheadAttention(256, 8) (biased in-projections, q.k / sqrt(32), no
      normalisation, no temperature): --attention mhsa. The paper's NMHSA (§3.4, Table 9) is the default.
    - Negatives: the paper averages the top-k negative VECTORS (the most similar one dropped) and takes the cosine
      with that average (§3.3); the code averages the cosines. In the code a student cell with fewer than k = 10
      non-positive teacher cells puts +inf logits into its top-k, so its image's negative term is +inf and
      nn.MarginRankingLoss gives 0: the whole image drops out with zero gradient (it still counts in the mean over
      the batch). That never happens at T_pos 0.7 with 224 / 96 crops (49 teacher cells, a few positives each);
      at T_pos 2 it drops 17% of the global view pairs and 52% of the local-global ones (400 random 4:3 images;
      the test checks that it happens). --official-loss gives the code's loss exactly
      (official_rank_loss), that behaviour included.
    - T_pos 0.7 (Table 11). The official tools/clove_base_r50_400ep.sh passes --clove-pos-ratio 2, but the
      config.json and log.txt committed next to it (output/clove_base_r50_400ep) record 0.7, as the code's default.
    - Teacher update timing: the code updates the teacher inside the forward of the micro-batch that ends an
      accumulation group, before that micro-batch's teacher forward (main_pretrain.py passes m only when the
      gradients sync): with --grad-accumulation-steps 2 the first micro-batch of each step sees the old teacher and
      the second an updated one, and its lr and m are indexed by micro-batch. We update once, after the optimiser
      step (BYOL), so every micro-batch of a step sees the same teacher; without accumulation the two give the same
      sequence of teachers, shifted by one step. No flag. The code also steps on a partial group at an epoch's end
      (scaled by 1/accum); we drop it (see Usage).
Choices neither source makes (our defaults, and why)
    - A student cell with no non-positive teacher cell left after dropping the most similar one gets
      cos(C_i, F_neg) = 0, and an image with no positive pair a positive term of 0 (as the code's 1e-6 guard): finite.
    - Table 10's queue (16,384): each step enqueues one random teacher cell (inter) or the average of the teacher
      map (inter-avg) of the first global view of every image, gathered over ranks; the negatives are then chosen
      from the queue with the same top-k rule. The paper says no more than "a queue of 16,384 representations".
    - Views of the same size go through the network as one batch (the code does too), so BN statistics are shared
      by the two global views. View sizes must be multiples of 32 so that C5 cells tile the view exactly.
    - SyncBN under DDP on GPU (as the code); torch's SyncBN needs a GPU, so CPU (gloo) runs keep per-rank BN.
"""
import argparse
import contextlib
import copy
import itertools
import math
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.resnet import BasicBlock, Bottleneck

import common

# ---- arguments ----
DEMO_PRESET = dict(  # used when --data is not given: a CPU-sized run on the embedded dead-leaves images
    # the default 2 global + 6 local views scaled to a CPU: 128-px global views (a 4 x 4 grid of C5 cells, where 224
    # px gives 7 x 7) and 64-px local crops (2 x 2, where 96 px gives 3 x 3); resnet18, 160 steps of 32 images
    arch="resnet18", image_size=128, local_size=64, batch_size=32, epochs=5, synthetic_images=1024,
    warmup_epochs=1, base_lr=8.0,  # LARS moves a layer by ~lr x 0.001 of its norm a step: 160 steps need lr ~1
    save_every=100, log_every=4, workers=0, output_dir="runs/clove-demo",
)


def get_parser():
    p = argparse.ArgumentParser(description="CLoVE pre-training (contextualised local embeddings).", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="image folder (DIR/train/<class>/<img> or any tree of images); "
                   "omit it for the embedded synthetic data set and the CPU demo preset")
    p.add_argument("--output-dir", default="runs/clove", help="checkpoint.pth, log.jsonl and result.json go here")
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet: resnet18/34/50/101/152")
    p.add_argument("--image-size", type=int, default=224, help="global view size (multiple of 32); C5 grid is S/32")
    p.add_argument("--batch-size", type=int, default=2048, help="global batch (images), split evenly over ranks and "
                   "--accum-steps; the paper: 2048 on 4 A100")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimiser step (gradient "
                   "accumulation) when a rank cannot hold batch/world images; BN sees the micro-batch")
    p.add_argument("--epochs", type=int, default=200, help="passes over the data (paper: 200 and 400)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps in all (0: no "
                   "limit); the schedules still follow --epochs")
    p.add_argument("--save-every", type=int, default=1000, help="also checkpoint every N steps (0: only per epoch)")
    p.add_argument("--log-every", type=int, default=50, help="one log.jsonl line every N steps")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per rank (0: in the main process)")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation (same on every rank) and the views")
    p.add_argument("--resume", default="auto", help="'auto': continue from <output-dir>/checkpoint.pth when it "
                   "exists; 'never': start afresh (the old checkpoint is overwritten); or a checkpoint path")
    # views
    p.add_argument("--local-crops", type=int, default=6, help="extra student-only local views (multi-crop, Table 8; "
                   "the official loader always makes 6); 0 gives BYOL's two views alone")
    p.add_argument("--local-size", type=int, default=96, help="local view size (multiple of 32; 96 -> 3x3 cells)")
    p.add_argument("--global-scale", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"),
                   help="area fraction of the global crops (the official code's --crop 0.2; BYOL's protocol, which "
                   "§6 cites, uses 0.08 1)")
    p.add_argument("--local-scale", type=float, nargs=2, default=(0.08, 0.3), metavar=("MIN", "MAX"),
                   help="area fraction of the local crops (the official code's)")
    p.add_argument("--t-pos", type=float, default=0.7, help="Eq. 1 threshold in units of the larger cell diagonal "
                   "of the two views (Table 11: 0.5-0.9, best 0.7); larger = more, blurrier positives")
    p.add_argument("--match-coords", default="normalized", choices=["normalized", "pixels"], help="Eq. 1 distances "
                   "in the official code's frame (PixPro: pixel indices divided by W-1 and H-1, where T_pos was tuned) "
                   "or in original-image pixels (isotropic; differs on non-square images)")
    # model
    p.add_argument("--proj-hidden", type=int, default=4096, help="hidden width of the projector (paper: 4096)")
    p.add_argument("--embedding-dim", type=int, default=256, help="D, the local embedding size (paper: 256)")
    p.add_argument("--projector-final-bn", action=argparse.BooleanOptionalAction, default=True, help="end the "
                   "projector with a bias-free 1x1 conv and a BN without affine parameters (the official code; §6 only "
                   "says 'MLP ... batch normalization'); --no-projector-final-bn: a plain biased 1x1 conv")
    p.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True, help="zero the last "
                   "BN weight of each residual block, so each block starts as the identity (the official code; the "
                   "paper is silent)")
    p.add_argument("--attention", default="nmhsa", choices=["nmhsa", "mhsa"], help="Table 9: normalised q/k with a "
                   "temperature (paper) or plain scaled dot product (the official code's nn.MultiheadAttention)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (paper: 8 heads of 256/8 = 32 dims)")
    p.add_argument("--attention-temperature", type=float, default=0.2, help="tau of softmax(cos(q, k) / tau) for "
                   "nmhsa (the paper gives none; 0.2 is the official code's unused --attn-temp)")
    p.add_argument("--ema-momentum", type=float, default=0.99, help="teacher momentum at step 0; cosine to 1.0 at "
                   "the end (paper/code: 0.99)")
    # loss
    p.add_argument("--loss", default="rank", choices=["rank", "l2"], help="Table 8: margin ranking Eq. 2 (paper) or "
                   "BYOL's normalised l2, 2 - 2 cos, on the positive pairs")
    p.add_argument("--margin", type=float, default=100.0, help="mu of Eq. 2 (paper: 100; the hinge never clips)")
    p.add_argument("--lamb", type=float, default=2.0, help="lambda of Eq. 2, weight of the positive similarity "
                   "(paper: no value; the official code: 2)")
    p.add_argument("--negatives", default="intra", choices=["intra", "inter", "inter-avg"], help="Table 10: "
                   "non-positive cells of the same image (paper) or a queue of teacher cells / pooled maps")
    p.add_argument("--topk-negatives", type=int, default=10, help="k most similar non-positives; the most similar "
                   "one is dropped (a likely false negative), the other k-1 averaged")
    p.add_argument("--queue-size", type=int, default=16384, help="queue of --negatives inter/inter-avg (paper)")
    p.add_argument("--loss-reduction", default="image", choices=["image", "pair"], help="how Eq. 2 is aggregated: "
                   "'image' (the official code's scale, at which lr and wd were tuned: per image, lambda x the mean "
                   "-2 cos of its positive pairs minus the mean -2 cos of its cells' negatives, one hinge per image, "
                   "mean over images) or 'pair' (the paper's printed form: one hinge per pair in M, mean over M)")
    p.add_argument("--official-loss", action="store_true", help="the official code's loss exactly: --loss-reduction "
                   "image with the mean of the negatives' cosines (not the cosine with their mean vector), and an "
                   "image whose cells have fewer than --topk-negatives non-positive teacher cells drops out")
    # optimisation
    p.add_argument("--base-lr", type=float, default=1.0, help="LARS lr for a batch of 256; lr = base_lr x batch / 256")
    p.add_argument("--weight-decay", type=float, default=2e-5, help="LARS weight decay (paper; the code uses 1e-5 for "
                   "short schedules); biases and norms get none")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up before the cosine decay (the code)")
    p.add_argument("--warmup-start-ratio", type=float, default=0.01, help="first warm-up lr / peak lr (the code's "
                   "--warmup-multiplier 100)")
    p.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / peak lr of the cosine decay (the code; "
                   "the paper says only 'cosine decay')")
    p.add_argument("--sgd-momentum", type=float, default=0.9, help="momentum inside LARS")
    p.add_argument("--precision", default="auto", choices=common.PRECISIONS, help=common.PRECISION_HELP)
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last memory format for the convolutions ('auto': on a GPU)")
    p.add_argument("--synthetic-images", type=int, default=2048, help="size of the embedded data set (no --data)")
    return p


# ---- views ----
def match_cells(box_s, flip_s, grid_s, box_t, flip_t, grid_t, t_pos, scale=(1.0, 1.0)):
    """Eq. 1: M = {(i, j) | d(I_i^s, I_j^t) < T_pos}, as a bool mask [grid_s^2, grid_t^2] (row-major cells).

    I_i is the centre of feature cell i in original-image coordinates (flips mirror the columns); d is measured in
    units of the larger of the two views' cell diagonals, so T_pos = 0.7 means "closer than 0.7 of a cell". The views
    need not overlap: cells on both sides of a shared border are still neighbours. `scale` multiplies x and y before
    measuring ((1/(W-1), 1/(H-1)) is the official code's normalised frame).
    """
    sx, sy = scale
    xy = torch.tensor([sx, sy], dtype=torch.float64)
    centres_s = common.cell_centres(box_s, flip_s, grid_s) * xy  # Ls x 2
    centres_t = common.cell_centres(box_t, flip_t, grid_t) * xy  # Lt x 2
    diag_s = math.hypot(box_s.width / grid_s * sx, box_s.height / grid_s * sy)
    diag_t = math.hypot(box_t.width / grid_t * sx, box_t.height / grid_t * sy)
    return torch.cdist(centres_s, centres_t) < t_pos * max(diag_s, diag_t)  # Ls x Lt


class CLoVEViews:
    """Image -> (globals, locals, pos_global, pos_local): BYOL's views and their Eq. 1 positive masks.

    Two global views (size S): RandomResizedCrop (bicubic) + flip, colour jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale
    p 0.2, Gaussian blur p 1.0 / 0.1, solarisation p 0 / 0.2 (BYOL's asymmetry). `local_crops` extra views (size s,
    blur p 0.5, no solarisation) are seen by the student only. Geometry is drawn first and kept; appearance ops never
    move pixels. Masks have the student's cells as rows and the teacher's as columns:
        globals    2 x 3 x S x S
        locals     L x 3 x s x s
        pos_global 2 x G^2 x G^2       [t] pairs student view 1-t with teacher view t
        pos_local  2 x L x g^2 x G^2   [t, l] pairs local view l with teacher view t
    """

    def __init__(self, image_size=224, local_crops=6, local_size=96, global_scale=(0.2, 1.0),
                 local_scale=(0.08, 0.3), t_pos=0.7, match_coords="normalized", stride=32, color=True):
        self.size, self.local_crops, self.local_size = image_size, local_crops, local_size
        self.global_scale, self.local_scale, self.t_pos = tuple(global_scale), tuple(local_scale), t_pos
        self.match_coords, self.color = match_coords, color
        self.grid, self.local_grid = image_size // stride, local_size // stride

    def frame(self, geometry, width, height):
        """The boxes and the x, y scale Eq. 1 is measured in. 'normalized' is the official code's frame (PixPro's
        RandomResizedCropCoord): a crop of pixels j..j+w-1 is the box [j, j+w-1] / (W-1), so the cell grid spans the
        centres of the crop's first and last pixels, and x and y are scaled separately."""
        if self.match_coords == "normalized":
            return ([(common.Box(b.x0, b.y0, b.x1 - 1, b.y1 - 1), flip) for b, flip in geometry],
                    (1 / max(width - 1, 1), 1 / max(height - 1, 1)))
        return geometry, (1.0, 1.0)

    def match(self, geometry, width, height):
        """geometry: [(box, flip)] of the 2 global then the L local views -> (pos_global, pos_local)."""
        geometry, scale = self.frame(geometry, width, height)
        (g0, g1), locs = geometry[:2], geometry[2:]
        m01 = match_cells(*g0, self.grid, *g1, self.grid, self.t_pos, scale)  # student view 0 x teacher view 1
        pos_global = torch.stack([m01.t(), m01])  # Eq. 1 is symmetric: [0] = student 1 x teacher 0
        pos_local = torch.stack([torch.stack([match_cells(*loc, self.local_grid, *g, self.grid, self.t_pos, scale)
                                              for loc in locs]) if locs else
                                 torch.zeros(0, self.local_grid**2, self.grid**2, dtype=torch.bool)
                                 for g in (g0, g1)])
        return pos_global, pos_local

    def appearance(self, img, rng, blur, solarize):
        if rng.random() < 0.8:
            img = common.color_jitter(img, rng, 0.4, 0.4, 0.2, 0.1)
        if rng.random() < 0.2:
            img = common.grayscale(img)
        if rng.random() < blur:
            img = common.gaussian_blur(img, rng, (0.1, 2.0))
        if rng.random() < solarize:
            img = common.solarize(img)
        return img

    def __call__(self, img, rng=None):
        rng = rng or random.Random()
        w, h = img.size
        geometry = [(common.sample_crop_box(rng, w, h, self.global_scale), rng.random() < 0.5) for _ in range(2)]
        geometry += [(common.sample_crop_box(rng, w, h, self.local_scale), rng.random() < 0.5)
                     for _ in range(self.local_crops)]
        pos_global, pos_local = self.match(geometry, w, h)
        recipe = [(self.size, 1.0, 0.0), (self.size, 0.1, 0.2)] + [(self.local_size, 0.5, 0.0)] * self.local_crops
        views = []
        for (box, flip), (size, blur, solar) in zip(geometry, recipe):
            view = common.crop_resize(img, box, size, flip, resample=Image.BICUBIC)
            views.append(common.to_uint8(self.appearance(view, rng, blur, solar) if self.color else view))
        locals_ = (torch.stack(views[2:]) if self.local_crops
                   else torch.zeros(0, 3, self.local_size, self.local_size, dtype=torch.uint8))
        return torch.stack(views[:2]), locals_, pos_global, pos_local


# ---- model ----
class NMHSA(nn.Module):
    """Normalised multi-head self-attention (§3.4, §6): the predictor q_s that turns local features into
    contextualised embeddings, within one view.

    head_h = softmax(cos(F W_h^q, F W_h^k) / tau) F W_h^v with W^q, W^k, W^v in R^{D x D/H} per head (256 x 32 for
    8 heads), no biases; the heads are concatenated and a linear layer maps them back to D. Because queries and keys
    are unit vectors the logits lie in [-1/tau, 1/tau] (§5.2: this avoids instabilities). `normalized=False` is the
    plain MHSA of Table 9 and of the official code (nn.MultiheadAttention: biased projections, q.k / sqrt(D/H)).
    """

    def __init__(self, dim=256, heads=8, temperature=0.2, normalized=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.temperature, self.normalized = heads, temperature, normalized
        self.q = nn.Linear(dim, dim, bias=not normalized)  # the H matrices W_h^q side by side
        self.k = nn.Linear(dim, dim, bias=not normalized)
        self.v = nn.Linear(dim, dim, bias=not normalized)
        self.out = nn.Linear(dim, dim)

    def split(self, x):  # N x L x D -> N x H x L x D/H
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def logits(self, x):  # x: N x L x D -> N x H x L x L
        q, k = self.split(self.q(x)), self.split(self.k(x))
        if self.normalized:
            return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) / self.temperature
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])

    def forward(self, x):  # x: N x L x D
        # the same computation as softmax(self.logits(x)) @ V, in one fused kernel (flash attention on GPU)
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))  # N x H x L x D/H each
        if self.normalized:
            q, k, scale = F.normalize(q, dim=-1), F.normalize(k, dim=-1), 1 / self.temperature
        else:
            scale = 1 / math.sqrt(q.shape[-1])
        heads = F.scaled_dot_product_attention(q, k, v, scale=scale)  # N x H x L x D/H, rows of weights sum to 1
        return self.out(heads.transpose(1, 2).flatten(2))  # N x L x D


class CLoVENet(nn.Module):
    """f_s (and f_t): ResNet without avgpool/fc -> C5 -> projector at every location -> (student) NMHSA.

    The keyword defaults are the command line's (the official code's projector and residual initialisation).

    forward(*batches) takes one batch per view size (the global pair, the local crops) in a single call, so DDP
    sees one forward per step, and returns the L2-normalised embeddings N x L x D of each (L = cells of C5).
    The teacher is a deep copy with `predictor = None`: it returns the projected local features F^t.
    `encoder` keeps torchvision's ResNet names (common.dense_feature_model and the Detectron2 export rely on it).
    """

    def __init__(self, arch="resnet50", hidden=4096, dim=256, attention="nmhsa", heads=8, temperature=0.2,
                 final_bn=True, zero_init_residual=True):
        super().__init__()
        self.encoder = common.resnet(arch)
        c5 = common.resnet_channels(arch)[-1]
        self.projector = nn.Sequential(
            nn.Conv2d(c5, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            *([nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim, affine=False)] if final_bn
              else [nn.Conv2d(hidden, dim, 1)]))
        self.predictor = NMHSA(dim, heads, temperature, normalized=attention == "nmhsa")
        if zero_init_residual:  # each residual block starts as the identity (Goyal et al. 2017)
            for m in self.encoder.modules():
                if isinstance(m, (Bottleneck, BasicBlock)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def local_maps(self, x):  # x: N x 3 x S x S -> projected local features F as maps, N x D x S/32 x S/32
        return self.projector(common.resnet_stages(self.encoder, x)[-1])

    def local_features(self, x):  # x: N x 3 x S x S -> N x L x D, L = (S/32)^2
        return self.local_maps(x).flatten(2).transpose(1, 2)  # N x L x D

    def forward(self, *batches):
        out = []
        for x in batches:
            z = self.local_features(x)  # N x L x D
            if self.predictor is not None:
                z = self.predictor(z)  # C^s = q_s(F^s), N x L x D
            out.append(F.normalize(z.float(), dim=-1))
        return out


def make_teacher(student):
    """f_t: a frozen deep copy of the student's encoder and projector (the predictor is student-only)."""
    teacher = copy.deepcopy(student).requires_grad_(False)
    teacher.predictor = None
    return teacher


def teacher_momentum(step, total, start=0.99):
    """EMA momentum m at optimiser step `step` of `total`: cosine from `start` (step 0) to 1 (the end) (§3.1)."""
    return common.cosine(step, total, start, 1.0)


def update_teacher(teacher, student, momentum):
    """theta_t <- m theta_t + (1 - m) theta_s for the parts the two share; BN statistics are copied (BYOL)."""
    for name in ("encoder", "projector"):
        common.ema_update(getattr(teacher, name), getattr(student, name), momentum, copy_buffers=True)


# ---- loss and queue ----
class NegativeQueue(nn.Module):
    """Table 10's queue of 16,384 teacher representations (inter: one local cell per image, inter-avg: the pooled
    map), a ring buffer of unit vectors. Buffers, so it is checkpointed; keys are gathered over ranks first, so
    every rank holds the same queue."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # K x D
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):  # keys: this rank's n x D
        keys = common.all_gather_cat(keys.contiguous())
        size = self.keys.shape[0]
        index = (int(self.ptr) + torch.arange(len(keys), device=keys.device)) % size
        self.keys[index] = keys.to(self.keys.dtype)
        self.ptr[0] = (int(self.ptr) + len(keys)) % size


def hard_negatives(sim, topk):
    """The k most similar candidates of each student cell, minus the most similar one (a likely false negative).

    sim: N x Ls x P similarities to the candidates, -inf where a candidate is excluded (a positive). Returns
    (index N x Ls x k-1, valid N x Ls x k-1 bool): with fewer than k candidates the missing slots are invalid.
    """
    values, index = sim.detach().topk(min(topk, sim.shape[-1]), dim=-1)  # N x Ls x k, most similar first
    return index[..., 1:], torch.isfinite(values[..., 1:])


def clove_loss(pred, target, positive, lamb=2.0, margin=100.0, topk=10, loss="rank", queue=None, official=False,
               reduction="image"):
    """Eq. 2 for one (student view, teacher view) pair of a batch, in fp32 outside autocast.

    pred: N x Ls x D contextual embeddings C^s; target: N x Lt x D teacher features F^t (no gradient);
    positive: N x Ls x Lt bool, the Eq. 1 mask. F_neg,i is the average of the top-k most similar NON-positive
    teacher cells of the same image with the most similar dropped (intra, §3.3), or of queue entries when `queue`
    (K x D) is given (inter, Table 10). The keyword defaults are the command line's.

    reduction="image" (default, the official code's scale): per image n, with s = -2 cos,
        max(0, lambda * mean_{(i,j) in M_n} s(C_i, F_j) - mean_{i} s(C_i, F_neg,i) + mu), averaged over the images
    (the mean over i runs over every student cell, also those with no positive; an image with no positive pair keeps
    its negative term, as in the code). reduction="pair": the paper's printed form, one hinge per pair,
        max(0, -lambda cos(C_i, F_j) + cos(C_i, F_neg,i) + mu) averaged over the pairs (i, j) of the batch.
    official=True: the official code exactly (see official_rank_loss). loss="l2": BYOL's 2 - 2 cos over M (Table 8),
    reduced the same way. Finite when an image has no positive or no negative left.
    """
    with torch.autocast(pred.device.type, enabled=False):  # bf16 cannot tell cos 0.901 from 0.904: top-k would tie
        pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1).detach()
        sim = pred @ target.transpose(1, 2)  # N x Ls x Lt, cos(C_i, F_j)
        pos = positive.float()
        if loss == "l2":
            return reduce_pairs(2 - 2 * sim, pos, reduction)
        if queue is None:  # intra (§3.3): the candidates are the same image's non-positive teacher cells
            candidates = sim.masked_fill(positive, float("-inf"))  # N x Ls x Lt
        else:  # inter / inter-avg (Table 10): the candidates are the queue's entries
            queue = F.normalize(queue.float(), dim=-1).detach()  # K x D
            candidates = pred @ queue.t()  # N x Ls x K
        if official:
            return official_rank_loss(sim, candidates, pos, lamb, margin, topk)
        index, valid = hard_negatives(candidates, topk)  # N x Ls x k-1
        if queue is None:
            chosen = target[torch.arange(len(target), device=target.device)[:, None, None], index]  # N x Ls x k-1 x D
        else:
            chosen = queue[index]  # N x Ls x k-1 x D
        neg_vec = (chosen * valid.unsqueeze(-1)).sum(-2)  # N x Ls x D, the paper averages the vectors
        neg_cos = (pred * F.normalize(neg_vec, dim=-1)).sum(-1)  # N x Ls; 0 where no negative was left
        if reduction == "pair":
            hinge = F.relu(margin - lamb * sim + neg_cos.unsqueeze(-1))  # N x Ls x Lt
            return (hinge * pos).sum() / pos.sum().clamp(min=1)
        positives = -2 * (sim * pos).sum((1, 2)) / pos.sum((1, 2)).clamp(min=1)  # N
        negatives = -2 * neg_cos.mean(1)  # N
        return F.relu(lamb * positives - negatives + margin).mean()


def reduce_pairs(values, pos, reduction):
    """Mean of values (N x Ls x Lt) over the pairs of M: per image then over the images, or over all pairs."""
    if reduction == "pair":
        return (values * pos).sum() / pos.sum().clamp(min=1)
    return ((values * pos).sum((1, 2)) / pos.sum((1, 2)).clamp(min=1)).mean()


def official_rank_loss(sim, candidates, pos, lamb, margin, topk):
    """The official code's Eq. 2 (contrast/loss.py): on s = -2 cos, per image n,
        max(0, lambda * sum_M s / (|M_n| + 1e-6) - mean_i mean_{top-k minus the first} s(C_i, F_neg candidates) + mu),
    averaged over the N images (nn.MarginRankingLoss). The negatives of a cell are the cosines of its k most similar
    non-positive candidates, the most similar dropped, averaged as cosines (not as vectors). A cell with fewer than
    k non-positive teacher cells takes +inf logits into its top-k, so its image's negative term is +inf and the
    hinge gives 0: the whole image drops out with zero gradient, though it still counts in the mean over N.
    sim: N x Ls x Lt, candidates: N x Ls x P (-inf where excluded), pos: N x Ls x Lt float.
    """
    index, valid = hard_negatives(candidates, topk)  # N x Ls x k-1
    short = ~valid.all(-1) if candidates.shape[-1] >= topk else torch.ones_like(valid[..., 0])  # N x Ls
    neg = -2 * candidates.gather(-1, index).masked_fill(~valid, 0)  # N x Ls x k-1, the code's logits
    negatives = neg.mean(-1).mean(-1)  # N
    positives = -2 * (sim * pos).sum((1, 2)) / (pos.sum((1, 2)) + 1e-6)  # N
    per_image = F.relu(lamb * positives - negatives + margin)  # N
    return torch.where(short.any(-1), torch.zeros_like(per_image), per_image).mean()


def clove_step(model, teacher, globals_, locals_, pos_global, pos_local, args, queue=None):
    """The loss of one (micro-)batch: Eq. 2 averaged over every (teacher global view, other student view) pair.

    globals_: N x 2 x 3 x S x S, locals_: N x L x 3 x s x s, pos_global: N x 2 x G^2 x G^2, pos_local:
    N x 2 x L x g^2 x G^2. Returns (loss, teacher features 2 x N x G^2 x D for the queue).
    """
    n, n_local = globals_.shape[0], locals_.shape[1]
    batches = [globals_.transpose(0, 1).flatten(0, 1)]  # 2N x 3 x S x S, view-major: one BN batch per size
    if n_local:
        batches.append(locals_.transpose(0, 1).flatten(0, 1))  # LN x 3 x s x s
    memory_format = common.memory_format(globals_.device, args.channels_last)
    batches = [b.contiguous(memory_format=memory_format) for b in batches]
    outputs = model(*batches)
    student = outputs[0].unflatten(0, (2, n))  # 2 x N x G^2 x D
    with torch.no_grad():
        target = teacher(batches[0])[0].unflatten(0, (2, n))  # 2 x N x G^2 x D
    terms = []
    kw = dict(lamb=args.lamb, margin=args.margin, topk=args.topk_negatives, loss=args.loss,
              queue=None if queue is None else queue.keys, official=args.official_loss, reduction=args.loss_reduction)
    local = outputs[1].unflatten(0, (n_local, n)) if n_local else None  # L x N x g^2 x D
    for t in (0, 1):  # teacher view t is predicted from the other global view and from every local view
        terms.append(clove_loss(student[1 - t], target[t], pos_global[:, t], **kw))
        terms += [clove_loss(local[l], target[t], pos_local[:, t, l], **kw) for l in range(n_local)]
    return torch.stack(terms).mean(), target


# ---- optimiser and schedules ----
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as BYOL, PixPro and CLoVE use it.

    For a parameter p with gradient g: g <- g + wd p; g <- g x trust x ||p|| / ||g|| (when both norms are > 0);
    then heavy-ball momentum. Parameter groups with `lars_exclude=True` (biases and normalisation weights: 1-D
    tensors) get neither weight decay nor the trust ratio, so they move by the raw lr x gradient: the loss's scale
    matters for them, and weight decay makes it matter for the others too (see clove_loss's reduction).
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = torch.where((p_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * p_norm / (g_norm + group["eps"]), torch.ones_like(p_norm))
                    g = g * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def build_optimizer(model, args, lr):
    """LARS (trust 0.001) over two groups: weights get weight decay and the trust ratio; 1-D parameters (biases,
    BN weights) get neither, as BYOL/PixPro/CLoVE."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    exclude = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [dict(params=decay, weight_decay=args.weight_decay, lars_exclude=False),
              dict(params=exclude, weight_decay=0.0, lars_exclude=True)]
    return LARS(groups, lr=lr, momentum=args.sgd_momentum, weight_decay=args.weight_decay, trust_coefficient=0.001)


def learning_rate(step, total, warmup, peak, start_ratio, final_ratio):
    """lr at optimiser step `step` of `total`, as the official code's cosine_scheduler: linear warm-up from
    start_ratio x peak (step 0) to peak (step warmup - 1) over `warmup` steps, then half-cosine from peak to
    final_ratio x peak at `total`."""
    if step < warmup:
        return peak * (start_ratio + (1 - start_ratio) * step / max(warmup - 1, 1))
    return common.cosine(step - warmup, total - warmup, peak, peak * final_ratio)


def epoch_micro_batches(loader, steps, accum_steps):
    """(micro-batch index within its optimiser step, batch) for the next `steps` optimiser steps of an epoch.

    An epoch ends on an optimiser-step boundary: the micro-batches left over after the last whole step (fewer than
    --accum-steps) are dropped, as drop_last drops a partial batch, so no gradient crosses an epoch or a checkpoint,
    and the sampler's resume offset (steps done x per-rank batch x accum_steps) counts every micro-batch used.
    """
    for i, batch in enumerate(itertools.islice(loader, steps * accum_steps)):
        yield i % accum_steps, batch


# ---- training ----
def build_data(args, d):
    views = CLoVEViews(args.image_size, args.local_crops, args.local_size, args.global_scale, args.local_scale,
                       args.t_pos, args.match_coords)
    if args.data is None:
        return common.SyntheticDataset(views, length=args.synthetic_images, size=160, seed=args.seed)
    return common.ImageFolderDataset(args.data, views, seed=args.seed)


def check_args(args, d):
    common.autocast_dtype(d.device, args.precision)  # fp16 on a CPU: a one-line error now, not mid-run
    for flag, size in (("--image-size", args.image_size), ("--local-size", args.local_size)):
        if size % 32 or size <= 0:
            raise common.UserError(f"{flag} {size}: must be a positive multiple of 32 (C5 cells must tile the view)")
    if args.accum_steps < 1 or args.batch_size % (d.world_size * args.accum_steps):
        raise common.UserError(f"--batch-size {args.batch_size}: the global batch must split evenly over "
                               f"{d.world_size} rank(s) x --accum-steps {args.accum_steps}")
    if args.embedding_dim % args.heads:
        raise common.UserError(f"--embedding-dim {args.embedding_dim}: must be divisible by --heads {args.heads}")
    if args.topk_negatives < 2:
        raise common.UserError(f"--topk-negatives {args.topk_negatives}: must be >= 2 (the most similar is dropped)")
    if args.negatives != "intra" and args.queue_size < args.batch_size:
        raise common.UserError(f"--queue-size {args.queue_size}: must hold at least one step's keys "
                               f"(--batch-size {args.batch_size})")
    if args.local_crops < 0:
        raise common.UserError(f"--local-crops {args.local_crops}: must be >= 0")
    if args.official_loss and args.loss_reduction != "image":
        raise common.UserError(f"--loss-reduction {args.loss_reduction}: --official-loss is the official code's "
                               "per-image form; drop one of the two flags")
    if args.official_loss and args.negatives == "intra" and (args.image_size // 32) ** 2 < args.topk_negatives:
        raise common.UserError(f"--image-size {args.image_size}: --official-loss needs at least --topk-negatives "
                               f"{args.topk_negatives} teacher cells per view ((size/32)^2), or every image drops out")


def queue_keys(target, negatives, seed):
    """What a step enqueues from teacher view 0 (N x G^2 x D): one random cell per image, or its pooled map.

    The cells are drawn from a generator seeded by `seed` (run seed, step, micro-batch, rank), not from the global
    RNG, so a resumed run enqueues exactly what an uninterrupted one would.
    """
    if negatives == "inter-avg":
        return F.normalize(target.mean(1), dim=-1)  # N x D
    generator = torch.Generator(target.device).manual_seed(seed)
    cells = torch.randint(target.shape[1], (target.shape[0],), device=target.device, generator=generator)  # N
    return target[torch.arange(target.shape[0], device=target.device), cells]  # N x D


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
    picture_images = common.picture_images(dataset, args.image_size)
    per_rank = args.batch_size // (d.world_size * args.accum_steps)  # micro-batch of one rank
    sampler = common.ResumableSampler(len(dataset), d.rank, d.world_size, args.seed)
    steps_per_epoch = len(sampler) // (per_rank * args.accum_steps)
    if steps_per_epoch == 0:
        raise common.UserError(f"--data {args.data}: {len(dataset)} images are fewer than one batch per rank "
                               f"({per_rank * args.accum_steps})")
    planned_steps = args.epochs * steps_per_epoch  # the schedules follow this; --max-steps only stops early
    total_steps = min(planned_steps, args.max_steps) if args.max_steps else planned_steps
    lr = args.base_lr * args.batch_size / 256
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)

    # ---- model: student f_s (+ predictor), teacher f_t, optional queue ----
    f = CLoVENet(args.arch, args.proj_hidden, args.embedding_dim, args.attention, args.heads,
                 args.attention_temperature, args.projector_final_bn, args.zero_init_residual)
    cuda = d.device.type == "cuda"
    if cuda and d.world_size > 1:
        f = nn.SyncBatchNorm.convert_sync_batchnorm(f)
    teacher = make_teacher(f)
    queue = NegativeQueue(args.queue_size, args.embedding_dim) if args.negatives != "intra" else None
    memory_format = common.memory_format(d.device, args.channels_last)
    f, teacher = f.to(d.device, memory_format=memory_format), teacher.to(d.device, memory_format=memory_format)
    queue = queue.to(d.device) if queue is not None else None
    optimizer = build_optimizer(f, args, lr)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and args.precision == "fp16")

    # ---- resume: rank 0 decides; every rank starts from the same checkpoint ----
    facts = dict(world_size=d.world_size, images=len(dataset))  # exact resumption needs these unchanged too
    ckpt = common.resume_checkpoint(args, ckpt_path, "clove", facts, log, may_change={"base_lr"})
    step = 0
    if ckpt is not None:
        f.load_state_dict(ckpt["model"]), teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"]), scaler.load_state_dict(ckpt["scaler"])
        if queue is not None:
            queue.load_state_dict(ckpt["queue"])
        common.set_rng_states(ckpt["rng"])
        step = ckpt["step"]
    examples = [common.example_images((2 * per_rank, 3, args.image_size, args.image_size), d.device, memory_format)]
    if args.local_crops:  # the shapes clove_step passes: view-major global views, then the local crops
        examples.append(common.example_images((args.local_crops * per_rank, 3, args.local_size, args.local_size),
                                              d.device, memory_format))
    model = common.wrap_ddp(f, d, *examples)

    def save(epoch):
        if d.is_main:
            common.save_checkpoint(ckpt_path, dict(
                method="clove", model=f.state_dict(), teacher=teacher.state_dict(),
                queue=queue.state_dict() if queue is not None else None, optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), epoch=epoch, step=step, args=vars(args), rng=common.rng_states(), facts=facts))

    say(f"CLoVE: {args.arch}, {len(dataset)} images ({args.data or 'embedded synthetic dead leaves'}), global batch "
        f"{args.batch_size} = {d.world_size} rank(s) x {per_rank} x {args.accum_steps} accumulation step(s), "
        f"2 x {args.image_size}px + {args.local_crops} x {args.local_size}px views, lr = {args.base_lr} x "
        f"{args.batch_size}/256 = {lr:g}, {steps_per_epoch} steps/epoch, {total_steps} steps in all, device {d.device}")
    log.write(event="start", step=step, world_size=d.world_size, per_rank_batch=per_rank,
              accum_steps=args.accum_steps, global_batch=args.batch_size, lr=lr, warmup_steps=warmup_steps,
              steps_per_epoch=steps_per_epoch, planned_steps=planned_steps, total_steps=total_steps,
              images=len(dataset))

    # ---- loop ----
    loader = common.make_loader(dataset, sampler, per_rank, args.workers, d.device)
    bar = common.throughput_bar(None, total_steps, d.is_main, initial=step, desc="clove")
    first_loss = last_loss = None
    skipped, step_loss, step_pairs = 0, 0.0, 0.0
    meter, t_start = common.Meter(), time.time()
    f.train(), teacher.train()  # the teacher's BN normalises with batch statistics too (BYOL)
    epoch = step // steps_per_epoch
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=(step % steps_per_epoch) * per_rank * args.accum_steps)
        dataset.set_epoch(epoch)
        batches = epoch_micro_batches(loader, steps_per_epoch - step % steps_per_epoch, args.accum_steps)
        for micro, (globals_, locals_, pos_global, pos_local, n_skipped) in batches:
            step_pairs += float(pos_global[:, 0].sum()) / (len(pos_global) * args.accum_steps)
            globals_ = common.normalize(globals_, d.device)  # N x 2 x 3 x S x S (uint8 -> float on the device)
            locals_ = common.normalize(locals_, d.device)  # N x L x 3 x s x s
            pos_global = pos_global.to(d.device, non_blocking=True)  # N x 2 x G^2 x G^2
            pos_local = pos_local.to(d.device, non_blocking=True)  # N x 2 x L x g^2 x G^2
            skipped += int(n_skipped.sum())

            last_micro = micro == args.accum_steps - 1
            # accumulate locally; DDP all-reduces the gradients only with the last micro-batch
            with contextlib.nullcontext() if last_micro or d.world_size == 1 else model.no_sync():
                with common.autocast(d.device, args.precision):
                    loss, target = clove_step(model, teacher, globals_, locals_, pos_global, pos_local, args, queue)
                loss_value = common.all_reduce_mean(loss.item())
                if not math.isfinite(loss_value):
                    bar.close()
                    raise common.UserError(
                        f"non-finite loss ({loss_value}) at step {step + 1}; stopped without saving, so {ckpt_path} "
                        "still holds the last good state. Lower --base-lr or use --precision fp32")
                scaler.scale(loss / args.accum_steps).backward()
            if queue is not None:
                seed = random.Random(f"{args.seed}/{step}/{micro}/{d.rank}").getrandbits(63)
                queue.enqueue(queue_keys(target[0], args.negatives, seed))
            step_loss += loss_value / args.accum_steps
            if not last_micro:
                continue

            current_lr = learning_rate(step, planned_steps, warmup_steps, lr, args.warmup_start_ratio,
                                       args.min_lr_ratio)
            momentum = teacher_momentum(step, planned_steps, args.ema_momentum)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            update_teacher(teacher, f, momentum)
            step += 1

            first_loss = step_loss if first_loss is None else first_loss
            last_loss = step_loss
            rate = meter.rate(args.batch_size)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{current_lr:.2e}", img_s=f"{rate:.1f}")
            if step % args.log_every == 0 or step == total_steps:
                log.write(step=step, epoch=epoch, loss=step_loss, lr=current_lr, ema_momentum=momentum,
                          positive_pairs_per_image=step_pairs, images_per_s=rate, skipped_files=skipped,
                          elapsed_s=round(time.time() - t_start, 1))
            step_loss, step_pairs = 0.0, 0.0
            if args.save_every and step % args.save_every == 0:
                save(epoch)
            if step >= total_steps:
                break
        save(epoch)  # end of an epoch (or of the run)
        if d.is_main:  # the student's local features F for a few fixed images (VADeR Figures 2 and 5)
            common.feature_picture(f, picture_images, os.path.join(args.output_dir, "features.png"),
                                   forward=f.local_maps)
    bar.close()

    result = dict(method="clove", steps=step, epochs=round(step / steps_per_epoch, 3), first_loss=first_loss,
                  final_loss=last_loss, lr=lr, global_batch=args.batch_size, seconds=round(time.time() - t_start, 1),
                  skipped_files=skipped, checkpoint=ckpt_path)
    log.write(event="end", **result)
    if d.is_main:
        if args.data is None:
            print(f"Trained CLoVE ({args.arch}, 2 x {args.image_size}px + {args.local_crops} x {args.local_size}px "
                  f"views) on {len(dataset)} synthetic dead-leaves images for {step} steps in {result['seconds']} s; "
                  f"loss {first_loss} -> {last_loss} (Eq. 2 is ~mu = {args.margin:g} at the start). Checkpoint: "
                  f"{ckpt_path}; its `encoder.*` weights are a ResNet for the evaluation scripts.")
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
