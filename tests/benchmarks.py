"""Side-by-side measurements for the closing notes and the README (not collected by pytest).

    python tests/benchmarks.py vader [--arch resnet50 --image-size 224 --batch-size 32 --repeats 5]
    python tests/benchmarks.py clove-position --arch resnet18 --image-size 128 --weights random runs/clove-demo/checkpoint.pth
    python tests/benchmarks.py probe-ceiling --arch resnet18 --image-size 96 --weights random runs/vader-demo/checkpoint.pth

Reports, measured in one run with the steps interleaved so that machine load hits both alike:
  - the full VADeR training step (f forward + backward, momentum update, g forward, matching gather, Eq. 2 with
    the queue, SGD step, enqueue) against the bare network cost on the same batch (f forward + backward of a
    plain mean, g forward, SGD step): the ratio is the overhead of the dense machinery;
  - PairedViews per image against a plain MoCo v2 two-crop transform (torchvision ops) on the same images;
  - img/s of the full step and peak memory (CUDA: max allocated; CPU: max RSS of the process).

clove-position: how much of CLoVE's local features is the cell's position in the view. Over 64 dead-leaves images,
the share of the variance of the L2-normalised C5 and projector features that the per-position mean (over images)
explains: 0 = no position, 1 = the feature is a function of the position alone.

probe-ceiling: what a linear read-out at 1/4 resolution can get from the embedded segmentation set (evaluate_linear's
256 training / 64 validation images), with the probe trained to convergence (full-batch Adam, 300 iterations, on
standardised features, labels sampled at the 1/4 grid): raw colour, 14 hand-made local statistics (colour, local
contrast at three scales, oriented gradient energy at two) and the frozen features of each --weights.
Prints one JSON line.
"""
import argparse
import copy
import json
import os
import random
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def moco_two_crop(size):
    import torchvision.transforms as T
    from PIL import ImageFilter
    blur = T.Lambda(lambda im: im.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0))))
    aug = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], 0.8),
                     T.RandomGrayscale(0.2), T.RandomApply([blur], 0.5), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])
    return lambda img: (aug(img), aug(img))


def bench_vader(a):
    import vader
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = vader.get_parser().parse_args(["--arch", a.arch, "--image-size", str(a.image_size),
                                          "--batch-size", str(a.batch_size), "--precision", a.precision])
    args.queue_size = a.queue_size
    leaves = common.DeadLeaves(size=max(160, a.image_size * 2))
    images = [leaves.image(i)[0] for i in range(a.batch_size)]

    views = vader.PairedViews(a.image_size)
    plain = moco_two_crop(a.image_size)
    t_views, t_plain = [], []
    for r in range(a.repeats):
        t_views.append(timed(lambda: [views(im, random.Random(i + 1000 * r)) for i, im in enumerate(images)], device))
        t_plain.append(timed(lambda: [plain(im) for im in images], device))
    batch = [views(im, random.Random(i)) for i, im in enumerate(images)]
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    v1 = torch.stack([b[0] for b in batch]).to(device, memory_format=fmt)
    v2 = torch.stack([b[1] for b in batch]).to(device, memory_format=fmt)
    matches = torch.stack([b[2] for b in batch]).to(device)

    f = vader.VADeRNet(a.arch).to(device, memory_format=fmt)
    g = copy.deepcopy(f).requires_grad_(False)
    queue = vader.PixelQueue(args.queue_size, 128).to(device)
    opt = torch.optim.SGD(f.parameters(), lr=1e-4, momentum=0.9)

    def full():
        loss, k = vader.forward_loss(f, f, g, queue, v1, v2, matches, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        queue.enqueue(k.detach())
        loss.item()

    def bare():
        with common.autocast(device, args.precision):
            loss = f(v1).float().mean()
            with torch.no_grad():
                g(v2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    full(), bare()  # warm-up
    t_full, t_bare = [], []
    for _ in range(a.repeats):
        t_full.append(timed(full, device))
        t_bare.append(timed(bare, device))
    step, net = statistics.median(t_full), statistics.median(t_bare)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return dict(benchmark="vader", device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                threads=torch.get_num_threads(), arch=a.arch, image_size=a.image_size, batch=a.batch_size, queue=a.queue_size,
                step_s=round(step, 4), bare_network_s=round(net, 4), step_over_network=round(step / net, 3),
                train_images_per_s=round(a.batch_size / step, 1),
                paired_views_ms_per_image=round(1000 * statistics.median(t_views) / a.batch_size, 2),
                moco_two_crop_ms_per_image=round(1000 * statistics.median(t_plain) / a.batch_size, 2),
                views_over_two_crop=round(statistics.median(t_views) / statistics.median(t_plain), 3),
                peak_memory_gib=round(peak, 2))


def position_share(features):
    """features N x C x h x w -> share of the variance of the unit-normalised features explained by the position."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    f = f - f.mean((0, 2, 3), keepdim=True)
    return (f.mean(0).pow(2).sum() * f.shape[0] / f.pow(2).sum()).item()


@torch.no_grad()
def bench_clove_position(a):
    import clove
    leaves = common.DeadLeaves(size=160, seed=0)
    x = torch.stack([common.to_tensor(leaves.image(i)[0].resize((a.image_size, a.image_size))) for i in range(64)])
    out = {}
    for weights in a.weights:
        torch.manual_seed(0)  # a fixed random initialisation
        net = clove.CLoVENet(a.arch)
        if weights != "random":
            kind, state, meta = common.read_weights(weights)
            if kind != "clove":
                raise SystemExit(f"{weights}: a {kind} checkpoint; clove-position needs clove.py checkpoints")
            net = clove.CLoVENet(meta.get("arch") or common.infer_arch(state) or a.arch)
            net.load_state_dict(state, strict=False)
        net.eval()
        c5 = common.resnet_stages(net.encoder, x)[-1]
        out[weights] = dict(c5=round(position_share(c5), 3), projector=round(position_share(net.projector(c5)), 3))
    return dict(image_size=a.image_size, images=len(x), position_share=out)


def local_statistics(x):
    """14 hand-made features at 1/4 resolution of N x 3 x H x W images in [0, 1]: mean colour, local contrast of the
    grey level at 3 window sizes, and gradient energies (x^2, y^2, xy, |x| + |y|) at 2 window sizes."""
    F = torch.nn.functional
    box = lambda t, k: F.avg_pool2d(t, k, 1, k // 2, count_include_pad=False)  # noqa: E731
    g = x.mean(1, keepdim=True)
    out = [F.avg_pool2d(x, 4)]
    for k in (5, 9, 13):
        out.append(F.avg_pool2d((box(g * g, k) - box(g, k) ** 2).clamp_min(0).sqrt(), 4))
    gx, gy = F.pad(g[..., :, 1:] - g[..., :, :-1], (0, 1)), F.pad(g[..., 1:, :] - g[..., :-1, :], (0, 0, 0, 1))
    for k in (5, 9):
        out += [F.avg_pool2d(box(t, k), 4) for t in (gx * gx, gy * gy, gx * gy, gx.abs() + gy.abs())]
    return torch.cat(out, 1)


def converged_probe_miou(train_features, train_labels, val_features, val_labels, classes, iterations=300):
    """mIoU of a linear classifier on standardised features (N x C x h x w, labels N x h x w) trained full-batch."""
    a = train_features.permute(0, 2, 3, 1).flatten(0, 2).float()
    b = val_features.permute(0, 2, 3, 1).flatten(0, 2).float()
    mean, std = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mean) / std, (b - mean) / std
    linear = torch.nn.Linear(a.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), 0.01)
    for _ in range(iterations):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(a), train_labels.flatten()).backward()
        optimizer.step()
    with torch.no_grad():
        confusion = torch.bincount(val_labels.flatten() * classes + linear(b).argmax(1), minlength=classes**2)
    confusion = confusion.view(classes, classes).float()
    iou = confusion.diag() / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).clamp_min(1)
    return round(iou.mean().item(), 4), [round(v, 3) for v in iou.tolist()]


@torch.no_grad()
def features_of(model, x):
    """Frozen features of images x (N x 3 x H x W in [0, 1]), ImageNet-normalised as the scripts feed them."""
    import torchvision.transforms.functional as TF
    model.eval()
    x = TF.normalize(x, common.IMAGENET_MEAN, common.IMAGENET_STD)
    return torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])


def bench_probe_ceiling(a):
    import numpy as np
    import evaluate_linear
    import vader
    splits = []
    for n, first in ((256, 0), (64, 10**6)):  # evaluate_linear's demo sets
        data = evaluate_linear.SyntheticSegmentation(n, a.image_size, seed=0, first_index=first)
        pairs = [data.read(i) for i in range(n)]
        images = torch.stack([torch.from_numpy(np.array(im)) for im, _ in pairs]).permute(0, 3, 1, 2).float() / 255
        labels = torch.stack([torch.from_numpy(lab[2::4, 2::4].astype(np.int64)) for _, lab in pairs])  # 1/4 grid
        splits.append((images, labels))
    (xt, yt), (xv, yv) = splits
    classes = int(max(yt.max(), yv.max())) + 1
    rows = {"colour": (torch.nn.functional.avg_pool2d(xt, 4), torch.nn.functional.avg_pool2d(xv, 4)),
            "local statistics": (local_statistics(xt), local_statistics(xv))}
    for weights in a.weights:
        torch.manual_seed(0)
        model, _ = common.dense_feature_model(weights, a.arch, {"vader": vader.VADeRNet})
        rows[weights] = (features_of(model, xt), features_of(model, xv))
    out = {}
    for name, (ft, fv) in rows.items():
        torch.manual_seed(0)
        miou, per_class = converged_probe_miou(ft, yt, fv, yv, classes)
        out[name] = dict(dim=ft.shape[1], miou=miou, per_class_iou=per_class)
    return dict(image_size=a.image_size, train_images=len(xt), val_images=len(xv), probe=out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["vader", "clove-position", "probe-ceiling"], help="what to measure (see above)")
    p.add_argument("--weights", nargs="+", default=["random"], help="clove-position, probe-ceiling: 'random' and/or checkpoints")
    p.add_argument("--arch", default="resnet50", help="ResNet depth")
    p.add_argument("--image-size", type=int, default=224, help="view size")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (one process)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (medians are reported)")
    p.add_argument("--queue-size", type=int, default=65536, help="negatives (the paper: 65536)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast on GPU")
    a = p.parse_args()
    if a.method == "clove-position":
        print(json.dumps(bench_clove_position(a)))
    elif a.method == "probe-ceiling":
        print(json.dumps(bench_probe_ceiling(a)))
    else:
        print(json.dumps(bench_vader(a)))


if __name__ == "__main__":
    main()
