"""Transfer evaluation of dense representations: frozen-feature linear probes, low-label fine-tuning, Detectron2 export.

A pretrained network is worth what it transfers. The frozen-feature protocol (VADeR §4.1, Table 1) trains only a
1x1 convolution on fixed per-pixel features: softmax + cross-entropy for semantic segmentation (PASCAL VOC 2012,
Cityscapes), one output + L1 for depth (NYU-depth v2). The fine-tuning protocol (§4.2, Figure 4) trains the whole
ResNet + FPN + head with 2..100% of the labels. Both repeat --trials times and report mean and std.

Paper: P. O. Pinheiro et al., "Unsupervised Learning of Dense Visual Representations", NeurIPS 2020 (§4.1, §4.2).

Usage
    python evaluate_linear.py            # embedded demo: random-init ResNet-18 probed on synthetic dead leaves, ~2 min CPU
    python evaluate_linear.py --weights runs/vader-demo/checkpoint.pth          # probe the vader.py demo checkpoint
    python evaluate_linear.py --weights vader.pth --dataset voc --data /data/VOCdevkit/VOC2012       # Table 1, VOC
    python evaluate_linear.py --weights moco_v2_800ep_pretrain.pth.tar --dataset cityscapes --data /data/cityscapes
    python evaluate_linear.py --weights random --arch resnet50 --dataset nyu --data /data/nyu_depth_v2   # lower bound
    torchrun --nproc_per_node=4 evaluate_linear.py --weights vader.pth --dataset voc --data ... \\
        --finetune --label-fraction 0.05                                      # Figure 4, one node
    python evaluate_linear.py --weights vader.pth --export-detectron2 vader_r50.pkl      # for Detectron2 (below)
--batch-size is global (split over ranks). Results: a table, then one JSON line on stdout and <output-dir>/metrics.json.

Weights (--weights) and which features are probed
    vader.py checkpoint        -> VADeR's decoder output, 128 x H/4 x W/4 (its own dense head)
    clove.py checkpoint        -> its ResNet encoder, dilated to 1/4 (see below)
    official MoCo checkpoint   -> state_dict with module.encoder_q.*; the ResNet, dilated to 1/4
    torchvision ResNet file    -> a ResNet state dict (supervised ImageNet baseline), dilated to 1/4
    random                     -> a randomly initialised ResNet (--arch), dilated to 1/4 (the lower bound)
"Dilated to 1/4": the strided convolutions of layer2..layer4 become dilated ones, so C5 comes out at 1/4 of the
input, the resolution of VADeR's decoder (§4.1, DeepLab's large field of view). The feature extractor is
common.dense_feature_model, shared with davis_propagate.py. --arch only matters for 'random' (and as a fallback):
checkpoints carry or reveal their depth.

Data sets (--dataset, --data)
    voc         VOC2012 layout: JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (preferred) or
                SegmentationClass/<id>.png (palette or grey index PNGs, 255 = void), ImageSets/Segmentation/
                {train_aug,train,val}.txt. Trains on train_aug when that list exists (the paper's choice), else train.
                21 classes.
    cityscapes  the layout torchvision.datasets.Cityscapes reads: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png,
                gtFine/{train,val}/<city>/*_gtFine_labelIds.png; label ids -> the 19 train ids (others -> 255).
    nyu         NYU-depth v2, the standard 795 / 654 split, as a folder (see "Preparing NYU-depth v2" below):
                rgb/<name>.png, depth/<name>.png (16-bit, millimetres, 0 = no measurement), train.txt, val.txt.
    (no --data) the embedded synthetic set: dead-leaves images (common.DeadLeaves) whose per-pixel class is the
                class of the shape (4 classes + background), shown by its texture family and its overlapping hue
                palette. Runs on a fresh machine.
Images are resized to a fixed input of --image-size rows (columns: the data set's usual aspect ratio, a multiple of
32: VOC/synthetic square, Cityscapes 1:2, NYU 3:4). Training labels are resized to the input with nearest neighbour;
validation logits are upsampled bilinearly to each label's own (native) size and scored there.

Metrics
    segmentation: one confusion matrix accumulated over all validation pixels (255 ignored); IoU_c = TP / (TP + FP + FN);
                  mIoU = mean over the classes that occur in the ground truth or the predictions; pixel accuracy.
    depth:        per image over pixels with ground truth (> 0), prediction clamped to [1e-3, 10] m: RMSE, abs-rel
                  = mean |pred - gt| / gt, delta1 = fraction with max(pred/gt, gt/pred) < 1.25; averaged over images
                  (the convention of Eigen et al. and most NYU code).
    trials:       mean and sample standard deviation over --trials runs with seeds --seed, --seed + 1, ...

Efficiency: features are computed once per image and cached
    The frozen probe uses no augmentation, so the backbone sees every training image exactly once: its features are
    cached (fp16, in memory, on each rank for its shard) and all epochs of all trials train the 1x1 convolution on the
    cache, orders of magnitude faster than re-running the backbone each epoch. When the cache would exceed --cache-gb
    (VOC train_aug with a dilated ResNet-50 is ~100 GB) the features are recomputed every epoch instead. Validation
    runs the backbone once and applies every trial's head to the same features.

Choices the paper leaves open (our defaults, and why)
    - Features are centred per channel and divided by one overall scale (the RMS of the channels' std), statistics
      of the training features, before the 1x1 convolution. This is still a linear probe (it folds into the
      convolution) but lets one learning rate fit VADeR's small decoder outputs and a dilated ResNet's large C5
      activations alike; one scale rather than one per channel, so near-constant channels are not blown up.
    - Optimiser: SGD (momentum 0.9, weight decay 1e-4), cosine learning-rate decay to 0; --lr 0.1 for the probe
      (0.01 for depth, whose L1 gradients do not shrink as the fit improves) and 0.01 for fine-tuning; 20 probe
      epochs, 30 fine-tuning epochs. The probe's weights start at N(0, 0.01^2), its bias at 0 (depth: the mean
      training depth).
    - Fine-tuning (§4.2): the network is VADeRNet (ResNet + FPN + semantic merge, the same for every initialisation)
      with batch norm on the FPN layers, plus a 1x1 convolution. A vader.py checkpoint initialises encoder, FPN and
      decoder (its FPN convolution biases are dropped: the new batch norms take their role); every other kind
      initialises the encoder only, FPN and decoder start random. Under DDP on GPUs all batch norms become SyncBN;
      PyTorch has no SyncBN on CPU, so CPU runs keep per-rank statistics. Augmentation: horizontal flip, and for
      segmentation a random crop of 50-100% of the image area.
    - --label-fraction keeps round(fraction x N) training images (at least 1), drawn by seed: trial t uses seed
      --seed + t, so the trials also measure the spread over labelled subsets.

Preparing NYU-depth v2 (once, on a machine with h5py and scipy; not needed at run time)
    Download nyu_depth_v2_labeled.mat (2.8 GB, the 1449 labelled frames) and splits.mat (trainNdxs: 795, testNdxs:
    654, 1-based) from the NYU-depth v2 page, then run:
        import os, h5py, numpy as np, scipy.io
        from PIL import Image
        out = "nyu_depth_v2"; os.makedirs(f"{out}/rgb"); os.makedirs(f"{out}/depth")
        with h5py.File("nyu_depth_v2_labeled.mat", "r") as f:          # MATLAB v7.3: arrays are transposed
            for i in range(f["images"].shape[0]):
                rgb = np.transpose(f["images"][i], (2, 1, 0))             # 3 x W x H -> H x W x 3, uint8
                depth = np.transpose(f["depths"][i], (1, 0))              # W x H -> H x W, metres (in-painted)
                Image.fromarray(rgb).save(f"{out}/rgb/{i + 1:05d}.png")
                Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(f"{out}/depth/{i + 1:05d}.png")
        splits = scipy.io.loadmat("splits.mat")
        for name, key in (("train", "trainNdxs"), ("val", "testNdxs")):
            with open(f"{out}/{name}.txt", "w") as f:
                f.writelines(f"{int(n):05d}\\n" for n in splits[key].ravel())
    The 654 official test frames serve as the validation split, as in the paper.

Detectron2 export (--export-detectron2 OUT.pkl)
    Keeps the ResNet encoder of a vader.py / clove.py / MoCo / torchvision file and renames its keys the way MoCo's
    and CLoVE's converters do (layerN -> resN+1, bnK -> convK.norm, downsample -> shortcut, stem.*), as numpy arrays
    pickled as {"model": ..., "__author__": ..., "matching_heuristics": True}. The FPN and decoder are not exported.
    Use it in a Detectron2 config with:
        MODEL.WEIGHTS: "OUT.pkl"
        MODEL.PIXEL_MEAN: [123.675, 116.280, 103.530]      MODEL.PIXEL_STD: [58.395, 57.120, 57.375]
        INPUT.FORMAT: "RGB"                                  MODEL.RESNETS.STRIDE_IN_1X1: False
        MODEL.RESNETS.NORM: "SyncBN"                         MODEL.FPN.NORM: "SyncBN"
        MODEL.RESNETS.DEPTH: 50  (18/34 also need MODEL.RESNETS.RES2_OUT_CHANNELS: 64)
    i.e. torchvision's RGB mean/std times 255 and stride in the 3x3 convolution (torchvision's ResNet v1.5).

Public names: VOCSegmentation, CityscapesSegmentation, NYUDepth, SyntheticSegmentation, Samples, LinearProbe,
FinetuneNet, finetune_network, confusion_matrix, segmentation_scores, depth_image_errors, label_subset,
export_detectron2, evaluate, main.
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
from vader import VADeRNet

IGNORE = 255
DEPTH_PNG_SCALE = 1000.0  # NYU depth PNGs store millimetres
DEPTH_RANGE = (1e-3, 10.0)  # metres; predictions are clamped to it before scoring

# ---- arguments ----
DEMO_PRESET = dict(  # used when --data is not given: random-init ResNet-18 on the embedded synthetic set, ~2 min CPU
    arch="resnet18", image_size=96, batch_size=16, epochs=10, synthetic_train=256, synthetic_val=64, workers=0,
    output_dir="runs/evaluate-demo",
)


def get_parser():
    p = argparse.ArgumentParser(description="Frozen-feature linear probes (VADeR §4.1), low-label fine-tuning (§4.2) "
                                "and Detectron2 export.", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="random", help="vader.py/clove.py checkpoint, official MoCo checkpoint "
                   "(module.encoder_q.*), torchvision ResNet state dict, or 'random'")
    p.add_argument("--arch", default="resnet50", help="ResNet depth for 'random' (checkpoints carry or reveal theirs)")
    p.add_argument("--dataset", default=None, choices=["voc", "cityscapes", "nyu"],
                   help="layout of --data (see the module docstring); omit both for the embedded synthetic set")
    p.add_argument("--data", default=None, help="data set root; omit it for the embedded synthetic set and demo preset")
    p.add_argument("--train-split", default="auto", help="VOC training list: 'auto' (train_aug when "
                   "ImageSets/Segmentation/train_aug.txt exists, else train), 'train_aug' or 'train'")
    p.add_argument("--output-dir", default="runs/evaluate", help="metrics.json and log.jsonl go here")
    p.add_argument("--finetune", action="store_true", help="§4.2: train encoder + FPN + decoder + head instead of a "
                   "1x1 conv on frozen features")
    p.add_argument("--label-fraction", type=float, default=1.0, help="fraction of the training images used "
                   "(paper: 0.02, 0.05, 0.1, 0.2, 0.5, 1); the subset is fixed by the trial's seed")
    p.add_argument("--trials", type=int, default=5, help="repetitions with seeds seed, seed+1, ... (paper: 5)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training images (default: 20 for the "
                   "probe, 30 for fine-tuning); the cosine schedule spans them")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (images), split evenly over ranks")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: 0.1 probe, 0.01 depth probe and "
                   "fine-tuning); lower it if the loss diverges, raise it when the probe underfits")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--image-size", type=int, default=None, help="input rows, a multiple of 32 (columns follow the "
                   "data set's aspect ratio); default 224 VOC/NYU, 256 Cityscapes (x 512)")
    p.add_argument("--cache-gb", type=float, default=16.0, help="cache the frozen training features in memory (per "
                   "rank) when they fit in this many GB, else recompute them every epoch")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per rank (0: in the main process)")
    p.add_argument("--seed", type=int, default=0, help="seed of trial 0 (head initialisation, order, label subset)")
    p.add_argument("--precision", default="auto", choices=common.PRECISIONS, help=common.PRECISION_HELP)
    p.add_argument("--synthetic-train", type=int, default=1000, help="training images of the embedded set (no --data)")
    p.add_argument("--synthetic-val", type=int, default=200, help="validation images of the embedded set (no --data)")
    p.add_argument("--export-detectron2", default=None, metavar="OUT.pkl", help="write the ResNet of --weights as a "
                   "Detectron2 checkpoint and exit (no evaluation)")
    p.add_argument("--feature-picture", default=None, metavar="OUT.png", help="write VADeR's Figures 2 and 5 for "
                   "--weights (4 validation images, their features in PCA colours, a query pixel's similarity map) "
                   "and exit (no evaluation)")
    return p


# ---- data ----
def read_split(path):
    """Names from a split file, one per line; also accepts DeepLab lists ("/JPEGImages/x.jpg /Seg.../x.png")."""
    if not os.path.isfile(path):
        raise common.UserError(f"{path}: split file not found; the data set folder needs it (see --dataset)")
    with open(path) as f:
        return [os.path.splitext(os.path.basename(line.split()[0]))[0] for line in f if line.strip()]


def check_pairs(pairs):
    """Every (image, label) file exists and has the same width x height; reads headers only, so it is quick."""
    for image_path, label_path in pairs:
        for path in (image_path, label_path):
            if not os.path.isfile(path):
                raise common.UserError(f"{path}: file not found (listed in the split)")
        with Image.open(image_path) as a, Image.open(label_path) as b:
            if a.size != b.size:
                raise common.UserError(f"{image_path} is {a.size[0]}x{a.size[1]} but its label {label_path} is "
                                       f"{b.size[0]}x{b.size[1]}; image and label must have the same size")


def read_index_png(path):
    """A class-index PNG (palette or grey) as uint8 H x W; colour-coded (RGB) label images are refused."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise common.UserError(f"{path}: label mode {img.mode}; expected a palette or greyscale index PNG")
        return np.array(img, dtype=np.uint8)


class DenseLabelSet:
    """A list of (image, dense label) samples. `read(i)` -> (PIL RGB image, label ndarray H x W): uint8 class ids
    (255 = ignore) for segmentation, float32 metres (0 = no measurement) for depth."""

    task, num_classes, aspect, default_size = "segmentation", 0, 1.0, 224

    def __init__(self, pairs):
        self.pairs = pairs
        check_pairs(pairs)

    def __len__(self):
        return len(self.pairs)

    def read(self, index):
        image_path, label_path = self.pairs[index]
        return common.load_image(image_path), self.read_label(label_path)

    def describe(self, index):
        return self.pairs[index][0]


class VOCSegmentation(DenseLabelSet):
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
                    pairs.append((os.path.join(image_dir, city, name), os.path.join(root, "gtFine", split, city, label)))
        if not pairs:
            raise common.UserError(f"{image_dir}: no *_leftImg8bit.png images")
        super().__init__(pairs)

    def read_label(self, path):
        return self.TRAIN_IDS[read_index_png(path)]


class NYUDepth(DenseLabelSet):
    task, aspect = "depth", 4 / 3

    def __init__(self, root, split):
        names = read_split(os.path.join(root, f"{split}.txt"))
        rgb = [os.path.join(root, "rgb", f"{n}.png") for n in names]
        rgb = [p if os.path.isfile(p) else p[:-4] + ".jpg" for p in rgb]
        super().__init__(list(zip(rgb, [os.path.join(root, "depth", f"{n}.png") for n in names])))

    @staticmethod
    def read_label(path):
        with Image.open(path) as img:
            if img.mode not in ("I;16", "I;16B", "I", "I;16L"):
                raise common.UserError(f"{path}: depth PNG mode {img.mode}; expected 16-bit millimetres")
            return np.array(img, dtype=np.float32) / DEPTH_PNG_SCALE  # H x W metres, 0 = missing


class SyntheticSegmentation(DenseLabelSet):
    """The embedded set: dead-leaves images; a pixel's class is the texture family of the shape covering it."""

    def __init__(self, length, size, seed, first_index=0):
        self.leaves = common.DeadLeaves(size=size, seed=seed)
        self.num_classes = self.leaves.num_classes + 1  # + background
        self.length, self.first = length, first_index

    def __len__(self):
        return self.length

    def read(self, index):
        image, classes, _ = self.leaves.image(self.first + index)
        return image, classes

    def describe(self, index):
        return f"synthetic image {self.first + index}"


def build_datasets(args):
    """(train set, validation set) of --dataset; the embedded synthetic pair when --data is not given."""
    if args.data is None:
        return (SyntheticSegmentation(args.synthetic_train, args.image_size, args.seed),
                SyntheticSegmentation(args.synthetic_val, args.image_size, args.seed, first_index=10**6))
    if not os.path.isdir(args.data):
        raise common.UserError(f"--data {args.data}: no such folder")
    if args.dataset == "voc":
        split = args.train_split
        if split == "auto":
            has_aug = os.path.isfile(os.path.join(args.data, "ImageSets", "Segmentation", "train_aug.txt"))
            split = "train_aug" if has_aug else "train"
        return VOCSegmentation(args.data, split), VOCSegmentation(args.data, "val")
    if args.dataset == "cityscapes":
        return CityscapesSegmentation(args.data, "train"), CityscapesSegmentation(args.data, "val")
    return NYUDepth(args.data, "train"), NYUDepth(args.data, "val")


def input_shape(source, image_size):
    """(rows, columns) of the network input: --image-size rows, the data set's aspect, multiples of 32."""
    return image_size, max(32, int(round(image_size * source.aspect / 32)) * 32)


class Samples(torch.utils.data.Dataset):
    """Items of a DenseLabelSet as tensors: (image 3 x h x w at the input size, label, index).

    The label is resized to the input (nearest) for training, and left at its native size for validation
    (`native_labels`), where the logits are upsampled to it. `augment` (fine-tuning only): a horizontal flip, and for
    segmentation a random crop of 50-100% of the area, drawn from (seed, epoch, index).
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
        label = torch.from_numpy(np.ascontiguousarray(label))  # H x W
        if self.augment:
            rng = common.sample_rng(self.seed, self.epoch, k)
            if self.source.task == "segmentation":
                aspect = self.shape[1] / self.shape[0]
                box = common.sample_crop_box(rng, *image.size, scale=(0.5, 1.0), ratio=(aspect, aspect))
                image = image.crop((box.x0, box.y0, box.x1, box.y1))
                label = label[box.y0:box.y1, box.x0:box.x1]
            if rng.random() < 0.5:
                image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label.flip(1)
        image = common.to_tensor(image.resize(self.shape[::-1], Image.BILINEAR))  # 3 x h x w
        if not self.native:
            label = F.interpolate(label[None, None].float(), size=self.shape, mode="nearest")[0, 0]  # h x w
        label = label.long() if self.source.task == "segmentation" else label.float()
        return image, label, index


def collate_native(batch):
    """Stack the images; native-size labels stay a list (their sizes differ)."""
    images, labels, indices = zip(*batch)
    return torch.stack(images), list(labels), torch.tensor(indices)


def label_subset(n, fraction, seed):
    """The sorted indices of round(fraction x n) training images (at least 1), fixed by `seed`."""
    if not 0 < fraction <= 1:
        raise common.UserError(f"--label-fraction {fraction}: must be in (0, 1]")
    keep = max(1, int(round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:keep].tolist())


def shard(indices, rank, world):
    """This rank's share of `indices`, padded by wrapping so every rank gets the same count (equal step counts)."""
    per_rank = math.ceil(len(indices) / world)
    padded = indices + indices[: per_rank * world - len(indices)]
    return padded[rank::world]


def loader(samples, batch_size, workers, device, shuffle_seed=None, drop_last=False, collate=None):
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=shuffle_seed is not None,
                                       generator=generator, num_workers=workers, drop_last=drop_last,
                                       collate_fn=collate, pin_memory=device.type == "cuda")


# ---- models ----
class LinearProbe(nn.Module):
    """§4.1's linear predictor: standardisation (fixed statistics of the training features: per-channel mean, one
    overall scale) and a 1x1 convolution. Both are affine, so the probe is exactly one 1x1 conv on the raw features."""

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


class FinetuneNet(nn.Module):
    """§4.2's network: VADeRNet (ResNet + FPN with batch norm + semantic merge) and a 1x1 convolution."""

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
    if kind == "clove":
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    net = FinetuneNet(arch, outputs)
    common.load_resnet_state(net.body.encoder, state, weights)
    return net, f"{kind} weights {weights} ({arch}, encoder only; FPN and decoder random)"


# ---- metrics ----
def confusion_matrix(pred, target, num_classes):
    """K x K counts, rows = ground truth, columns = prediction; pixels labelled 255 (or >= K) are skipped."""
    pred, target = pred.flatten().long(), target.flatten().long()
    keep = target < num_classes  # drops IGNORE
    return torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2).view(
        num_classes, num_classes)


def segmentation_scores(confusion):
    """mIoU over the classes present in ground truth or prediction, pixel accuracy, and per-class IoU (None when a
    class never occurs)."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp  # TP + FP + FN
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    return dict(miou=float(iou[present].mean()) if present.any() else 0.0,
                pixel_acc=float(tp.sum() / confusion.sum().clamp(min=1)),
                per_class_iou=[float(v) if p else None for v, p in zip(iou, present)])


def depth_image_errors(pred, gt):
    """(RMSE, abs-rel, delta1) of one image over the pixels with ground truth; None when it has none."""
    valid = gt > 0
    if not valid.any():
        return None
    p, g = pred[valid].double().clamp(*DEPTH_RANGE), gt[valid].double()
    rmse = float(((p - g) ** 2).mean().sqrt())
    abs_rel = float(((p - g).abs() / g).mean())
    delta1 = float((torch.maximum(p / g, g / p) < 1.25).double().mean())
    return rmse, abs_rel, delta1


def all_reduce_sum(tensor):
    if common.distributed():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def evaluate(encode, heads, val_loader, task, num_classes, d, precision, desc="val"):
    """Scores of every head on the validation set; `encode` (the frozen backbone, or identity) runs once per batch.

    Logits are upsampled bilinearly to each label's native size. Counts are summed over ranks, so the result is
    the same as one process scoring the whole set.
    """
    k = len(heads)
    confusion = torch.zeros(k, num_classes, num_classes, dtype=torch.long)
    depth_sums = torch.zeros(k, 4, dtype=torch.float64)  # per head: sum of RMSE, abs-rel, delta1, images
    for images, labels, _ in common.throughput_bar(val_loader, len(val_loader), d.is_main, desc=desc):
        with common.autocast(d.device, precision):
            features = encode(images.to(d.device, non_blocking=True))  # N x C x h/4 x w/4
            outputs = [head(features).float() for head in heads]  # k x [N x K x h/4 x w/4]
        for j, label in enumerate(labels):
            for h, out in enumerate(outputs):
                up = F.interpolate(out[j:j + 1], size=label.shape, mode="bilinear", align_corners=False)[0]  # K x H x W
                if task == "segmentation":
                    confusion[h] += confusion_matrix(up.argmax(0).cpu(), label, num_classes)
                else:
                    errors = depth_image_errors(up[0].cpu(), label)
                    if errors is not None:
                        depth_sums[h] += torch.tensor([*errors, 1.0], dtype=torch.float64)
    if task == "segmentation":
        return [segmentation_scores(c) for c in all_reduce_sum(confusion.to(d.device)).cpu()]
    sums = all_reduce_sum(depth_sums.to(d.device)).cpu()
    return [dict(rmse=float(s[0] / s[3]), abs_rel=float(s[1] / s[3]), delta1=float(s[2] / s[3])) for s in sums]


# ---- training ----
def task_loss(outputs, labels, task):
    """Cross-entropy (ignore 255) or L1 on pixels with depth, after upsampling to the label size (§4.1)."""
    outputs = F.interpolate(outputs.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)  # N x K x H x W
    if task == "segmentation":
        return F.cross_entropy(outputs, labels, ignore_index=IGNORE)
    valid = labels > 0  # N x H x W
    return (outputs[:, 0] - labels).abs()[valid].mean() if valid.any() else outputs.sum() * 0


def sgd(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def steps_per_epoch(indices, subset, per_rank):
    """Optimiser steps per epoch for this rank's `indices` of `subset`; a one-line error when there is none."""
    steps = len(indices) // per_rank
    if steps == 0:
        raise common.UserError(f"{len(subset)} training images are fewer than one batch per rank ({per_rank}); "
                               "lower --batch-size or raise --label-fraction")
    return steps


def fit(model, optimizer, epoch_batches, steps, task, args, d, log, mode, trial, desc):
    """SGD with cosine lr over args.epochs epochs of `steps` steps; epoch_batches(epoch) yields (inputs, labels).
    Used by the probe (cached features -> LinearProbe) and by fine-tuning (images -> FinetuneNet)."""
    total, step = args.epochs * steps, 0
    bar = common.throughput_bar(None, total, d.is_main, desc=desc)
    for epoch in range(args.epochs):
        running = 0.0
        for inputs, labels in epoch_batches(epoch):
            lr = set_lr(optimizer, step, total, args.lr)
            with common.autocast(d.device, args.precision):
                loss = task_loss(model(inputs.to(d.device, non_blocking=True)), labels.to(d.device), task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            running += value
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.1e}")
            step += 1
        loss_value = common.all_reduce_mean(running / steps)
        if not math.isfinite(loss_value):
            name = "probe" if mode == "probe" else "fine-tuning"
            raise common.UserError(f"non-finite {name} loss at trial {trial} epoch {epoch}; lower --lr")
        log.write(mode=mode, trial=trial, epoch=epoch, loss=loss_value, lr=lr)
    bar.close()


def set_lr(optimizer, step, total, peak):
    lr = common.cosine(step, total, peak, 0.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class FeatureCache:
    """The frozen backbone's features of this rank's training images, computed once (fp16), with their labels."""

    def __init__(self, backbone, samples, args, d):
        self.features, self.labels, self.position, filled = None, None, {}, 0
        batches = loader(samples, max(1, args.batch_size // d.world_size), args.workers, d.device)
        for images, labels, indices in common.throughput_bar(batches, len(batches), d.is_main, desc="features"):
            with torch.no_grad(), common.autocast(d.device, args.precision):
                f = backbone(images.to(d.device, non_blocking=True)).to("cpu", torch.float16)  # N x C x h x w
            if self.features is None:
                self.features = torch.empty(len(samples), *f.shape[1:], dtype=torch.float16)
                self.labels = torch.empty(len(samples), *labels.shape[1:], dtype=labels.dtype)
            self.features[filled:filled + len(f)], self.labels[filled:filled + len(f)] = f, labels
            self.position.update({index: filled + i for i, index in enumerate(indices.tolist())})
            filled += len(f)

    def batches(self, indices, batch_size, seed):
        """Shuffled batches (features, labels) of the cached images `indices` (with repeats, from padding)."""
        rows = torch.tensor([self.position[i] for i in indices])
        order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
        for b in range(0, len(order) - batch_size + 1, batch_size):
            yield self.features[order[b:b + batch_size]].float(), self.labels[order[b:b + batch_size]]


def feature_statistics(batches, task, d):
    """Per-channel mean and one overall std of the training features (summed over ranks), and the mean depth."""
    total = None
    for features, labels in batches:
        f = features.double().transpose(0, 1).flatten(1)  # C x (N h w)
        depth = labels[labels > 0].double() if task == "depth" else torch.zeros(0, dtype=torch.float64)
        part = torch.cat([f.sum(1), (f ** 2).sum(1), torch.tensor([f.shape[1], depth.sum(), depth.numel()])])
        total = part if total is None else total + part
    total = all_reduce_sum(total.to(d.device)).cpu()
    c = (len(total) - 3) // 2
    n = total[2 * c]
    mean = total[:c] / n
    variance = (total[c:2 * c] / n - mean ** 2).clamp(min=0)  # C
    # one scale for all channels (their RMS std): per-channel scales would blow up near-constant channels
    std = variance.mean().sqrt().clamp(min=1e-6).expand(c)  # C
    return mean.float(), std.float(), float(total[2 * c + 1] / max(float(total[2 * c + 2]), 1.0))


def train_probes(backbone, train_set, subsets, args, d, log):
    """One LinearProbe per trial, on frozen features (cached when they fit in --cache-gb)."""
    shape = input_shape(train_set, args.image_size)
    per_rank = max(1, args.batch_size // d.world_size)
    mine = sorted(set().union(*[shard(s, d.rank, d.world_size) for s in subsets]))  # this rank's images, all trials
    with torch.no_grad():
        probe_input = torch.zeros(1, 3, *shape, device=d.device)
        channels, h, w = backbone(probe_input).shape[1:]
    cache_gb = len(mine) * channels * h * w * 2 / 1e9
    cached = cache_gb <= args.cache_gb
    samples = Samples(train_set, mine, shape)
    if cached:
        cache = FeatureCache(backbone, samples, args, d)

    def batches(indices, seed):
        if cached:
            yield from cache.batches(indices, per_rank, seed)
            return
        for images, labels, _ in loader(Samples(train_set, indices, shape), per_rank, args.workers, d.device,
                                        shuffle_seed=seed, drop_last=True):
            with torch.no_grad(), common.autocast(d.device, args.precision):
                yield backbone(images.to(d.device, non_blocking=True)).float().cpu(), labels

    if d.is_main:
        print(f"probe: {channels}-d features at {h}x{w} for {shape[0]}x{shape[1]} inputs; "
              + (f"cached ({cache_gb:.2f} GB on this rank)" if cached else
                 f"recomputed each epoch (a cache would need {cache_gb:.1f} GB > --cache-gb {args.cache_gb})"))
    outputs = train_set.num_classes if train_set.task == "segmentation" else 1
    heads = []
    for trial, subset in enumerate(subsets):
        seed = args.seed + trial
        indices = shard(subset, d.rank, d.world_size)
        stats_batches = batches(indices, seed) if cached else (b for b, _ in zip(batches(indices, seed), range(20)))
        mean, std, mean_depth = feature_statistics(stats_batches, train_set.task, d)
        torch.manual_seed(seed)  # the head's initialisation: same on every rank, different per trial
        head = LinearProbe(channels, outputs, mean, std).to(d.device)
        if train_set.task == "depth":
            nn.init.constant_(head.conv.bias, mean_depth)
        model = nn.parallel.DistributedDataParallel(head) if d.world_size > 1 else head
        steps = steps_per_epoch(indices, subset, per_rank)
        fit(model, sgd(head, args), lambda epoch: batches(indices, seed * 1000 + epoch), steps, train_set.task,
            args, d, log, "probe", trial, desc=f"probe {trial + 1}/{len(subsets)}")
        heads.append(head.eval())
    return heads


def train_finetune(weights, train_set, subset, trial, args, d, log):
    """§4.2: one FinetuneNet trained end to end on `subset`; returns the unwrapped network in eval mode."""
    seed = args.seed + trial
    outputs = train_set.num_classes if train_set.task == "segmentation" else 1
    torch.manual_seed(seed)  # the random parts (FPN, decoder, head): same on every rank
    net, description = finetune_network(weights, args.arch, outputs)
    if train_set.task == "depth":
        nn.init.constant_(net.head.bias, float(np.mean([l[l > 0].mean() for l in
                                                        (train_set.read(i)[1] for i in subset[:20])])))
    net = net.to(d.device)
    model = net
    if d.world_size > 1:
        if d.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    per_rank = max(1, args.batch_size // d.world_size)
    indices = shard(subset, d.rank, d.world_size)
    samples = Samples(train_set, indices, input_shape(train_set, args.image_size), augment=True, seed=seed)
    steps = steps_per_epoch(indices, subset, per_rank)

    def epoch_batches(epoch):
        samples.set_epoch(epoch)
        for images, labels, _ in loader(samples, per_rank, args.workers, d.device, shuffle_seed=seed * 1000 + epoch,
                                        drop_last=True):
            yield images, labels

    model.train()
    fit(model, sgd(net, args), epoch_batches, steps, train_set.task, args, d, log, "finetune", trial,
        desc=f"finetune {trial + 1}/{args.trials}")
    return net.eval(), description


# ---- export ----
def export_detectron2(weights, path):
    """Write the ResNet encoder of `weights` as a Detectron2 .pkl; returns (kind, number of tensors)."""
    if weights == "random":
        raise common.UserError("--export-detectron2 needs --weights FILE (a vader.py/clove.py, MoCo or torchvision file)")
    kind, state, _ = common.read_weights(weights)
    if kind in ("vader", "clove"):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    exported = common.to_detectron2(state)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(exported, f)
    return kind, len(exported["model"])


def feature_picture(args):
    """VADeR Figures 2 and 5 for any weights, on the first 4 validation images of the data set."""
    model, description = common.dense_feature_model(args.weights, args.arch, {"vader": VADeRNet})
    _, val_set = build_datasets(args)
    shape = input_shape(val_set, args.image_size)
    images = [val_set.read(i)[0].resize((shape[1], shape[0]), Image.BILINEAR) for i in range(min(4, len(val_set)))]
    os.makedirs(os.path.dirname(os.path.abspath(args.feature_picture)), exist_ok=True)
    picture = common.feature_picture(model, images, args.feature_picture)
    common.print_result(dict(picture=args.feature_picture, weights=args.weights, features=description,
                             width=picture.size[0], height=picture.size[1]))


# ---- main ----
def summarise(per_trial):
    """Mean and sample std (0 for one trial) of every scalar metric over the trials."""
    names = [k for k, v in per_trial[0].items() if isinstance(v, float)]
    values = {k: np.array([t[k] for t in per_trial]) for k in names}
    return ({k: float(v.mean()) for k, v in values.items()},
            {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()})


def print_table(per_trial, mean, std):
    names = list(mean)
    print("trial  " + "  ".join(f"{n:>10}" for n in names))
    for t, scores in enumerate(per_trial):
        print(f"{t:>5}  " + "  ".join(f"{scores[n]:>10.4f}" for n in names))
    print(" mean  " + "  ".join(f"{mean[n]:>10.4f}" for n in names))
    print("  std  " + "  ".join(f"{std[n]:>10.4f}" for n in names))


def check_args(args, d):
    if args.data is not None and args.dataset is None:
        raise common.UserError("--data given without --dataset; pass --dataset voc, cityscapes or nyu")
    if args.image_size % 32:
        raise common.UserError(f"--image-size {args.image_size}: must be a multiple of 32 (the FPN's coarsest stride)")
    if args.batch_size % d.world_size:
        raise common.UserError(f"--batch-size {args.batch_size}: the global batch must split evenly over "
                               f"{d.world_size} ranks")
    if args.trials < 1 or args.epochs < 1:
        raise common.UserError("--trials and --epochs must be at least 1")
    if args.train_split not in ("auto", "train_aug", "train"):
        raise common.UserError(f"--train-split {args.train_split}: expected auto, train_aug or train")


def run(args):
    d = common.init_distributed()
    check_args(args, d)
    say = print if d.is_main else (lambda *a, **k: None)
    t_start = time.time()
    common.seed_all(args.seed)  # a 'random' backbone is the same on every rank and in every run with this seed
    train_set, val_set = build_datasets(args)
    os.makedirs(args.output_dir, exist_ok=True)
    log = common.JsonLog(os.path.join(args.output_dir, "log.jsonl"), d.is_main)
    subsets = [label_subset(len(train_set), args.label_fraction, args.seed + t) for t in range(args.trials)]
    shape = input_shape(train_set, args.image_size)
    val_samples = Samples(val_set, list(range(len(val_set)))[d.rank::d.world_size], shape, native_labels=True)
    val_loader = loader(val_samples, max(1, args.batch_size // d.world_size), args.workers, d.device,
                        collate=collate_native)
    data_name = args.dataset or "synthetic"
    say(f"{'fine-tuning' if args.finetune else 'frozen probe'} on {data_name} ({train_set.task}): "
        f"{len(subsets[0])} of {len(train_set)} training images (--label-fraction {args.label_fraction}), "
        f"{len(val_set)} validation images, {shape[0]}x{shape[1]} inputs, {args.trials} trial(s) x {args.epochs} "
        f"epochs, {d.world_size} rank(s), device {d.device}")

    if args.finetune:
        per_trial = []
        for trial, subset in enumerate(subsets):
            net, description = train_finetune(args.weights, train_set, subset, trial, args, d, log)
            per_trial += evaluate(lambda x: x, [net], val_loader, val_set.task, val_set.num_classes, d,
                                  args.precision, desc=f"val {trial + 1}/{args.trials}")
    else:
        backbone, description = common.dense_feature_model(args.weights, args.arch, {"vader": VADeRNet})
        backbone = backbone.to(d.device).eval().requires_grad_(False)
        say(f"features: {description}")
        heads = train_probes(backbone, train_set, subsets, args, d, log)
        per_trial = evaluate(backbone, heads, val_loader, val_set.task, val_set.num_classes, d, args.precision)

    mean, std = summarise(per_trial)
    result = dict(mode="finetune" if args.finetune else "probe", dataset=data_name, task=val_set.task,
                  weights=args.weights, model=description, label_fraction=args.label_fraction, trials=args.trials,
                  epochs=args.epochs, lr=args.lr, image_size=list(shape), train_images=len(subsets[0]),
                  val_images=len(val_set), mean=mean, std=std,
                  per_trial=[{k: v for k, v in t.items() if isinstance(v, float)} for t in per_trial],
                  seconds=round(time.time() - t_start, 1))
    if val_set.task == "segmentation":
        ious = np.array([[np.nan if v is None else v for v in t["per_class_iou"]] for t in per_trial])
        result["per_class_iou"] = [None if np.isnan(c).all() else float(np.nanmean(c)) for c in ious.T]
    log.write(event="end", **{k: v for k, v in result.items() if k != "per_trial"})
    if d.is_main:
        print_table(result["per_trial"], mean, std)
        common.print_result(result, os.path.join(args.output_dir, "metrics.json"))
    common.finish_distributed()
    return result


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.export_detectron2:
        kind, count = export_detectron2(args.weights, args.export_detectron2)
        print(f"wrote {count} ResNet tensors of the {kind} weights {args.weights} to {args.export_detectron2}; "
              "Detectron2 config: INPUT.FORMAT RGB, MODEL.PIXEL_MEAN [123.675, 116.280, 103.530], MODEL.PIXEL_STD "
              "[58.395, 57.120, 57.375], MODEL.RESNETS.STRIDE_IN_1X1 False, MODEL.RESNETS.NORM SyncBN, MODEL.FPN.NORM SyncBN")
        common.print_result(dict(export=args.export_detectron2, kind=kind, tensors=count, weights=args.weights))
        return
    if args.data is None:
        if args.dataset is not None:
            raise common.UserError(f"--dataset {args.dataset} needs --data (the data set's root folder)")
        common.apply_preset(parser, args, DEMO_PRESET, argv, announce="embedded synthetic segmentation set")
    depth = args.dataset == "nyu"  # L1 on metres: the probe's gradients do not shrink as it fits, so a lower lr
    defaults = dict(epochs=30, lr=0.01) if args.finetune else dict(epochs=20, lr=0.01 if depth else 0.1)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.image_size is None:
        args.image_size = CityscapesSegmentation.default_size if args.dataset == "cityscapes" else 224
    if args.feature_picture:
        return feature_picture(args)
    run(args)


if __name__ == "__main__":
    common.run_main(main)
