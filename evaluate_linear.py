"""Transfer evaluation of dense representations: VADeR's frozen-feature linear probe (§4.1, Table 1) and low-label
fine-tuning (§4.2, Figure 4); outside the paper: pooled classification, correspondence accuracy, exports.

The probe trains only a 1x1 convolution on fixed per-pixel features: cross-entropy for semantic segmentation
(PASCAL VOC 2012, Cityscapes), L1 for depth (NYU-depth v2), --trials times. Fine-tuning trains the whole ResNet +
FPN + head on 2..100% of the labels. Every setting of the probe, and whose it is, is in the PROBE table below.
Paper: P. O. Pinheiro et al., "Unsupervised Learning of Dense Visual Representations", NeurIPS 2020.

Usage
    python evaluate_linear.py            # demo: random-init ResNet-18 probed on embedded dead leaves, ~2 min CPU
    python evaluate_linear.py --weights runs/vader-demo/checkpoint.pth          # probe the vader.py demo checkpoint
    python evaluate_linear.py --weights vader.pth --dataset voc --data /data/VOCdevkit/VOC2012       # Table 1, VOC
    python evaluate_linear.py --weights moco_v2_800ep_pretrain.pth.tar --dataset cityscapes --data /data/cityscapes
    python evaluate_linear.py --weights random --arch resnet50 --dataset nyu --data /data/nyu_depth_v2   # lower bound
    torchrun --nproc_per_node=4 evaluate_linear.py --weights vader.pth --dataset voc --data ... \\
        --finetune --label-fraction 0.05                                      # Figure 4, one node
    python evaluate_linear.py --dataset imagefolder      # pooled classification on an embedded set, ~2 min CPU
    python evaluate_linear.py --weights vader.pth --dataset imagefolder --data /data/imagenet   # pooled top-1/top-5
    python evaluate_linear.py --dataset correspondence --weights runs/vader-demo/checkpoint.pth    # 64 px views
    python evaluate_linear.py --dataset correspondence --data /data/imagenet --weights vader.pth  # 224 px views
    python evaluate_linear.py --retrieval --weights vader.pth --dataset voc --data ...   # Hummingbird, no training
    python evaluate_linear.py --weights vader.pth --export-detectron2 vader_r50.pkl      # see export_resnet
    python evaluate_linear.py --weights vader.pth --export-torchvision vader_r50.pth   # torchvision's ResNet keys
--batch-size is global (split over ranks). Results: a table, then one JSON line on stdout and <output-dir>/metrics.json.

Features probed, by --weights (common.dense_feature_model, shared with davis_propagate.py)
    vader.py checkpoint                     VADeR's decoder output, 128 x H/4 x W/4 (its own dense head); from a
                                            run without a decoder (an image-level objective): its encoder, as below
    clove.py checkpoint, a checkpoint of another method (common.WEIGHT_FORMATS: MoCo, DenseCL, PixPro, SlotCon,
    DINO, ...; the encoder its authors transfer), a torchvision ResNet file, or 'random' (--arch)
                                            --layer res5 (default): C5 dilated to 1/4, VADeR's decoder resolution
                                            (§4.1); --layer res4: layer3's output at 1/8 (CRW's and TimeCycle's)

Read in this order (one VOC probe, from main to the metric)
    PROBE                 the settings
    run                   setup, train, score, report
    train_probes          one backbone pass per batch, every trial's LinearProbe takes its step on it
    ProbeBank, LinearProbe  every trial's standardisation + 1x1 convolution
    ProbeFeatures         the features of a batch: from the cache when it fits --cache-gb, else recomputed
    feature_statistics    the standardisation, over all training images
    task_loss, set_lr, sgd_step   cross-entropy or L1, the cosine lr, one SGD step
    evaluate              logits upsampled to each label's native size -> segmentation_scores (mIoU)
Then §4.2 (FinetuneNet, finetune_network, train_finetune), the modes outside the papers (pooled classification,
correspondence, Hummingbird retrieval, exports, feature pictures), the data sets and their input geometry
(Samples), and the arguments.
The NYU-depth v2 preparation is in the notes at the end of this file.
"""
import argparse
import math
import os
import pickle
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from vader import PairedViews, VADeRNet

# ---- the protocol: every setting of the probe (§4.1) and of fine-tuning (§4.2), and whose it is ----
# paper: VADeR §4.1/§4.2 states it; reference: the named code does it (the paper is silent); ours: both are silent.
PROBE = dict(
    geometry="stretch",  # reference: open-hummingbird-eval's Resize((s, s)) of image and mask: each image resized to
    #                      image_size rows x the data set's aspect (VOC square, Cityscapes 1:2, NYU 3:4); no crop
    image_size=224,      # ours: the pre-training view size; Cityscapes 256 (x 512), CityscapesSegmentation
    layer="res5",        # paper: C5 dilated to stride 4 (DeepLab's large field of view), VADeR's decoder at 1/4
    head="1x1 conv",     # paper: a 1x1 convolution on standardised features; init N(0, 0.01), bias 0 (reference: DINO)
    standardise="all",   # ours: per-channel mean and one RMS std over ALL training features (feature_statistics)
    optimizer="sgd",     # reference: MoCo main_lincls and DINO eval_linear: SGD, momentum 0.9
    momentum=0.9,
    weight_decay=1e-4,   # ours (MoCo and DINO use 0 on 1.28 M images; VOC has 10,582)
    lr=0.1,              # ours; depth (L1 on metres) 0.01, whose gradients do not shrink as the probe fits
    depth_lr=0.01,
    schedule="cosine",   # reference: DINO eval_linear, cosine from lr to 0 over all steps
    epochs=20,           # ours
    batch_size=16,       # ours, global
    loss="cross-entropy (ignore 255) / L1 on depths in DEPTH_RANGE",  # paper
    metric="mIoU over one confusion matrix of all validation pixels at native size / RMSE (Eigen crop)",  # reference
    precision="fp32",    # reference: MoCo and DINO evaluate in fp32; --precision bf16/fp16/auto is a flag
    trials=5,            # paper: Table 1 averages 5 trials; ours: they differ in the probe's initialisation only
)
FINETUNE = dict(epochs=30, lr=0.01, batch_size=16)  # §4.2 gives no recipe: ours (SGD, momentum, cosine as PROBE)
IGNORE = 255
UNREADABLE = -100  # the label of an unreadable classification image: F.cross_entropy's ignore_index, never scored
DEPTH_PNG_SCALE = 1000.0  # NYU depth PNGs store millimetres
DEPTH_RANGE = (1e-3, 10.0)  # metres: ground truth outside it is not scored, predictions are clamped to it
EIGEN_CROP = (45, 471, 41, 601)  # rows y0:y1, columns x0:x1 of NYU's 480 x 640 frames that are scored (Eigen et al.)


def run(args):
    """Setup, train, evaluate, report; returns the result that metrics.json and the last stdout line hold."""
    d = common.init_distributed()
    t_start = time.time()
    common.seed_all(args.seed)  # a 'random' backbone is the same on every rank and in every run with this seed
    backbone, description = frozen_backbone(args)
    train_set, val_set = build_datasets(args)
    if not args.finetune and train_set.task == "classification":
        backbone, description = PooledFeatures(backbone), f"{description}, averaged over all positions"
    os.makedirs(args.output_dir, exist_ok=True)
    log = common.JsonLog(os.path.join(args.output_dir, "log.jsonl"), d.is_main)
    # the probe's trials share one labelled subset (--seed); fine-tuning's trial t draws its own (--seed + t)
    subsets = [label_subset(len(train_set), args.label_fraction, args.seed + (t if args.finetune else 0))
               for t in range(args.trials)]
    batch = training_batch(len(subsets[0]), args.batch_size, d.world_size)
    if batch < args.batch_size and d.is_main:
        print(f"--batch-size {args.batch_size}: {len(subsets[0])} training images are fewer than one batch; "
              f"training on the whole set as the batch ({batch} images)")
    args.batch_size = batch  # metrics.json reports the batch trained on
    shape = input_shape(train_set, args.image_size)
    val_loader = validation_loader(val_set, shape, args.batch_size, args.workers, d)
    depth_crop = args.depth_crop == "eigen"
    if d.is_main:
        print(f"{'fine-tuning' if args.finetune else 'frozen probe'} on {data_name(args)} ({train_set.task}): "
              f"{len(subsets[0])} of {len(train_set)} training images (--label-fraction {args.label_fraction}), "
              f"{len(val_set)} validation images, {shape[0]}x{shape[1]} inputs, {args.trials} trial(s) x "
              f"{args.epochs} epochs, {d.world_size} rank(s), device {d.device}, {args.precision}")

    train_seconds, feature_path, skipped = 0.0, None, 0  # training time alone (no validation), for cost comparisons
    if args.finetune:  # one trial at a time: train, then score
        per_trial = []
        for trial, subset in enumerate(subsets):
            t_train = time.time()
            net, description = train_finetune(args.weights, train_set, subset, trial, args, d, log)
            train_seconds += time.time() - t_train
            per_trial += evaluate(lambda images: common.normalize(images, d.device), [net], val_loader,
                                  val_set.task, val_set.num_classes, d, args.precision,
                                  desc=f"val {trial + 1}/{args.trials}", depth_crop=depth_crop)
    else:  # every trial's probe at once, then one validation pass for all
        t_train = time.time()
        backbone = backbone.to(d.device).eval().requires_grad_(False)
        if d.is_main:
            print(f"features: {description}")
        heads, feature_path, skipped = train_probes(backbone, train_set, subsets[0], args, d, log)
        train_seconds = time.time() - t_train
        per_trial = evaluate(lambda images: backbone(common.normalize(images, d.device)), heads, val_loader,
                             val_set.task, val_set.num_classes, d, args.precision, depth_crop=depth_crop)

    result = build_result(args, val_set, description, shape, len(subsets[0]), per_trial, feature_path)
    if val_set.task == "classification":
        train_skipped = int(all_reduce_sum(torch.tensor([skipped], device=d.device)).item())
        result["unreadable_images"] = dict(train=train_skipped, val=per_trial[0]["unreadable"])
        if d.is_main and train_skipped + per_trial[0]["unreadable"]:
            print(f"skipped {train_skipped} training and {per_trial[0]['unreadable']} validation images that "
                  "could not be read (named in the warnings above)")
    result.update(train_seconds=round(train_seconds, 2), seconds=round(time.time() - t_start, 1))
    result = common.finite_or_none(result)
    log.write(event="end", **{k: v for k, v in result.items() if k != "per_trial"})
    if d.is_main:
        print_table(result["per_trial"], result["mean"], result["std"])
        common.print_result(result, os.path.join(args.output_dir, "metrics.json"))
    common.finish_distributed()
    return result


# ---- §4.1: the frozen-feature probe ----
def train_probes(backbone, train_set, subset, args, d, log):
    """Every trial's LinearProbe, trained side by side on the same batches: at each step one backbone pass (or one
    cache look-up) gives the batch's features and every trial's probe takes its SGD step on them, so 5 trials cost
    one trial's backbone passes. The trials differ in one way: trial t's probe is initialised from --seed + t.

    The features are the same whether they are cached or recomputed (ProbeFeatures): the same images in the same
    order (epoch e's permutation is drawn from --seed and e), the standardisation over all training images
    (feature_statistics: one more backbone pass when recomputed), the backbone's output dtype. Returns (probes in
    eval mode, "cached" or "recomputed", the number of unreadable images skipped on this rank)."""
    task, trials = train_set.task, args.trials
    per_rank = max(1, args.batch_size // d.world_size)
    samples = Samples(train_set, shard(subset, d.rank, d.world_size), input_shape(train_set, args.image_size))
    features = ProbeFeatures(backbone, samples, per_rank, args, d)
    steps = len(samples) // per_rank  # an epoch's last partial batch is dropped: a different few images each epoch
    mean, std, mean_depth, skipped = feature_statistics(features, per_rank, task)
    outputs = 1 if task == "depth" else train_set.num_classes
    heads = []
    for t in range(trials):
        torch.manual_seed(args.seed + t)  # the same on every rank
        heads.append(LinearProbe(mean.shape[0], outputs, mean, std))
        if task == "depth":
            nn.init.constant_(heads[-1].conv.bias, mean_depth)
    bank = ProbeBank(heads).to(d.device)
    model = nn.parallel.DistributedDataParallel(bank) if d.world_size > 1 else bank
    optimizer = torch.optim.SGD(bank.parameters(), lr=args.lr, momentum=PROBE["momentum"],
                                weight_decay=args.weight_decay)
    scaler = common.grad_scaler(d.device, args.precision)
    bar = common.throughput_bar(None, args.epochs * steps, d.is_main, desc=f"probe x{trials}")
    for epoch in range(args.epochs):
        running = torch.zeros(trials, dtype=torch.float64)
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for step, (x, labels) in enumerate(features.batches(order[:steps * per_rank].view(steps, per_rank))):
            lr = set_lr(optimizer, epoch * steps + step, args.epochs * steps, args.lr)
            with common.autocast(d.device, args.precision):
                losses = torch.stack([task_loss(out, labels, task) for out in model(x)])  # T
            sgd_step(optimizer, scaler, losses.sum())  # the heads share no parameter: each gets its own gradient
            losses = losses.detach().double().cpu()
            running += losses
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses.mean()):.3f}", lr=f"{lr:.1e}")
        log_epoch(log, "probe", range(trials), epoch, running / steps, lr, d)
    bar.close()
    return [head.eval() for head in heads], features.path, skipped


class LinearProbe(nn.Module):
    """§4.1's linear predictor: standardisation and a 1x1 convolution. Both are affine, so the probe is exactly one
    1x1 conv on the raw features.

    The statistics are fixed, from the training features: a per-channel mean and one overall scale (the RMS of the
    channels' std). The paper leaves this open; it lets one learning rate fit VADeR's small decoder outputs and a
    dilated ResNet's large C5 activations alike, and one scale rather than one per channel does not blow up
    near-constant channels."""

    def __init__(self, channels, outputs, mean, std):
        super().__init__()
        self.register_buffer("mean", mean)  # C
        self.register_buffer("std", std)  # C
        self.conv = nn.Conv2d(channels, outputs, 1)
        # small initial weights (the DINO/MAE linear-probe convention): classes absent from the training labels then
        # stay near-zero logits instead of winning scattered pixels with a random projection
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features):  # features: N x C x h x w
        # conv((x - mean) / std) with the standardisation folded into the weights: no pass over the features
        weight = self.conv.weight / self.std.view(1, -1, 1, 1)  # K x C x 1 x 1
        bias = self.conv.bias - (weight * self.mean.view(1, -1, 1, 1)).sum((1, 2, 3))  # K
        return F.conv2d(features, weight, bias)  # N x K x h x w


class ProbeFeatures:
    """The frozen features of this rank's training images (`samples`, a Samples), in the backbone's output dtype,
    batch by batch on the device: `batches(rows)` yields (features, labels) for each row of positions in `rows`.

    `path` "cached": computed once and kept in host memory (the probe uses no augmentation, so every epoch can read
    them); "recomputed": the backbone runs on every batch, when the cache would exceed --cache-gb (VOC train_aug
    with a dilated ResNet-50 in fp32 would need ~270 GB). Both give the same features for the same positions, so the
    cache is a speed-up only."""

    def __init__(self, backbone, samples, per_rank, args, d):
        self.backbone, self.samples, self.workers, self.precision, self.d = backbone, samples, args.workers, \
            args.precision, d
        image, label, _ = samples[0]
        f = self.compute(image[None])
        gb = len(samples) * (f[0].numel() * f.element_size() + label.numel() * label.element_size()) / 1e9
        self.path = "cached" if gb <= args.cache_gb else "recomputed"
        self.features = self.labels = None
        if self.path == "cached":
            self.features = torch.empty(len(samples), *f.shape[1:], dtype=f.dtype)
            self.labels = torch.empty(len(samples), *label.shape, dtype=label.dtype)
            rows = torch.arange(len(samples)).split(per_rank)
            for (x, labels), r in zip(self.recompute(rows, "features"), rows):
                self.features[r], self.labels[r] = x.cpu(), labels.cpu()
        if d.is_main:
            print(f"probe: {f.shape[1]}-d {str(f.dtype)[6:]} features at {f.shape[2]}x{f.shape[3]}, "
                  + (f"cached ({gb:.2f} GB on this rank)" if self.path == "cached" else
                     f"recomputed each epoch (a cache would need {gb:.1f} GB > --cache-gb {args.cache_gb})"))

    @torch.no_grad()
    def compute(self, images):
        """The frozen backbone's features of a batch of uint8 images, on the device. A function, not a `with` block
        around a `yield`: grad mode and autocast are thread-global, so a generator suspended inside no_grad()
        switches off the gradients of whatever its consumer runs (the probes' training)."""
        with common.autocast(self.d.device, self.precision):
            return self.backbone(common.normalize(images, self.d.device))  # N x C x h x w

    def recompute(self, rows, desc=None):
        """The backbone run on each row of `rows`: the images decoded by --workers loader processes."""
        batches = torch.utils.data.DataLoader(self.samples, batch_sampler=[r.tolist() for r in rows],
                                              num_workers=self.workers, pin_memory=self.d.device.type == "cuda")
        if desc:
            batches = common.throughput_bar(batches, len(rows), self.d.is_main, desc=desc)
        for images, labels, _ in batches:
            yield self.compute(images), labels.to(self.d.device, non_blocking=True)

    def batches(self, rows):
        """(features, labels) on the device for each row of `rows` (positions in `samples`), in order."""
        if self.path == "recomputed":
            yield from self.recompute(rows)
            return
        for r in rows:
            yield self.features[r].to(self.d.device), self.labels[r].to(self.d.device)


def feature_statistics(features, per_rank, task):
    """Per-channel mean and one overall std (the channels' RMS std) of the training features of every rank, over
    all of them, the mean measured training depth, and the number of unreadable images on this rank (skipped:
    classification's zeros do not count). One pass in the images' order, summed in float64."""
    total, skipped = None, 0
    for f, labels in features.batches(torch.arange(len(features.samples)).split(per_rank)):
        if task == "classification":
            skipped += int((labels == UNREADABLE).sum())
            f = f[labels != UNREADABLE]
        depth = labels[(labels > DEPTH_RANGE[0]) & (labels < DEPTH_RANGE[1])] if task == "depth" else labels[:0]
        part = torch.cat([f.sum((0, 2, 3), dtype=torch.float64), f.double().square().sum((0, 2, 3)),
                          torch.tensor([f.shape[0] * f.shape[2] * f.shape[3], depth.double().sum(), depth.numel()],
                                       dtype=torch.float64, device=f.device)])  # 2C + 3
        total = part if total is None else total + part
    total = all_reduce_sum(total).cpu()
    c = (total.shape[0] - 3) // 2
    mean = total[:c] / total[2 * c]  # C
    variance = (total[c:2 * c] / total[2 * c] - mean ** 2).clamp(min=0)  # C
    std = variance.mean().sqrt().clamp(min=1e-6).expand(c)  # C: one scale for all channels, their RMS std
    return mean.float(), std.float().contiguous(), float(total[2 * c + 1] / total[2 * c + 2].clamp(min=1.0)), skipped


class ProbeBank(nn.ModuleList):
    """Every trial's LinearProbe: each one's output on the same features, T x [N x K x h x w]."""

    def forward(self, features):  # features: N x C x h x w
        return [head(features) for head in self]


def task_loss(outputs, labels, task):
    """Cross-entropy (ignore 255) on class ids, or L1 on the pixels with depth in DEPTH_RANGE, after upsampling the
    dense outputs to the label size (§4.1); classification: cross-entropy on the pooled logits (N x K x 1 x 1) of the
    readable images."""
    if task == "classification":
        readable = labels != UNREADABLE
        logits = outputs.float().flatten(1)
        return F.cross_entropy(logits[readable], labels[readable]) if readable.any() else logits.sum() * 0
    outputs = F.interpolate(outputs.float(), size=labels.shape[-2:], mode="bilinear",
                            align_corners=False)  # N x K x H x W
    if task == "segmentation":
        return F.cross_entropy(outputs, labels.long(), ignore_index=IGNORE)  # uint8 labels become int64 on the device
    valid = (labels > DEPTH_RANGE[0]) & (labels < DEPTH_RANGE[1])  # N x H x W
    return (outputs[:, 0] - labels).abs()[valid].mean() if valid.any() else outputs.sum() * 0


def set_lr(optimizer, step, total, peak):
    """The cosine learning rate of `step` of `total`, set on every parameter group; returns it."""
    lr = common.cosine(step, total, peak, 0.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def sgd_step(optimizer, scaler, loss):
    """One SGD step on `loss`. `scaler` (common.grad_scaler: enabled for fp16 only) scales the loss before backward
    and unscales before the step: a mean over ~10^5-10^6 pixels gives per-logit gradients of ~2e-5, below fp16's
    smallest normal number (6.1e-5), which fp16 stores with a few bits or flushes to zero."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped (and the scale lowered) when a scaled gradient overflowed
    scaler.update()


def log_epoch(log, mode, trials, epoch, losses, lr, d):
    """Each trial's mean training loss of the epoch (averaged over ranks) to log.jsonl; a non-finite one stops."""
    means = all_reduce_sum(losses.to(d.device)).cpu() / d.world_size
    for trial, value in zip(trials, means.tolist()):
        if not math.isfinite(value):
            name = "probe" if mode == "probe" else "fine-tuning"
            raise common.UserError(f"non-finite {name} loss at trial {trial} epoch {epoch}; lower --lr")
        log.write(mode=mode, trial=trial, epoch=epoch, loss=value, lr=lr)


@torch.no_grad()
def evaluate(encode, heads, val_loader, task, num_classes, d, precision, desc="val", depth_crop=True):
    """Scores of every head on the validation set; `encode` maps a batch of uint8 images, as the loader gives them,
    to the heads' input on the device (the frozen features, or the normalised images), once per batch.

    Dense logits are upsampled bilinearly to each label's native size. Counts are summed over ranks, so the result
    is the same as one process scoring the whole set. A score with nothing to count (no depth pixel in range) is
    None. Classification also gives `unreadable` (an int, not a score): the images skipped as UNREADABLE.
    """
    k = len(heads)
    confusion = torch.zeros(k, num_classes, num_classes, dtype=torch.long)
    sums = torch.zeros(k, 4, dtype=torch.float64)  # depth: sum of RMSE, abs-rel, delta1, images; top-1, top-5, images
    for images, labels, _ in common.throughput_bar(val_loader, len(val_loader), d.is_main, desc=desc):
        with common.autocast(d.device, precision):
            features = encode(images)  # N x C x h/4 x w/4 (or x 1 x 1)
            outputs = [head(features).float() for head in heads]  # k x [N x K x h/4 x w/4]
        if task == "classification":
            target = torch.stack(labels)  # N
            keep = target != UNREADABLE
            for h, out in enumerate(outputs):
                sums[h] += torch.tensor([*topk_correct(out.flatten(1).cpu()[keep], target[keep]), int(keep.sum()),
                                         int((~keep).sum())], dtype=torch.float64)
            continue
        for j, label in enumerate(labels):
            for h, out in enumerate(outputs):
                up = F.interpolate(out[j:j + 1], size=label.shape, mode="bilinear", align_corners=False)[0]  # K x H x W
                if task == "segmentation":
                    confusion[h] += confusion_matrix(up.argmax(0).cpu(), label, num_classes)
                else:
                    errors = depth_image_errors(up[0].cpu(), label, crop=depth_crop)
                    if errors is not None:
                        sums[h] += torch.tensor([*errors, 1.0], dtype=torch.float64)
    if task == "segmentation":
        return [segmentation_scores(c) for c in all_reduce_sum(confusion.to(d.device)).cpu()]
    sums = all_reduce_sum(sums.to(d.device)).cpu().tolist()
    if task == "classification":
        return [dict(top1=s[0] / s[2] if s[2] else None, top5=s[1] / s[2] if s[2] else None, unreadable=int(s[3]))
                for s in sums]
    return [dict(rmse=s[0] / s[3], abs_rel=s[1] / s[3], delta1=s[2] / s[3]) if s[3] else
            dict(rmse=None, abs_rel=None, delta1=None) for s in sums]


def confusion_matrix(pred, target, num_classes):
    """K x K counts, rows = ground truth, columns = prediction; pixels labelled 255 (or >= K) are skipped."""
    pred, target = pred.flatten().long(), target.flatten().long()
    keep = target < num_classes  # drops IGNORE
    return torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(
        num_classes, num_classes)


def segmentation_scores(confusion):
    """From one confusion matrix over all validation pixels: IoU_c = TP / (TP + FP + FN), mIoU over the classes
    present in ground truth or prediction, pixel accuracy, and per-class IoU (None when a class never occurs)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp  # TP + FP + FN
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    return dict(miou=float(iou[present].mean()) if present.any() else 0.0,
                pixel_acc=float(tp.sum() / confusion.sum().clamp(min=1)),
                per_class_iou=[float(v) if p else None for v, p in zip(iou, present)])


def eigen_crop_mask(shape):
    """H x W bool mask of the scored region: rows 45:471, columns 41:601 of a 480 x 640 frame (the border of NYU's
    labelled frames has no valid depth; Eigen et al. 2014 and e.g. BTS's eval_with_pngs.py); other sizes get the same
    fractions of their rows and columns."""
    h, w = shape
    y0, y1, x0, x1 = EIGEN_CROP
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[round(y0 * h / 480):round(y1 * h / 480), round(x0 * w / 640):round(x1 * w / 640)] = True
    return mask


def depth_image_errors(pred, gt, crop=True):
    """(RMSE, abs-rel, delta1) of one image over the pixels with ground truth in DEPTH_RANGE (strictly inside, as in
    BTS) and, with `crop`, inside the Eigen crop; predictions are clamped to DEPTH_RANGE. None when no pixel counts.
    abs-rel = mean |pred - gt| / gt; delta1 = the fraction with max(pred / gt, gt / pred) < 1.25. The scores are
    averaged over images (Eigen et al.)."""
    valid = (gt > DEPTH_RANGE[0]) & (gt < DEPTH_RANGE[1])
    if crop:
        valid &= eigen_crop_mask(gt.shape)
    if not valid.any():
        return None
    p, g = pred[valid].double().clamp(*DEPTH_RANGE), gt[valid].double()
    rmse = float(((p - g) ** 2).mean().sqrt())
    abs_rel = float(((p - g).abs() / g).mean())
    delta1 = float((torch.maximum(p / g, g / p) < 1.25).double().mean())
    return rmse, abs_rel, delta1


def summarise(per_trial):
    """Mean and sample std (0 for one trial) of every scalar metric over the trials; None where a trial has None."""
    names = [k for k, v in per_trial[0].items() if v is None or isinstance(v, float)]
    values = {k: [t[k] for t in per_trial] for k in names}
    mean = {k: None if None in v else float(np.mean(v)) for k, v in values.items()}
    std = {k: None if None in v else float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, std


def all_reduce_sum(tensor):
    """`tensor` summed over the ranks, in place (unchanged in a single process)."""
    if common.distributed():
        dist.all_reduce(tensor)
    return tensor


# ---- §4.2: fine-tuning on a fraction of the labels ----
class FinetuneNet(nn.Module):
    """§4.2's network, the same for every initialisation: VADeRNet (ResNet + FPN with batch norm + semantic merge)
    and a 1x1 convolution."""

    def __init__(self, arch, outputs, dim=128):
        super().__init__()
        self.body = VADeRNet(arch, dim, fpn_norm=nn.BatchNorm2d)
        self.head = nn.Conv2d(dim, outputs, 1)

    def forward(self, x):  # x: N x 3 x h x w
        return self.head(self.body(x))  # N x K x h/4 x w/4


def finetune_network(weights, arch, outputs):
    """FinetuneNet initialised from `weights` (same kinds as the probe). Returns (network, description).

    A vader.py checkpoint fills encoder, FPN convolutions and decoder; the FPN batch norms are new and the FPN
    convolution biases are dropped (the batch norm that follows each convolution makes them redundant). Every other
    kind fills the encoder only (§4.2: the baselines start with a random decoder).
    """
    if weights == "random":
        return FinetuneNet(arch, outputs), f"random init ({arch}, VADeRNet with BN-FPN)"
    kind, state, meta = common.read_weights(weights)
    arch = meta.get("arch") or common.infer_arch(state) or arch
    if kind == "vader":
        net = FinetuneNet(arch, outputs, dim=meta["args"].get("embedding_dim", 128))
        # fpn.{inner,layer}_blocks.i.0.weight is the convolution with or without a norm layer after it (.1.*)
        kept = {k: v for k, v in state.items() if not (k.startswith("fpn.") and k.endswith(".0.bias"))}
        missing, unexpected = net.body.load_state_dict(kept, strict=False)
        not_norms = [k for k in missing if not (k.startswith("fpn.") and ".1." in k)]
        if not_norms or unexpected:
            raise common.UserError(f"{weights}: vader checkpoint does not fit VADeRNet({arch}) "
                                   f"(missing {not_norms[:2]}, unexpected {unexpected[:2]})")
        return net, f"vader checkpoint {weights} ({arch}, encoder + FPN + decoder; FPN batch norms new)"
    net = FinetuneNet(arch, outputs)
    common.load_resnet_state(net.body.encoder, common.encoder_state(state) if kind == "clove" else state, weights)
    return net, f"{kind} weights {weights} ({arch}, encoder only; FPN and decoder random)"


def train_finetune(weights, train_set, subset, trial, args, d, log):
    """§4.2: one FinetuneNet trained end to end on `subset`, with the probe's optimiser and schedule (FINETUNE's
    epochs and lr); returns (the unwrapped network in eval mode, its description). Trial t is the run of seed
    --seed + t: its initialisation of the random parts, labelled subset, batch order and augmentation. Under DDP on
    GPUs every batch norm becomes SyncBN; PyTorch has none on CPU, so CPU runs keep per-rank statistics. A depth
    head's bias starts at the mean measured depth of the first 20 training images."""
    seed, task = args.seed + trial, train_set.task
    outputs = train_set.num_classes if task == "segmentation" else 1
    torch.manual_seed(seed)  # the random parts (FPN, decoder, head): same on every rank
    net, description = finetune_network(weights, args.arch, outputs)
    if task == "depth":
        nn.init.constant_(net.head.bias, float(np.mean([l[l > 0].mean() for l in
                                                        (train_set.read(i)[1] for i in subset[:20])])))
    net = net.to(d.device)
    model = net
    if d.world_size > 1:
        if d.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        device_ids = [d.device] if d.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    per_rank = max(1, args.batch_size // d.world_size)
    indices = shard(subset, d.rank, d.world_size)
    samples = Samples(train_set, indices, input_shape(train_set, args.image_size), augment=True, seed=seed)
    steps = len(indices) // per_rank
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=PROBE["momentum"],
                                weight_decay=args.weight_decay)
    scaler = common.grad_scaler(d.device, args.precision)
    model.train()
    bar = common.throughput_bar(None, args.epochs * steps, d.is_main, desc=f"finetune {trial + 1}/{args.trials}")
    for epoch in range(args.epochs):
        samples.set_epoch(epoch)
        running = torch.zeros(1, dtype=torch.float64)
        batches = loader(samples, per_rank, args.workers, d.device, shuffle_seed=seed * 1000 + epoch, drop_last=True)
        for step, (images, labels, _) in enumerate(batches):
            lr = set_lr(optimizer, epoch * steps + step, args.epochs * steps, args.lr)
            with common.autocast(d.device, args.precision):
                loss = task_loss(model(common.normalize(images, d.device)), labels.to(d.device), task)
            sgd_step(optimizer, scaler, loss)
            loss = float(loss.detach())
            running += loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        log_epoch(log, "finetune", [trial], epoch, running / steps, lr, d)
    bar.close()
    return net.eval(), description


# ---- a run's set-up and report ----
def frozen_backbone(args):
    """(model, description) of the frozen features the probes read; (None, None) with --finetune, whose network
    train_finetune builds for each trial. Either way an unknown weights file fails here, before the data are read."""
    if args.finetune:
        if args.weights != "random":
            common.read_weights(args.weights)
        return None, None
    return common.dense_feature_model(args.weights, args.arch, {"vader": VADeRNet}, args.layer)


def label_subset(n, fraction, seed):
    """The sorted indices of round(fraction x n) training images (at least 1), fixed by `seed`. Fine-tuning's trial t
    draws with seed --seed + t, so below --label-fraction 1 its trials also measure the spread over labelled subsets;
    the probe's trials share the subset of --seed."""
    keep = max(1, int(round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:keep].tolist())


def training_batch(train_images, batch_size, world_size):
    """The global batch: --batch-size, or, for a set smaller than one batch per rank, the whole set (each rank's
    share of it, padded as `shard` pads), so that every epoch is one step. A probe trains on a small batch as well;
    refusing would leave a small held-out set without a score."""
    return min(batch_size, math.ceil(train_images / world_size) * world_size)


def shard(indices, rank, world):
    """This rank's share of `indices`, padded by wrapping around them (as many times as needed: 1 image on 4 ranks
    is 4 copies) so every rank gets the same count, hence the same number of steps and collectives."""
    per_rank = math.ceil(len(indices) / world)
    padded = [indices[k % len(indices)] for k in range(per_rank * world)]
    return padded[rank::world]


def validation_loader(val_set, shape, batch_size, workers, d):
    """This rank's share of the validation images (no padding: every image is scored once), labels at native size."""
    samples = Samples(val_set, list(range(len(val_set)))[d.rank::d.world_size], shape, native_labels=True)
    return loader(samples, max(1, batch_size // d.world_size), workers, d.device, collate=collate_native)


def data_name(args):
    """The data set's name in the report: --dataset, or which embedded set."""
    return args.dataset if args.data else "synthetic-objects" if args.dataset == "imagefolder" else "synthetic"


def trials_differ_in(finetune, label_fraction):
    """What separates the trials, for metrics.json."""
    if finetune:
        subset = ", labelled subset" if label_fraction < 1 else ""
        return f"seed + t: network initialisation (FPN, decoder, head), batch order, augmentation{subset}"
    return "probe initialisation (seed + t) only: every trial trains on the same batches of the same images"


def build_result(args, val_set, model, shape, train_images, per_trial, feature_path):
    """The run's report (metrics.json and the last line on stdout), timings apart."""
    task, num_classes = val_set.task, val_set.num_classes
    mean, std = summarise(per_trial)
    result = dict(mode="finetune" if args.finetune else "probe", dataset=data_name(args), task=task,
                  weights=args.weights, weights_format=common.weights_format(args.weights), model=model,
                  label_fraction=args.label_fraction, trials=args.trials,
                  trials_differ_in=trials_differ_in(args.finetune, args.label_fraction), epochs=args.epochs,
                  lr=args.lr, batch_size=args.batch_size, image_size=list(shape), precision=args.precision,
                  train_images=train_images, val_images=len(val_set), mean=mean, std=std,
                  per_trial=[{k: v for k, v in t.items() if v is None or isinstance(v, float)} for t in per_trial])
    if feature_path:
        result["probe_features"] = feature_path
    if task == "segmentation":
        ious = np.array([[np.nan if v is None else v for v in t["per_class_iou"]] for t in per_trial])
        result["per_class_iou"] = [None if np.isnan(c).all() else float(np.nanmean(c)) for c in ious.T]
    if task == "depth":
        eigen = args.depth_crop == "eigen"
        result["depth_eval"] = dict(crop=list(EIGEN_CROP) if eigen else None, crop_of="480x640" if eigen else None,
                                    range_m=list(DEPTH_RANGE))
    if task == "classification":
        result["classes"] = num_classes
        result["top5_k"] = min(5, num_classes)
    return result


def print_table(per_trial, mean, std):
    """The scores of every trial, their mean and std, as a plain table before the JSON line."""
    names = list(mean)

    def cell(v):
        return f"{v:>10.4f}" if v is not None else f"{'-':>10}"

    print("trial  " + "  ".join(f"{n:>10}" for n in names))
    for t, scores in enumerate(per_trial):
        print(f"{t:>5}  " + "  ".join(cell(scores[n]) for n in names))
    print(" mean  " + "  ".join(cell(mean[n]) for n in names))
    print("  std  " + "  ".join(cell(std[n]) for n in names))


# ---- modes outside the papers: pooled classification, correspondence, retrieval, exports, feature pictures ----
# Each is its own function, chosen in main.
POOLED = dict(epochs=100, batch_size=256)  # --dataset imagefolder: ours (the probe's settings otherwise)
class PooledFeatures(nn.Module):
    """The classification probe's input: a dense feature model's output averaged over all positions, N x C x 1 x 1,
    so a LinearProbe on 1 x 1 maps is the linear classifier (VADeR's reviews, Reviewer 4: "results on classification
    by pooling the learnt features"). MoCo's linear classification differs: C5 at stride 32 (not dilated),
    RandomResizedCrop + flip each epoch, lr 30, no weight decay, no standardisation; ours sees each training image
    once, centre-cropped, like the dense probe."""

    def __init__(self, dense):
        super().__init__()
        self.dense = dense

    def forward(self, x):
        return self.dense(x).float().mean((2, 3), keepdim=True)  # N x C x 1 x 1


def topk_correct(logits, target, ks=(1, 5)):
    """How many rows of `logits` (N x K) have their `target` among the k highest scores, for each k (capped at K)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # N x k
    hits = ranked == target[:, None]
    return [int(hits[:, :k].any(1).sum()) for k in ks]


EMBEDDED_IMAGE_SIZE = 160  # the embedded dead leaves of vader.py's demo (common.ViewDataset), from which views are cut
CORRESPONDENCE_MATCHES = 32  # matched view-1 cells per pair: vader.py's --num-matches


class CorrespondencePairs(torch.utils.data.Dataset):
    """Item i: (view1, view2, matches, appearance) of image i as vader.py trains on them: `views` (a
    vader.PairedViews) cuts the two crops with flips, draws their colour ops (applied on the device by
    correspondence_scores) and gives the matches, M x 4 = view-1 cell, view-2 cell, x, y on the
    (S/4)^2 grids. Each pair is drawn from (seed, i), so every --weights sees the same pairs. The images are `files`,
    or embedded dead leaves (`leaves`, from index `first`); an unreadable file is skipped by name (None)."""

    def __init__(self, views, seed, files=None, leaves=None, length=0, first=0):
        self.views, self.seed, self.files, self.leaves, self.first = views, seed, files, leaves, first
        self.length = len(files) if files else length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not self.files:
            return self.views(self.leaves.image(self.first + i)[0], common.sample_rng(self.seed, 0, i))
        try:
            image = common.load_image(self.files[i])
        except common.UNREADABLE_ERRORS as e:
            common.warn_unreadable(self.files[i], e)
            return None
        return self.views(image, common.sample_rng(self.seed, 0, i))


def collate_pairs(batch):
    """(view1s, view2s, matches, appearance, number skipped) of the readable items of a batch (None when there is
    none)."""
    items = [b for b in batch if b is not None]
    stacked = [torch.stack(parts) for parts in zip(*items)] if items else [None] * 4
    return (*stacked, len(batch) - len(items))


def correspondence_pairs(args):
    """The pairs of --dataset correspondence: the embedded validation dead leaves (as the probe's: index 10^6 on),
    or the images of --data (DIR/val when it exists, else every image below DIR)."""
    views = PairedViews(args.image_size, CORRESPONDENCE_MATCHES)
    if args.data is None:
        leaves = common.DeadLeaves(size=EMBEDDED_IMAGE_SIZE, seed=args.seed)
        return CorrespondencePairs(views, args.seed, leaves=leaves, length=args.synthetic_val, first=10**6)
    val = os.path.join(args.data, "val")
    return CorrespondencePairs(views, args.seed, files=common.list_images(val if os.path.isdir(val) else args.data))


def match_scores(f1, f2, matches):
    """For each matched view-1 cell: is the view-2 cell most similar to it (cosine), among ALL cells of view 2, its
    match (top1), and within one cell of it (Chebyshev distance <= 1 on the grid: within_one)? argmax takes the
    first of tied cells, so a constant feature map scores chance (about 1 / G^2), not 1.
    f1, f2: N x C x G x G features of the two views; matches: N x M x 4 (PairedViews). Returns two N x M bools."""
    grid = f2.shape[-1]
    q = F.normalize(f1.float().flatten(2), dim=1)  # N x C x G^2
    k = F.normalize(f2.float().flatten(2), dim=1)  # N x C x G^2
    q = q.gather(2, matches[:, None, :, 0].expand(-1, q.shape[1], -1))  # N x C x M: the matched view-1 cells
    best = torch.bmm(q.transpose(1, 2), k).argmax(2)  # N x M: the most similar view-2 cell
    true = matches[:, :, 1]  # N x M
    distance = torch.maximum((best // grid - true // grid).abs(), (best % grid - true % grid).abs())
    return best == true, distance <= 1


def within_one_chance(cells, grid):
    """What a uniformly random view-2 cell scores on within_one: the share of the grid within one cell of each true
    cell (4 / G^2 in a corner, 9 / G^2 inside)."""
    r, c = cells // grid, cells % grid
    rows = (r + 1).clamp(max=grid - 1) - (r - 1).clamp(min=0) + 1
    cols = (c + 1).clamp(max=grid - 1) - (c - 1).clamp(min=0) + 1
    return (rows * cols).double() / grid ** 2


@torch.no_grad()
def correspondence_scores(model, loader, grid, d, precision):
    """top1 and within_one (fractions of the matched view-1 cells) with their chance levels, summed over ranks;
    `model` maps normalised N x 3 x S x S views to N x C x G x G features, G = `grid`."""
    sums = torch.zeros(5, dtype=torch.float64)  # top1 hits, within-one hits, queries, within-one chance, skipped
    for view1, view2, matches, appearance, skipped in common.throughput_bar(loader, len(loader), d.is_main,
                                                                           desc="pairs"):
        sums[4] += skipped
        if view1 is None:
            continue
        views = torch.cat([view1, view2]).to(d.device)  # uint8, coloured on the device as in training
        with common.autocast(d.device, precision):
            x = common.apply_appearance(views, torch.cat([appearance[:, 0], appearance[:, 1]]).to(d.device))
            f1, f2 = model(x).chunk(2)  # N x C x G x G each
        top1, within = match_scores(f1, f2, matches.to(d.device))
        sums[:4] += torch.tensor([top1.sum().item(), within.sum().item(), top1.numel(),
                                  within_one_chance(matches[:, :, 1], grid).sum().item()], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(d.device)).cpu().tolist()
    queries = max(sums[2], 1.0)
    return dict(top1=sums[0] / queries, within_one=sums[1] / queries, queries=int(sums[2]),
                chance=dict(top1=1 / grid ** 2, within_one=sums[3] / queries), unreadable=int(sums[4]))


def correspondence(args):
    """--dataset correspondence: the frozen features of --weights on view pairs (correspondence_pairs), scored by
    correspondence_scores; one JSON line and metrics.json. The grid is S/4 (S = --image-size: 64 for the embedded
    demo views, 224 for ImageNet's); a VADeR checkpoint gives its decoder output, other weights the dilated C5."""
    d = common.init_distributed()
    t_start = time.time()
    common.seed_all(args.seed)
    model, description = common.dense_feature_model(args.weights, args.arch, {"vader": VADeRNet}, args.layer)
    model = model.to(d.device).eval().requires_grad_(False)
    grid = args.image_size // 4
    with torch.no_grad():
        h, w = model(common.normalize(torch.zeros(1, 3, args.image_size, args.image_size), d.device)).shape[-2:]
    if (h, w) != (grid, grid):
        raise common.UserError(f"--weights {args.weights} --layer {args.layer}: features at {h}x{w} for "
                               f"{args.image_size} px views, not the {grid}x{grid} grid of the matches (1/4); "
                               "correspondence needs features at 1/4 (--layer res5 or a VADeR checkpoint)")
    pairs = correspondence_pairs(args)
    mine = torch.utils.data.Subset(pairs, range(d.rank, len(pairs), d.world_size))
    loader = torch.utils.data.DataLoader(mine, batch_size=max(1, args.batch_size // d.world_size),
                                         num_workers=args.workers, collate_fn=collate_pairs,
                                         pin_memory=d.device.type == "cuda")
    if d.is_main:
        print(f"correspondence on {args.data or 'synthetic'}: {len(pairs)} view pairs of {args.image_size} px "
              f"({grid}x{grid} cells, {CORRESPONDENCE_MATCHES} matched cells each), features: {description}")
    scores = correspondence_scores(model, loader, grid, d, args.precision)
    result = dict(mode="correspondence", dataset=args.data or "synthetic", weights=args.weights, model=description,
                  image_size=args.image_size, grid=grid, pairs=len(pairs) - scores["unreadable"], **scores,
                  seconds=round(time.time() - t_start, 1))
    if d.is_main:
        print(f"top1 {result['top1']:.4f} (chance {result['chance']['top1']:.4f}), within one cell "
              f"{result['within_one']:.4f} (chance {result['chance']['within_one']:.4f})")
        common.print_result(result, os.path.join(args.output_dir, "metrics.json"))
    common.finish_distributed()
    return result


# Dense nearest-neighbour retrieval (Hummingbird).
# Balazevic et al., "Towards In-context Scene Understanding", NeurIPS 2023, as its open implementation
# (vpariza/open-hummingbird-eval, hbird_eval.py) runs it: no training, a memory of labelled training patches and a
# k-NN vote. --retrieval; the reference's settings and their flags:
#   input size   512 x 512 for ViT-S/16 and B/16 (its README's table)  --image-size, default 512 with --retrieval
#   patch grid   its ViT's 1/16                                       here the probe's --layer: 1/4 (res5), 1/8 (res4)
#   memory       1024 x 10^2, 10^3 or 10^4 patches (its table)        --memory-size, default 1024 x 10^2 (0: all)
#   neighbours   k = 30, exact here (its ScaNN / faiss are approximate) --neighbours
#   temperature  softmax(cos / 0.02) over the k                       --retrieval-temperature
# Differences, each for a reason: the memory is built from one unaugmented pass over the training images at the
# probe's input size (the reference draws RandomResizedCrop(0.5-2) and colour-jitter copies); void pixels are left
# out of a patch's histogram (the reference counts them as class 0, background on VOC but road on Cityscapes); the
# scores are the probe's (bilinear upsampling to each label's native size, segmentation_scores), where the
# reference resizes the labels to the input square and matches the predicted to the true classes by Hungarian
# assignment (the identity unless a class is never predicted).
RETRIEVAL_QUERIES = 4096  # queries a memory pass serves: on a GPU the matrix product stays compute-bound
RETRIEVAL_CHUNK = 2 ** 26  # query x memory similarities held at once: 256 MB in fp32


def patch_histograms(labels, stride, num_classes):
    """Each patch's soft label, the class histogram of its labelled pixels, and whether it has one: labels N x h x w
    (class ids, void 255) on the input grid -> N x P x K fractions and N x P bools, P = (h / stride)(w / stride)."""
    n, h, w = labels.shape
    ids = labels.long().clamp(max=num_classes)  # void (and any id >= K) -> K, dropped below
    rows, cols = torch.arange(h) // stride, torch.arange(w) // stride
    patch = rows[:, None] * (w // stride) + cols[None, :]  # h x w: the patch each pixel is in
    patches = (h // stride) * (w // stride)
    index = (torch.arange(n)[:, None, None] * patches + patch) * (num_classes + 1) + ids  # N x h x w
    counts = torch.bincount(index.flatten(), minlength=n * patches * (num_classes + 1)).view(n, patches, -1)
    counts = counts[..., :num_classes].float()  # N x P x K
    total = counts.sum(-1, keepdim=True)
    return counts / total.clamp(min=1), total[..., 0] > 0


def balanced_patches(present, valid, count, generator):
    """`count` patches of one image, balanced as the reference samples them (sample_features): a patch scores the
    number of the image's patches that hold each of its classes, summed, times a uniform draw, and the lowest scores
    are kept, so that patches of the image's rare classes come first. present: P x K bools, valid: P bools."""
    frequency = present.float().sum(0)  # K: how many patches hold each class
    score = (present.float() @ frequency) * torch.rand(len(present), generator=generator).to(present.device)
    score[~valid] = math.inf  # a patch with no labelled pixel is never kept
    return score.topk(min(count, int(valid.sum())), largest=False).indices


def gather_rows(tensor):
    """The rows of `tensor` from every rank (their counts may differ), in rank order."""
    if not common.distributed():
        return tensor
    counts = common.all_gather_cat(torch.tensor([len(tensor)], device=tensor.device)).tolist()
    padded = tensor.new_zeros(max(counts), *tensor.shape[1:])
    padded[:len(tensor)] = tensor
    return torch.cat([part[:c] for part, c in zip(common.all_gather_cat(padded).split(max(counts)), counts)])


@torch.no_grad()
def build_memory(backbone, train_set, shape, memory_size, args, d):
    """The memory: L2-normalised features of training patches (M x C) and their soft labels (M x K), on the device.
    Each image gives memory_size // images patches (balanced_patches), or every labelled patch with memory_size 0.
    Features are stored in fp16 on a GPU (half the memory; ranking by cosine barely changes), fp32 on a CPU."""
    per_image = memory_size // len(train_set) if memory_size else None
    if per_image == 0:
        raise common.UserError(f"--memory-size {memory_size}: fewer patches than the {len(train_set)} training "
                               "images (one patch an image at least); raise it, or 0 for every patch")
    samples = Samples(train_set, list(range(len(train_set)))[d.rank::d.world_size], shape)
    batches = loader(samples, max(1, args.batch_size // d.world_size), args.workers, d.device)
    generator = torch.Generator().manual_seed(args.seed + d.rank)
    dtype = torch.float16 if d.device.type == "cuda" else torch.float32
    features, labels = [], []
    for images, label, _ in common.throughput_bar(batches, len(batches), d.is_main, desc="memory"):
        with common.autocast(d.device, args.precision):
            f = backbone(common.normalize(images, d.device)).float()  # N x C x h/s x w/s
        hist, valid = patch_histograms(label, shape[0] // f.shape[-2], train_set.num_classes)  # N x P x K, N x P
        f = F.normalize(f.flatten(2).transpose(1, 2), dim=2)  # N x P x C
        for j in range(len(f)):
            keep = valid[j].nonzero()[:, 0] if per_image is None else \
                balanced_patches(hist[j] > 0, valid[j], per_image, generator)
            features.append(f[j, keep.to(f.device)].to(dtype))
            labels.append(hist[j, keep].to(d.device))
    return gather_rows(torch.cat(features)), gather_rows(torch.cat(labels))


def nearest_entries(queries, memory, k):
    """The k largest cosines of unit `queries` (q x C) with the unit `memory` (M x C), and their rows: exact, one
    tile of the memory at a time (at most RETRIEVAL_CHUNK similarities), a running top-k across the tiles."""
    k, tile = min(k, len(memory)), max(k, RETRIEVAL_CHUNK // len(queries))
    best = None
    for start in range(0, len(memory), tile):
        cos, rows = (queries.to(memory.dtype) @ memory[start:start + tile].t()).float().topk(
            min(k, len(memory) - start, tile), dim=1)  # q x k
        rows = rows + start
        if best is not None:  # merge with the tiles before
            cos, pick = torch.cat([best[0], cos], 1).topk(k, dim=1)
            rows = torch.cat([best[1], rows], 1).gather(1, pick)
        best = cos, rows
    return best


def retrieve_labels(features, memory, memory_labels, k, temperature):
    """Hummingbird's label for every position of `features` (N x C x h x w): its k nearest memory entries by cosine
    (nearest_entries, RETRIEVAL_QUERIES at a time) weighted by softmax(cos / temperature) mix their soft labels:
    N x K x h x w."""
    n, c, h, w = features.shape
    queries = F.normalize(features.float().flatten(2).transpose(1, 2).reshape(-1, c), dim=1)  # Q x C
    mixed = []
    for chunk in queries.split(RETRIEVAL_QUERIES):
        cos, nearest = nearest_entries(chunk, memory, k)  # q x k
        weights = F.softmax(cos / temperature, dim=1)  # q x k
        mixed.append(torch.einsum("qk,qkc->qc", weights, memory_labels[nearest]))  # q x K
    return torch.cat(mixed).view(n, h, w, -1).permute(0, 3, 1, 2)


def retrieval(args):
    """--retrieval: build the memory from the training set, label every validation patch by retrieve_labels, then
    upsample, argmax and score as the probe does (evaluate). One JSON line and metrics.json."""
    d = common.init_distributed()
    t_start = time.time()
    common.seed_all(args.seed)
    backbone, description = common.dense_feature_model(args.weights, args.arch, {"vader": VADeRNet}, args.layer)
    backbone = backbone.to(d.device).eval().requires_grad_(False)
    train_set, val_set = build_datasets(args)
    shape = input_shape(train_set, args.image_size)
    if d.is_main:
        print(f"retrieval on {data_name(args)}: memory of up to {args.memory_size or 'every'} patches from "
              f"{len(train_set)} training images, {len(val_set)} validation images, {shape[0]}x{shape[1]} inputs, "
              f"k {args.neighbours}, temperature {args.retrieval_temperature}, features: {description}")
    memory, memory_labels = build_memory(backbone, train_set, shape, args.memory_size, args, d)
    memory_seconds = time.time() - t_start
    vote = lambda f: retrieve_labels(f, memory, memory_labels, args.neighbours, args.retrieval_temperature)  # noqa
    scores = evaluate(lambda images: backbone(common.normalize(images, d.device)), [vote],
                      validation_loader(val_set, shape, args.batch_size, args.workers, d), val_set.task,
                      val_set.num_classes, d, args.precision, desc="retrieve")[0]
    result = dict(mode="retrieval", dataset=data_name(args), weights=args.weights,
                  weights_format=common.weights_format(args.weights), model=description, image_size=list(shape),
                  memory_size=args.memory_size, memory_entries=len(memory),
                  memory_mb=round((memory.numel() * memory.element_size() + memory_labels.numel() * 4) / 2**20, 1),
                  neighbours=args.neighbours, temperature=args.retrieval_temperature, train_images=len(train_set),
                  val_images=len(val_set), **scores, memory_seconds=round(memory_seconds, 2),
                  seconds=round(time.time() - t_start, 1))
    if d.is_main:
        print(f"retrieval mIoU {result['miou']:.4f}, pixel accuracy {result['pixel_acc']:.4f}")
        common.print_result(common.finite_or_none(result), os.path.join(args.output_dir, "metrics.json"))
    common.finish_distributed()
    return result


def to_detectron2(resnet_state):
    """Rename torchvision ResNet keys to Detectron2's (as MoCo's and CLoVE's converters do), as numpy arrays:
    layerN -> res{N+1}, bnK -> convK.norm, downsample.0/1 -> shortcut / shortcut.norm, stem keys get `stem.`."""
    out = {}
    for k, v in resnet_state.items():
        if k.startswith("fc."):
            continue
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = v.detach().cpu().numpy()
    return {"model": out, "__author__": "dense-ssl", "matching_heuristics": True}


# What Detectron2 must be told about an exported torchvision ResNet: its RGB mean/std times 255, and the stride in
# the 3x3 convolution (torchvision's ResNet v1.5); batch norms synchronised over the GPUs
DETECTRON2_CONFIG = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": "[123.675, 116.280, 103.530]",
    "MODEL.PIXEL_STD": "[58.395, 57.120, 57.375]",
    "MODEL.RESNETS.STRIDE_IN_1X1": "False",
    "MODEL.RESNETS.NORM": "SyncBN",
    "MODEL.FPN.NORM": "SyncBN",
}


def export_resnet(args):
    """--export-detectron2 / --export-torchvision: the ResNet encoder of --weights (a vader.py / clove.py / MoCo /
    torchvision file; the FPN and decoder are not exported), printed as one JSON line.

    Detectron2: a .pkl of {"model": ..., "__author__": ..., "matching_heuristics": True}; a config uses it with
    MODEL.WEIGHTS: "OUT.pkl", MODEL.RESNETS.DEPTH: 50 (18/34 also need MODEL.RESNETS.RES2_OUT_CHANNELS: 64) and the
    settings of DETECTRON2_CONFIG (printed). torchvision: a ResNet state dict (torch.save), the form VICRegL ships
    its backbones in: `torchvision.models.resnet50().load_state_dict(torch.load(path))` loads it with strict=True,
    and so does most downstream code; fc is torchvision's 1000-way classifier, freshly initialised (nn.Linear's
    default, as in torchvision's untrained ResNet, seed 0): the dense methods train none, so replace it or ignore it.
    """
    path = args.export_detectron2 or args.export_torchvision
    kind, state, meta = common.read_weights(args.weights)
    if kind in ("vader", "clove"):
        state = common.encoder_state(state)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = dict(export=path, kind=kind, weights=args.weights)
    if args.export_detectron2:
        exported = to_detectron2(state)
        with open(path, "wb") as f:
            pickle.dump(exported, f)
        result["tensors"] = len(exported["model"])
        print(f"wrote {result['tensors']} ResNet tensors of the {kind} weights {args.weights} to {path}; "
              "Detectron2 config: " + ", ".join(f"{k} {v}" for k, v in DETECTRON2_CONFIG.items()))
    else:
        arch = meta.get("arch") or common.infer_arch(state) or args.arch
        net = common.resnet(arch)
        common.load_resnet_state(net, state, args.weights)
        torch.manual_seed(0)
        net.fc = nn.Linear(common.resnet_channels(arch)[-1], 1000)
        torch.save(net.state_dict(), path)
        result.update(arch=arch, tensors=len(net.state_dict()))
        print(f"wrote the {arch} encoder of the {kind} weights {args.weights} to {path} ({result['tensors']} "
              "tensors, torchvision's keys; fc freshly initialised)")
    common.print_result(result)


def write_feature_picture(args):
    """VADeR Figures 2 and 5 for any weights (features in PCA colours, a query pixel's similarity map), on the first
    4 validation images of the data set."""
    model, description = common.dense_feature_model(args.weights, args.arch, {"vader": VADeRNet}, args.layer)
    _, val_set = build_datasets(args)
    shape = input_shape(val_set, args.image_size)
    images = [val_set.read(i)[0].resize((shape[1], shape[0]), Image.BILINEAR) for i in range(min(4, len(val_set)))]
    os.makedirs(os.path.dirname(os.path.abspath(args.feature_picture)), exist_ok=True)
    picture = common.feature_picture(model, images, args.feature_picture)
    common.print_result(dict(picture=args.feature_picture, weights=args.weights, features=description,
                             width=picture.size[0], height=picture.size[1]))


# ---- data: the data sets, their input geometry, loaders ----
def read_split(path):
    """Names from a split file, one per line; also accepts DeepLab lists ("/JPEGImages/x.jpg /Seg.../x.png")."""
    if not os.path.isfile(path):
        raise common.UserError(f"{path}: split file not found; the data set folder needs it (see --dataset)")
    with open(path) as f:
        return [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in f if line.strip()]


def check_pairs(pairs, label_modes, expected):
    """Every (image, label) file exists, has the same width x height, and its label has one of `label_modes` (PIL
    modes; `expected` says what they are); reads headers only, so it is quick. Checked here, in the main process:
    the same check in a loader worker would surface as the worker's traceback."""
    for image_path, label_path in pairs:
        for path in (image_path, label_path):
            if not os.path.isfile(path):
                raise common.UserError(f"{path}: file not found (listed in the split)")
        with Image.open(image_path) as a, Image.open(label_path) as b:
            if a.size != b.size:
                raise common.UserError(f"{image_path} is {a.size[0]}x{a.size[1]} but its label {label_path} is "
                                       f"{b.size[0]}x{b.size[1]}; image and label must have the same size")
            if b.mode not in label_modes:
                raise common.UserError(f"{label_path}: label mode {b.mode}; expected {expected}")


INDEX_MODES, INDEX_EXPECTED = ("P", "L"), "a palette or greyscale index PNG (colour-coded RGB labels are refused)"
DEPTH_MODES, DEPTH_EXPECTED = ("I;16", "I;16B", "I", "I;16L"), "a 16-bit PNG of millimetres"


def read_index_png(path):
    """A class-index PNG (palette or grey) as uint8 H x W."""
    with Image.open(path) as img:
        if img.mode not in INDEX_MODES:
            raise common.UserError(f"{path}: label mode {img.mode}; expected {INDEX_EXPECTED}")
        return np.array(img, dtype=np.uint8)


class DenseLabelSet:
    """A list of (image, dense label) samples. `read(i)` -> (PIL RGB image, label ndarray H x W): uint8 class ids
    (255 = ignore) for segmentation, float32 metres (0 = no measurement) for depth."""

    task, num_classes, aspect, default_size = "segmentation", 0, 1.0, 224
    label_modes, expected_labels = INDEX_MODES, INDEX_EXPECTED

    def __init__(self, pairs):
        self.pairs = pairs
        check_pairs(pairs, self.label_modes, self.expected_labels)

    def __len__(self):
        return len(self.pairs)

    def read(self, index):
        image_path, label_path = self.pairs[index]
        return common.load_image(image_path), self.read_label(label_path)


class VOCSegmentation(DenseLabelSet):
    """PASCAL VOC 2012, 21 classes: JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (preferred) or
    SegmentationClass/<id>.png (palette or grey index PNGs, 255 = void), ImageSets/Segmentation/<split>.txt."""

    num_classes = 21

    def __init__(self, root, split):
        labels = os.path.join(root, "SegmentationClassAug")
        labels = labels if os.path.isdir(labels) else os.path.join(root, "SegmentationClass")
        names = read_split(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"))
        super().__init__([(os.path.join(root, "JPEGImages", f"{n}.jpg"), os.path.join(labels, f"{n}.png"))
                          for n in names])

    read_label = staticmethod(read_index_png)


def cityscapes_train_ids():
    """Look-up table label id -> train id (the 19 evaluated classes of cityscapesScripts' labels.py; rest 255)."""
    lut = np.full(256, IGNORE, np.uint8)
    for train_id, label_id in enumerate((7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)):
        lut[label_id] = train_id  # road sidewalk building wall fence pole light sign vegetation terrain sky
    return lut                    # person rider car truck bus train motorcycle bicycle


class CityscapesSegmentation(DenseLabelSet):
    """Cityscapes in the layout torchvision.datasets.Cityscapes reads: leftImg8bit/<split>/<city>/*_leftImg8bit.png
    and gtFine/<split>/<city>/*_gtFine_labelIds.png; label ids become the 19 train ids (the others 255)."""

    num_classes, aspect, default_size = 19, 2.0, 256
    TRAIN_IDS = cityscapes_train_ids()

    def __init__(self, root, split):
        image_dir = os.path.join(root, "leftImg8bit", split)
        if not os.path.isdir(image_dir):
            raise common.UserError(f"{image_dir}: not found; --data must hold leftImg8bit/{{train,val}}/<city>/ and "
                                   "gtFine/{train,val}/<city>/ (the layout torchvision.datasets.Cityscapes reads)")
        pairs = []
        for city in sorted(os.listdir(image_dir)):
            for name in sorted(os.listdir(os.path.join(image_dir, city))):
                if name.endswith("_leftImg8bit.png"):
                    label = name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                    label_path = os.path.join(root, "gtFine", split, city, label)
                    pairs.append((os.path.join(image_dir, city, name), label_path))
        if not pairs:
            raise common.UserError(f"{image_dir}: no *_leftImg8bit.png images")
        super().__init__(pairs)

    def read_label(self, path):
        return self.TRAIN_IDS[read_index_png(path)]


class NYUDepth(DenseLabelSet):
    """NYU-depth v2 with the standard 795 / 654 split, as a folder: rgb/<name>.png (or .jpg), depth/<name>.png
    (16-bit millimetres, 0 = no measurement), train.txt, val.txt. The notes at the end of this file make it from
    the official files; the 654 test frames serve as the validation split, as in the paper."""

    task, aspect = "depth", 4 / 3
    label_modes, expected_labels = DEPTH_MODES, DEPTH_EXPECTED

    def __init__(self, root, split):
        names = read_split(os.path.join(root, f"{split}.txt"))
        rgb = [os.path.join(root, "rgb", f"{n}.png") for n in names]
        rgb = [p if os.path.isfile(p) else p[:-4] + ".jpg" for p in rgb]
        super().__init__(list(zip(rgb, [os.path.join(root, "depth", f"{n}.png") for n in names])))

    @staticmethod
    def read_label(path):
        with Image.open(path) as img:
            if img.mode not in DEPTH_MODES:
                raise common.UserError(f"{path}: depth PNG mode {img.mode}; expected {DEPTH_EXPECTED}")
            return np.array(img, dtype=np.float32) / DEPTH_PNG_SCALE  # H x W metres, 0 = missing


class SyntheticSegmentation(DenseLabelSet):
    """The embedded set (no --data): dead-leaves images (common.DeadLeaves); a pixel's class is the texture family
    of the shape covering it (4 classes + background), shown by its texture and an overlapping hue palette."""

    def __init__(self, length, size, seed, first_index=0):
        self.leaves = common.DeadLeaves(size=size, seed=seed)
        self.num_classes = self.leaves.num_classes + 1  # + background
        self.length, self.first = length, first_index

    def __len__(self):
        return self.length

    def read(self, index):
        image, classes, _ = self.leaves.image(self.first + index)
        return image, classes


def object_image(leaves, index):
    """One picture of the embedded classification set, painted by `leaves` (a common.DeadLeaves): a large object of
    class 1 + index % num_classes in front of a background and smaller shapes of any class, so its class is what a
    person would call the picture's class, as with ImageNet's object-centred photos.

    The object is a dead leaf like any other (same shapes, texture families and hue palettes) of radius 0.3-0.42 of
    the side, centred in the middle fifth; the clutter is half as many shapes as DeadLeaves.image draws, with radii
    capped at 0.12 of the side. A random stream of its own: kind 2, beside DeadLeaves.image (0) and
    davis_propagate.leaves_video (1).
    Returns (PIL image, class 0..num_classes-1, class map uint8 with 0 = background, instance map int32 with the
    object = its largest id).
    """
    rng = leaves.rng(2, index)
    s = leaves.size
    canvas = leaves.background(rng, s, s)
    classes, instances = np.zeros((s, s), np.uint8), np.zeros((s, s), np.int32)
    clutter = int(rng.integers(leaves.shapes[0], leaves.shapes[1] + 1)) // 2
    for i in range(clutter):
        leaf = leaves.leaf(rng, s, s)
        leaf["r"] = min(leaf["r"], 0.12 * s)
        leaves.paint(canvas, classes, instances, leaf, i + 1)
    cls = index % leaves.num_classes + 1  # balanced classes
    leaf = leaves.leaf(rng, s, s)
    leaf.update(cls=cls, c0=leaves.colour(rng, cls), c1=leaves.colour(rng, cls), r=rng.uniform(0.3, 0.42) * s,
                cy=rng.uniform(0.4, 0.6) * s, cx=rng.uniform(0.4, 0.6) * s)
    leaves.paint(canvas, classes, instances, leaf, clutter + 1)
    pixels = np.clip(canvas * 255 + rng.normal(0, 3, canvas.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), cls - 1, classes, instances


class SyntheticClassification:
    """The embedded classification set (--dataset imagefolder, no --data): object_image's pictures, labelled
    with the class of their large object (its texture family: flat, stripes, checks, dots, rings, noise, each with
    its hue palette)."""

    task, aspect = "classification", 1.0

    def __init__(self, length, size, seed, first_index=0, num_classes=6):
        self.leaves = common.DeadLeaves(size=size, num_classes=num_classes, seed=seed)
        self.num_classes, self.classes = num_classes, list(common.DeadLeaves.TEXTURES[:num_classes])
        self.length, self.first = length, first_index

    def __len__(self):
        return self.length

    def read(self, index):
        image, label, _, _ = object_image(self.leaves, self.first + index)
        return image, label


class ImageFolderClasses:
    """ImageNet's layout: DIR/<split>/<class>/<image>; a class is a sub-folder, classes are numbered in sorted order
    of the training split's folders, and the validation split must use the same names. The files' headers are not
    checked at start (ImageNet is big): a file that cannot be decoded is skipped by name when it is read (a warning,
    the label UNREADABLE, which the loss and the scores skip; metrics.json counts them)."""

    task, aspect = "classification", 1.0

    def __init__(self, root, split, classes=None):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise common.UserError(f"{folder}: not found; --dataset imagefolder needs --data DIR with "
                                   "DIR/train/<class>/* and DIR/val/<class>/*")
        found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        self.classes = classes or found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise common.UserError(f"{folder}: class folder(s) {unknown[:3]} are not in the training split")
        number = {c: k for k, c in enumerate(self.classes)}
        self.items = []
        for c in found:
            for parent, _, names in sorted(os.walk(os.path.join(folder, c), followlinks=True)):
                self.items += [(os.path.join(parent, n), number[c]) for n in sorted(names)
                               if n.lower().endswith(common.IMAGE_EXTENSIONS)]
        if not self.items:
            raise common.UserError(f"{folder}: no images in <class> sub-folders "
                                   f"({', '.join(common.IMAGE_EXTENSIONS[:4])}, ...)")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.items)

    def read(self, index):
        path, label = self.items[index]
        try:
            return common.load_image(path), label
        except common.UNREADABLE_ERRORS as e:
            common.warn_unreadable(path, e)
            return None, UNREADABLE


def build_datasets(args):
    """(train set, validation set) of --dataset; an embedded pair when --data is not given. VOC trains on train_aug
    when its list exists (the paper's choice), else on train."""
    if args.data is None:
        kind = SyntheticClassification if args.dataset == "imagefolder" else SyntheticSegmentation
        return (kind(args.synthetic_train, args.image_size, args.seed),
                kind(args.synthetic_val, args.image_size, args.seed, first_index=10**6))
    if args.dataset == "voc":
        split = args.train_split
        if split == "auto":
            has_aug = os.path.isfile(os.path.join(args.data, "ImageSets", "Segmentation", "train_aug.txt"))
            split = "train_aug" if has_aug else "train"
        return VOCSegmentation(args.data, split), VOCSegmentation(args.data, "val")
    if args.dataset == "cityscapes":
        return CityscapesSegmentation(args.data, "train"), CityscapesSegmentation(args.data, "val")
    if args.dataset == "imagefolder":
        train = ImageFolderClasses(args.data, "train")
        return train, ImageFolderClasses(args.data, "val", classes=train.classes)
    return NYUDepth(args.data, "train"), NYUDepth(args.data, "val")


def input_shape(source, image_size):
    """(rows, columns) of the network input: --image-size rows, columns at the data set's usual aspect ratio
    (VOC and the embedded sets square, Cityscapes 1:2, NYU 3:4), multiples of 32. Every image is resized to it,
    whatever its own aspect (PROBE's geometry "stretch": open-hummingbird-eval resizes VOC images and masks to
    squares so); nothing is cropped, so the whole labelled image is seen and scored."""
    return image_size, max(32, int(round(image_size * source.aspect / 32)) * 32)


def resample_label(label, shape):
    """A label map (H x W, any dtype) at `shape`, each output pixel taking the input pixel under its centre
    (`nearest-exact`: source row floor((i + 0.5) H / h)), the sampling of PIL's resize of the image; plain `nearest`
    (floor(i H / h)) would shift the labels up-left by half an output pixel against the image (~1.1 source pixels
    on VOC)."""
    return F.interpolate(label[None, None], size=shape, mode="nearest-exact")[0, 0]  # h x w, same dtype


def centre_crop(image, size):
    """The classification input: shorter side resized to size / 0.875, then the central size x size (the ImageNet
    evaluation transform, 256 -> 224)."""
    w, h = image.size
    scale = size / 0.875 / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.BILINEAR)
    x0, y0 = (w - size) // 2, (h - size) // 2
    return image.crop((x0, y0, x0 + size, y0 + size))


class Samples(torch.utils.data.Dataset):
    """Items of a data set as tensors: (uint8 image 3 x h x w at the input size, label, index). The images cross to
    the device as uint8, a quarter of float32's bytes, and are normalised there (common.normalize).

    Dense labels (segmentation: uint8 class ids, depth: float32 metres) are resampled to the input grid by pixel
    centres for training, and left at their native size for validation (`native_labels`), where the logits are
    upsampled to them. A classification label is an int64 scalar; its image is resized and centre-cropped.
    `augment` (fine-tuning only): a horizontal flip, and for segmentation a random crop of 50-100% of the area,
    drawn from (seed, epoch, index).
    """

    def __init__(self, source, indices, shape, native_labels=False, augment=False, seed=0):
        self.source, self.indices, self.shape = source, list(indices), shape
        self.native, self.augment, self.seed, self.epoch = native_labels, augment, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        image, label = self.source.read(index)
        if self.source.task == "classification":  # an unreadable image (None) is zeros, labelled UNREADABLE
            image = torch.zeros(3, *self.shape, dtype=torch.uint8) if image is None else common.to_uint8(
                centre_crop(image, self.shape[0]))
            return image, torch.tensor(label, dtype=torch.long), index
        label = torch.from_numpy(np.ascontiguousarray(label))  # H x W, uint8 class ids or float32 metres
        if self.augment:
            rng = common.sample_rng(self.seed, self.epoch, k)
            if self.source.task == "segmentation":
                aspect = self.shape[1] / self.shape[0]
                box = common.sample_crop_box(rng, *image.size, scale=(0.5, 1.0), ratio=(aspect, aspect))
                image = image.crop((box.x0, box.y0, box.x1, box.y1))
                label = label[box.y0:box.y1, box.x0:box.x1]
            if rng.random() < 0.5:
                image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label.flip(1)
        image = common.to_uint8(image.resize(self.shape[::-1], Image.BILINEAR))  # 3 x h x w
        if not self.native:
            label = resample_label(label, self.shape)  # h x w
        return image, label, index


def collate_native(batch):
    """Stack the images; native-size labels stay a list (their sizes differ)."""
    images, labels, indices = zip(*batch)
    return torch.stack(images), list(labels), torch.tensor(indices)


def loader(samples, batch_size, workers, device, shuffle_seed=None, drop_last=False, collate=None):
    """A DataLoader over `samples`, shuffled by `shuffle_seed` when it is given."""
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=shuffle_seed is not None,
                                       generator=generator, num_workers=workers, drop_last=drop_last,
                                       collate_fn=collate, pin_memory=device.type == "cuda")


# ---- arguments and input checks ----
DEMO_PRESET = dict(  # used when --data is not given: random-init ResNet-18 on the embedded synthetic set, ~2 min CPU
    arch="resnet18", image_size=96, batch_size=16, epochs=10, synthetic_train=256, synthetic_val=64, workers=0,
    output_dir="runs/evaluate-demo",
)
CORRESPONDENCE_DEMO_PRESET = dict(  # --dataset correspondence without --data: vader.py's demo views (64 px), ~1 min
    arch="resnet18", image_size=64, batch_size=32, synthetic_val=256, workers=0,
    output_dir="runs/evaluate-correspondence-demo",
)
CLASSIFICATION_DEMO_PRESET = dict(  # --dataset imagefolder without --data: the embedded classification set, ~2 min CPU
    arch="resnet18", image_size=96, batch_size=32, epochs=30, synthetic_train=256, synthetic_val=128, workers=0,
    output_dir="runs/evaluate-classification-demo",
)


def get_parser():
    p = argparse.ArgumentParser(description="Frozen-feature linear probes (VADeR §4.1), low-label fine-tuning "
                                "(§4.2), correspondence accuracy, Detectron2 and torchvision export.",
                                epilog="the probe's protocol (PROBE; sources in the file): "
                                + "; ".join(f"{k} {v}" for k, v in PROBE.items()) + f"; fine-tuning: {FINETUNE}",
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="random",
                   help="'random', a vader.py/clove.py checkpoint or a format in common.WEIGHT_FORMATS")
    p.add_argument("--arch", default="resnet50", help="ResNet depth for 'random' (checkpoints carry or reveal theirs)")
    p.add_argument("--layer", default="res5", choices=list(common.BASELINE_LAYERS),
                   help="where ResNet weights are read: res5 = C5 dilated to 1/4 (§4.1), res4 = C4 at 1/8 (CRW's)")
    p.add_argument("--dataset", default=None, choices=["voc", "cityscapes", "nyu", "imagefolder", "correspondence"],
                   help="layout of --data (correspondence: any image folder); without --data: an embedded set")
    p.add_argument("--data", default=None, help="data set root; omit it for an embedded set and its demo preset")
    p.add_argument("--train-split", default="auto",
                   help="VOC training list: auto (train_aug when its list exists, else train), train_aug or train")
    p.add_argument("--output-dir", default="runs/evaluate", help="metrics.json and log.jsonl go here")
    p.add_argument("--finetune", action="store_true",
                   help="§4.2: train encoder + FPN + decoder + head instead of a 1x1 conv on frozen features")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="fraction of the training images used, drawn by each trial's seed (paper: 0.02 to 1)")
    p.add_argument("--trials", type=int, default=PROBE["trials"],
                   help="repetitions (paper: 5): probes initialised from seed, seed+1, ...; fine-tuning runs seeded so")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the training images (default: 20 probe, 100 classification, 30 fine-tuning)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch in images, split over ranks (default: 16, 256 for classification)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak SGD learning rate (default: 0.1 probe, 0.01 depth probe and fine-tuning)")
    p.add_argument("--weight-decay", type=float, default=PROBE["weight_decay"], help="SGD weight decay")
    p.add_argument("--image-size", type=int, default=None,
                   help="input rows, a multiple of 32 (default: 224, Cityscapes 256); columns follow the aspect; "
                   "correspondence: the view size")
    p.add_argument("--cache-gb", type=float, default=16.0,
                   help="keep the frozen training features and labels (per rank) in memory when they fit in this "
                   "many GB, else recompute them each epoch: a speed-up only, the probe is the same")
    p.add_argument("--depth-crop", default="eigen", choices=["eigen", "none"],
                   help="NYU-depth v2 scoring region: the Eigen crop or every pixel")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per rank (0: in the main process)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of trial 0 (probe initialisation, label subset, batch order; trial t: seed + t) and "
                   "of the correspondence view pairs")
    p.add_argument("--precision", default=PROBE["precision"], choices=common.PRECISIONS,
                   help="the backbone's and the heads' " + common.PRECISION_HELP + " (MoCo and DINO evaluate in fp32)")
    p.add_argument("--synthetic-train", type=int, default=1000, help="training images of an embedded set (no --data)")
    p.add_argument("--synthetic-val", type=int, default=200,
                   help="validation images of an embedded set (no --data); correspondence: its view pairs")
    p.add_argument("--export-detectron2", default=None, metavar="OUT.pkl",
                   help="write the ResNet of --weights as a Detectron2 checkpoint and exit")
    p.add_argument("--export-torchvision", default=None, metavar="OUT.pth",
                   help="write the ResNet of --weights as a torchvision ResNet state dict and exit")
    p.add_argument("--retrieval", action="store_true",
                   help="Hummingbird dense nearest-neighbour retrieval (no training) instead of a probe")
    p.add_argument("--memory-size", type=int, default=1024 * 10**2,
                   help="--retrieval: training patches in the memory (open-hummingbird-eval: 1024 x 10^2, 10^3, "
                   "10^4); 0: every labelled patch")
    p.add_argument("--neighbours", type=int, default=30, help="--retrieval: k nearest by cosine (the reference's 30)")
    p.add_argument("--retrieval-temperature", type=float, default=0.02,
                   help="--retrieval: the neighbours' weights are softmax(cos / this) (the reference's 0.02)")
    p.add_argument("--feature-picture", default=None, metavar="OUT.png",
                   help="write VADeR's Figures 2 and 5 for --weights on 4 validation images and exit")
    return p


def check_paths(args):
    """The files and folders the run needs, before anything is printed or read."""
    if args.weights != "random" and not os.path.isfile(args.weights):
        raise common.UserError(f"--weights {args.weights}: no such file; pass a vader.py/clove.py checkpoint, a "
                               "checkpoint in a format of common.WEIGHT_FORMATS, or 'random'")
    if args.data is not None and args.dataset is None:
        raise common.UserError("--data given without --dataset; pass --dataset voc, cityscapes, nyu, imagefolder or "
                               "correspondence")
    if args.data is not None and not os.path.isdir(args.data):
        raise common.UserError(f"--data {args.data}: no such folder")
    if args.export_detectron2 and args.export_torchvision:
        raise common.UserError("--export-detectron2 and --export-torchvision: pass one (one export a run)")
    if (args.export_detectron2 or args.export_torchvision) and args.weights == "random":
        raise common.UserError(f"--export-{'detectron2' if args.export_detectron2 else 'torchvision'} needs --weights "
                               "FILE (a vader.py/clove.py, MoCo or torchvision file)")
    if args.data is None and args.dataset not in (None, "imagefolder", "correspondence"):
        raise common.UserError(f"--dataset {args.dataset} needs --data (the data set's root folder)")


def fill_defaults(parser, args, argv):
    """The embedded set's demo preset (no --data) for the flags not given, then the defaults of the mode and the
    task: PROBE, FINETUNE or POOLED. Returns what the preset set."""
    classification = args.dataset == "imagefolder"
    preset = {}
    if args.data is None:
        presets = dict(imagefolder=CLASSIFICATION_DEMO_PRESET, correspondence=CORRESPONDENCE_DEMO_PRESET)
        preset = common.apply_preset(parser, args, presets.get(args.dataset, DEMO_PRESET), argv)
    defaults = {k: PROBE[k] for k in ("epochs", "lr", "batch_size", "image_size")}
    if args.dataset == "nyu":
        defaults["lr"] = PROBE["depth_lr"]
    defaults.update(FINETUNE if args.finetune else POOLED if classification else {})
    if args.dataset == "cityscapes":
        defaults["image_size"] = CityscapesSegmentation.default_size
    if args.retrieval:
        defaults["image_size"] = 512  # open-hummingbird-eval's README: 512 x 512 inputs
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return preset


def check_args(args, world_size):
    """Every number, before any work: one line naming the flag."""
    if args.image_size < 32 or args.image_size % 32:
        raise common.UserError(f"--image-size {args.image_size}: must be a positive multiple of 32 (the FPN's "
                               "coarsest stride), e.g. 224")
    if args.batch_size < 1 or args.batch_size % world_size:
        raise common.UserError(f"--batch-size {args.batch_size}: the global batch must be positive and split evenly "
                               f"over {world_size} rank(s)")
    for flag in ("trials", "epochs", "synthetic_train", "synthetic_val"):
        if getattr(args, flag) < 1:
            raise common.UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if not args.lr > 0 or not args.weight_decay >= 0 or not args.cache_gb >= 0 or args.workers < 0:
        raise common.UserError("--lr must be positive; --weight-decay, --cache-gb and --workers at least 0")
    if not 0 < args.label_fraction <= 1:
        raise common.UserError(f"--label-fraction {args.label_fraction}: must be in (0, 1]")
    if args.train_split not in ("auto", "train_aug", "train"):
        raise common.UserError(f"--train-split {args.train_split}: expected auto, train_aug or train")
    if args.retrieval and (args.finetune or args.dataset not in (None, "voc", "cityscapes")):
        raise common.UserError("--retrieval scores semantic segmentation (--dataset voc, cityscapes or the embedded "
                               "set) from frozen features; drop --finetune")
    if args.memory_size < 0 or args.neighbours < 1 or not args.retrieval_temperature > 0:
        raise common.UserError("--memory-size must be at least 0, --neighbours at least 1, --retrieval-temperature "
                               "positive")
    if args.finetune and args.layer != "res5":
        raise common.UserError(f"--layer {args.layer}: fine-tuning trains the whole VADeRNet (§4.2); --layer "
                               "chooses the frozen features of a probe")
    if args.dataset == "correspondence" and args.layer != "res5":
        raise common.UserError(f"--layer {args.layer} is at 1/8; correspondence compares cells of the S/4 grid of "
                               "the matches: use --layer res5")
    if args.finetune and args.dataset == "correspondence":
        raise common.UserError("--finetune with --dataset correspondence: correspondence accuracy trains nothing")
    if args.finetune and args.dataset == "imagefolder":
        raise common.UserError("--finetune trains the dense network (§4.2); imagefolder classification is a "
                               "frozen-feature probe only")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_paths(args)
    if args.export_detectron2 or args.export_torchvision:
        return export_resnet(args)
    preset = fill_defaults(parser, args, argv)
    check_args(args, common.job_place().world_size)  # under srun too, before any process group
    if not args.feature_picture:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as e:
            raise common.UserError(f"--output-dir {args.output_dir}: cannot create it ({e.strerror})") from None
    if args.data is None and int(os.environ.get("RANK", 0)) == 0:  # after the checks: a bad flag prints nothing
        kind = dict(imagefolder="classification", correspondence="dead-leaves").get(args.dataset, "segmentation")
        print(f"no --data: the embedded {kind} set and the CPU demo preset "
              + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in preset.items()), flush=True)
    if args.feature_picture:
        return write_feature_picture(args)
    if args.retrieval:
        return retrieval(args)
    if args.dataset == "correspondence":
        return correspondence(args)
    run(args)


if __name__ == "__main__":
    common.run_main(main)


# ---- notes ----
# Preparing NYU-depth v2 (once, on a machine with h5py and scipy; not needed at run time). Download
# nyu_depth_v2_labeled.mat (2.8 GB, the 1449 labelled frames) and splits.mat (trainNdxs: 795, testNdxs: 654,
# 1-based) from the NYU-depth v2 page, then run:
#     import os, h5py, numpy as np, scipy.io
#     from PIL import Image
#     out = "nyu_depth_v2"; os.makedirs(f"{out}/rgb"); os.makedirs(f"{out}/depth")
#     with h5py.File("nyu_depth_v2_labeled.mat", "r") as f:          # MATLAB v7.3: arrays are transposed
#         for i in range(f["images"].shape[0]):
#             rgb = np.transpose(f["images"][i], (2, 1, 0))             # 3 x W x H -> H x W x 3, uint8
#             depth = np.transpose(f["depths"][i], (1, 0))              # W x H -> H x W, metres (in-painted)
#             Image.fromarray(rgb).save(f"{out}/rgb/{i + 1:05d}.png")
#             Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(f"{out}/depth/{i + 1:05d}.png")
#     splits = scipy.io.loadmat("splits.mat")
#     for name, key in (("train", "trainNdxs"), ("val", "testNdxs")):
#         with open(f"{out}/{name}.txt", "w") as f:
#             f.writelines(f"{int(n):05d}\n" for n in splits[key].ravel())
