"""Side-by-side measurements for the closing notes and the README (not collected by pytest).

    python tests/benchmarks.py vader --arch resnet50 --image-size 224 --batch-size 8 --repeats 5 [--profile]
    python tests/benchmarks.py clove --arch resnet50 --image-size 224 --local-crops 6 --batch-size 8 --repeats 5
    git worktree add ../before <commit>; python tests/benchmarks.py data --code ../before .
    python tests/benchmarks.py fingerprint --code ../before .
    python tests/benchmarks.py clove-position --arch resnet18 --image-size 128 --weights random runs/clove-demo/checkpoint.pth
    python tests/benchmarks.py probe-ceiling --arch resnet18 --image-size 96 --weights random runs/vader-demo/checkpoint.pth

vader, clove: the cost of the dense machinery over the bare network, measured in one process with the variants
interleaved (order reversed every round) so that machine load hits all alike; every figure is the median [min, max]
over the rounds of a ratio taken within one round.
  - vader: the full training step (f forward + backward, momentum update, g forward, matching gathers, Eq. 2 with
    the queue, SGD step, enqueue) against the bare network on the same batch (f forward + backward of a plain mean,
    g forward, SGD step). Eq. 2 (q @ queue^T and the cross-entropy over 1 + K logits, forward + backward), the
    EMA, the gathers and the enqueue are also timed alone; step_minus_eq2 is (step - network - Eq. 2) / network.
    --compare DIR times Eq. 2 and the EMA of another checkout in the same rounds.
  - clove: clove_step + backward + LARS + teacher EMA against the student's encoder + projector forward/backward of
    a plain mean over every view, the teacher's forward of the global views and LARS; the NMHSA predictor, the
    2 + 2L Eq. 2 terms and the EMA are also timed alone.
  - --profile adds torch.profiler's top ops (self time, ms per call) of the step and of each part alone.
  - img/s of the full step and peak memory (CUDA: max allocated; CPU: max RSS of the process).

data: what the data path moves and costs, for each --code checkout side by side in one process:
the bytes of one collated sample (per field) and of a per-GPU batch at the papers' settings (VADeR 128/4 = 32,
CLoVE 2048/4 = 512 images), which cross the workers' shared memory and then the host-to-device copy; the shared
memory in flight per rank (batch x workers x prefetch factor of the checkout's make_loader); and the worker's cost
per image (one thread, __getitem__ on 500 x 375 JPEGs: decode, views, correspondences), with a plain MoCo v2
two-crop transform (torchvision ops) on the same files for reference; alone, the conversion a view ends with
(to_tensor: float, normalised; or to_uint8) and, where the checkout has it, common.normalize in the training process.

clove-position: how much of CLoVE's local features is the cell's position in the view. Over 64 dead-leaves images,
the share of the variance of the L2-normalised C5 and projector features that the per-position mean (over images)
explains: 0 = no position, 1 = the feature is a function of the position alone.

probe-ceiling: what a linear read-out at 1/4 resolution can get from the embedded segmentation set (evaluate_linear's
256 training / 64 validation images), with the probe trained to convergence (full-batch Adam, 300 iterations, on
standardised features, labels sampled at the 1/4 grid): raw colour, 14 hand-made local statistics (colour, local
contrast at three scales, oriented gradient energy at two) and the frozen features of each --weights.
Prints one JSON line.

warmup-memory: what DDP's bucket-settling warm-up (common.wrap_ddp) holds for backward against a training step, as
the bytes of the tensors autograd saves (distinct storages), for --method's network at the papers' view sizes:
per image in fp32 and under bf16 autocast, then at --per-rank images: the old warm-up (the whole per-rank batch in
fp32), the new one (two images' views under the training precision) and the training step (per-rank batch, bf16).

stop-flag: what the preemption flag costs a step: the loss's all-reduce with the flag riding along (2 float64)
against the loss alone (1) and against a second collective for the flag, timed over --repeats x 200 rounds on two
gloo processes of this machine (median microseconds per all-reduce call).

fingerprint: whether a change kept every computation: for each --code checkout, short fixed runs (3 steps, embedded
data, workers 0) of vader.py and clove.py with the paper's settings and each ablation, and the sha256 of every tensor
of the final checkpoint's networks, queue and optimiser state. Identical digests mean bitwise-identical weights.
"""
import argparse
import collections
import contextlib
import copy
import functools
import hashlib
import json
import os
import random
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

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


def interleaved(fns, repeats, device):
    """Time every callable of `fns` (name -> fn) once per round for `repeats` rounds, the order reversed every other
    round, so that machine load and cache state hit all of them alike. Returns name -> [seconds per round]."""
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[name].append(timed(fns[name], device))
    return times


def spread(values, digits=3):
    """median [min, max] of a list of numbers."""
    return dict(median=round(statistics.median(values), digits), min=round(min(values), digits),
                max=round(max(values), digits))


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def profile_top(fns, device, rounds=2, rows=8):
    """torch.profiler over `rounds` calls of each callable (name -> fn), interleaved: total and top ops by self time
    (ms per call) of each, e.g. the full step and each dense part alone."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    self_ms = {name: collections.Counter() for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            with profile(activities=activities) as prof:
                fns[name]()
            for e in prof.key_averages():
                self_ms[name][e.key] += getattr(e, attr) / 1000 / rounds
    return {name: dict(total_ms=round(sum(c.values()), 1), top_ms={k: round(v, 1) for k, v in c.most_common(rows)})
            for name, c in self_ms.items()}


def dense_parts_report(t, parts, digits=4):
    """Each timed part over the bare network of the same round: median [min, max] over the rounds."""
    return {f"{name}_over_network": spread([x / b for x, b in zip(t[name], t["bare"])], digits) for name in parts}


def bench_vader(a):
    """VADeR's training step against the bare network on the same batch, plus its dense parts timed alone."""
    import vader
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = vader.get_parser().parse_args(["--arch", a.arch, "--image-size", str(a.image_size),
                                          "--batch-size", str(a.batch_size), "--precision", a.precision,
                                          "--num-matches", str(a.num_matches)])
    args.queue_size = a.queue_size
    args.temperature = vader.TEMPERATURES[args.objective]  # as vader.parse_args does
    args.loss_weight = vader.LOSS_WEIGHTS[args.objective]
    load_before = load_average()
    leaves = common.DeadLeaves(size=max(160, a.image_size * 2))
    images = [leaves.image(i)[0] for i in range(a.batch_size)]
    views = vader.PairedViews(a.image_size, num_matches=a.num_matches)
    batch = [views(im, random.Random(i)) for i, im in enumerate(images)]
    fmt = common.memory_format(device, "auto")
    u1, u2, matches, appearance = [torch.stack([b[i] for b in batch]).to(device) for i in range(4)]  # uint8 views
    v1 = common.apply_appearance(u1, appearance[:, 0], fmt)  # the network's inputs, for the bare network
    v2 = common.apply_appearance(u2, appearance[:, 1], fmt)
    n, m = matches.shape[:2]

    torch.manual_seed(0)
    f = vader.VADeRNet(a.arch).to(device, memory_format=fmt)
    g = copy.deepcopy(f).requires_grad_(False)
    queue = vader.PixelQueue(args.queue_size, 128).to(device)
    opt = torch.optim.SGD(f.parameters(), lr=1e-4, momentum=0.9)
    keys = {}

    def full():  # the training loop's step (vader.train), minus data loading and logging
        with common.autocast(device, args.precision):
            loss, k, top1 = vader.vader_step(f, g, queue, u1, u2, matches, appearance, args.temperature,
                                             args.momentum, args.shuffle_bn_splits, "0/0", fmt)
        loss = args.loss_weight * loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        k = k.flatten(0, 1)
        queue.enqueue(k)
        keys["k"] = k
        torch.stack([loss.detach(), top1]).tolist()  # the step's one read

    def bare():  # the same network work: f forward + backward, g forward, SGD step
        with common.autocast(device, args.precision):
            loss = f(v1).float().mean()
            with torch.no_grad():
                g(v2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    with torch.no_grad():
        q0 = vader.gather_cells(f(v1), matches[:, :, 0]).reshape(n * m, -1)

    def eq2():  # Eq. 2 alone: the contrast over the queue (q @ queue^T, cross-entropy over 1 + K logits), fwd + bwd
        q = q0.detach().requires_grad_(True)
        loss = args.loss_weight * vader.vader_loss(q, keys["k"], queue.keys, args.temperature)
        loss.backward()
        loss.item()

    def ema():  # g <- m g + (1 - m) f
        common.ema_update(g, f, args.momentum, copy_buffers=False)

    z0 = torch.randn(n, 128, a.image_size // 4, a.image_size // 4, device=device)

    def gathers():  # the matched-cell gathers of q (forward + backward) and of k
        z = z0.clone().requires_grad_(True)
        vader.gather_cells(z, matches[:, :, 0]).sum().backward()
        with torch.no_grad():
            vader.gather_cells(z0, matches[:, :, 1])

    def enqueue():
        queue.enqueue(keys["k"].detach())

    def appearance_ops():  # both views' colour jitter, grayscale, blur and normalisation, on the device
        common.apply_appearance(u1, appearance[:, 0], fmt), common.apply_appearance(u2, appearance[:, 1], fmt)

    parts = dict(full=full, bare=bare, eq2=eq2, ema=ema, gathers=gathers, enqueue=enqueue, appearance=appearance_ops)
    if a.compare:  # the same parts as another checkout (e.g. the commit before a speed-up) implements them
        before = load_tree(a.compare)

        def eq2_compare():
            q = q0.detach().requires_grad_(True)
            loss = args.loss_weight * before["vader"].vader_loss(q, keys["k"], queue.keys, args.temperature)
            loss.backward()
            loss.item()

        parts.update(eq2_compare=eq2_compare,
                     ema_compare=lambda: before["common"].ema_update(g, f, args.momentum, copy_buffers=False))
    full(), bare()  # warm-up
    t = interleaved(parts, a.repeats, device)
    rest = [(fu - b - e) / b for fu, b, e in zip(t["full"], t["bare"], t["eq2"])]
    others = [(t["ema"][i] + t["gathers"][i] + t["enqueue"][i]) / t["bare"][i] for i in range(a.repeats)]
    out = dict(benchmark="vader", device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
               threads=torch.get_num_threads(), arch=a.arch, image_size=a.image_size, batch=a.batch_size,
               matches=a.num_matches, queue=a.queue_size, precision=a.precision, repeats=a.repeats,
               compare=a.compare, step_s=spread(t["full"]), bare_network_s=spread(t["bare"]),
               step_over_network=spread([fu / b for fu, b in zip(t["full"], t["bare"])]),
               **dense_parts_report(t, [p for p in parts if p not in ("full", "bare")]),
               ema_gathers_enqueue_over_network=spread(others, 4),
               step_minus_eq2_over_network=spread(rest),
               appearance_over_step=spread([x / fu for x, fu in zip(t["appearance"], t["full"])], 4),
               train_images_per_s=round(a.batch_size / statistics.median(t["full"]), 2))
    return finish_report(out, a.profile and dict(full=full, eq2=eq2, ema=ema, gathers=gathers), device, load_before)


def finish_report(out, profiled, device, load_before):
    """Add the profile's top ops (when `profiled` maps names to step functions), peak memory and the load before and after."""
    if profiled:
        out["profile"] = profile_top(profiled, device)
    out["peak_memory_gib"] = peak_memory(device)
    out["load_average_before_after"] = [load_before, load_average()]
    return out


def peak_memory(device):
    """GiB: CUDA max allocated, or the process's max RSS on a CPU."""
    return round(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def bench_clove(a):
    """CLoVE's training step against the bare network on the same batch, plus its dense parts timed alone."""
    import clove
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = clove.get_parser().parse_args(["--arch", a.arch, "--image-size", str(a.image_size), "--local-crops",
                                          str(a.local_crops), "--local-size", str(a.local_size), "--batch-size",
                                          str(a.batch_size), "--precision", a.precision])
    load_before = load_average()
    leaves = common.DeadLeaves(size=max(160, a.image_size * 2))
    views = clove.CLoVEViews(args.image_size, args.local_crops, args.local_size, args.global_scale,
                             args.local_scale, args.t_pos, args.match_coords)
    items = [views(leaves.image(i)[0], random.Random(i)) for i in range(a.batch_size)]
    globals_, locals_, pos_global, pos_local, appearance = [x.to(device) for x in
                                                            torch.utils.data.default_collate(items)]
    fmt = common.memory_format(device, args.channels_last)
    view_major = lambda x: x.transpose(0, 1).flatten(0, 1)  # noqa: E731
    batches = [common.apply_appearance(view_major(globals_), view_major(appearance[:, :2]), fmt)]
    if args.local_crops:
        batches.append(common.apply_appearance(view_major(locals_), view_major(appearance[:, 2:]), fmt))

    torch.manual_seed(0)
    student = clove.CLoVENet(args.arch, args.proj_hidden, args.embedding_dim, args.heads,
                             args.attention_temperature).to(device, memory_format=fmt)
    teacher = clove.make_teacher(student)
    student.train(), teacher.train()
    optimizer = clove.build_optimizer(student, 1e-3, args.weight_decay, args.sgd_momentum)  # small: stays finite
    loss_fn = functools.partial(clove.clove_loss, lamb=args.lamb, margin=args.margin, topk=args.topk_negatives)
    saved = {}

    def full():  # the training loop's step (clove.train, one micro-batch), minus data loading and logging
        with common.autocast(device, args.precision):
            loss, target = clove.clove_step(student, teacher, globals_, locals_, pos_global, pos_local, appearance,
                                            loss_fn, fmt)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clove.update_teacher(teacher, student, 0.99)
        saved["target"] = target
        loss.item()

    def bare():  # the same network work: encoder + projector forward/backward of every view, teacher forward, LARS
        with common.autocast(device, args.precision):
            loss = sum(student.local_features(x).float().mean() for x in batches)
            with torch.no_grad():
                teacher.local_features(batches[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    with torch.no_grad(), common.autocast(device, args.precision):
        features = [student.local_features(x) for x in batches]  # F^s of each view size
    n, n_local = globals_.shape[0], args.local_crops

    def predictor():  # the NMHSA predictor and the normalisation of its output, forward + backward
        with common.autocast(device, args.precision):
            out = [F.normalize(student.predictor(z.detach()).float(), dim=-1) for z in features]
        sum(o.sum() for o in out).backward()

    outputs = [torch.nn.functional.normalize(z.float(), dim=-1) for z in features]

    def loss_terms():  # Eq. 2 over the 2 + 2L (teacher view, student view) pairs, forward + backward
        student_views = [o.detach().requires_grad_(True) for o in outputs]
        s = student_views[0].unflatten(0, (2, n))
        local = student_views[1].unflatten(0, (n_local, n)) if n_local else None
        target = saved["target"]
        with common.autocast(device, args.precision):
            terms = []
            for t in (0, 1):
                terms.append(loss_fn(s[1 - t], target[t], pos_global[:, t]))
                terms += [loss_fn(local[l], target[t], pos_local[:, t, l]) for l in range(n_local)]
            loss = torch.stack(terms).mean()
        loss.backward()

    def ema():  # teacher <- m teacher + (1 - m) student, BN buffers copied
        clove.update_teacher(teacher, student, 0.99)

    def appearance_ops():  # every view's colour jitter, grayscale, blur, solarisation and normalisation
        common.apply_appearance(view_major(globals_), view_major(appearance[:, :2]), fmt)
        if args.local_crops:
            common.apply_appearance(view_major(locals_), view_major(appearance[:, 2:]), fmt)

    full(), bare()  # warm-up
    parts = dict(full=full, bare=bare, predictor=predictor, loss=loss_terms, ema=ema, appearance=appearance_ops)
    t = interleaved(parts, a.repeats, device)
    dense = [(t["predictor"][i] + t["loss"][i] + t["ema"][i]) / t["bare"][i] for i in range(a.repeats)]
    out = dict(benchmark="clove", device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
               threads=torch.get_num_threads(), arch=a.arch, views=f"2x{a.image_size} + {a.local_crops}x{a.local_size}",
               batch=a.batch_size, precision=a.precision, repeats=a.repeats,
               step_s=spread(t["full"]), bare_network_s=spread(t["bare"]),
               step_over_network=spread([fu / b for fu, b in zip(t["full"], t["bare"])]),
               **dense_parts_report(t, ["predictor", "loss", "ema"]),
               predictor_loss_ema_over_network=spread(dense, 4),
               appearance_over_step=spread([x / fu for x, fu in zip(t["appearance"], t["full"])], 4),
               train_images_per_s=round(a.batch_size / statistics.median(t["full"]), 2))
    return finish_report(out, a.profile and dict(full=full, predictor=predictor, loss=loss_terms, ema=ema), device,
                         load_before)


def load_tree(path):
    """Import common, vader and clove from the repository checkout at `path` as a separate set of modules, so two
    checkouts (before / after a change) are measured side by side in one process."""
    names = ("common", "vader", "clove")
    saved = {k: sys.modules.pop(k) for k in names if k in sys.modules}
    sys.path.insert(0, os.path.abspath(path))
    try:
        import common as c, vader as v, clove as cl  # noqa: E401
    finally:
        sys.path.pop(0)
        for k in names:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    return dict(common=c, vader=v, clove=cl)


def write_photo_folder(root, count, width=500, height=375):
    """`count` JPEGs of ImageNet's typical size (500 x 375, quality 90) under root/train/x/: the workers' input."""
    folder = os.path.join(root, "train", "x")
    os.makedirs(folder, exist_ok=True)
    leaves = common.DeadLeaves(size=width, seed=1)
    for i in range(count):
        leaves.image(i)[0].crop((0, 0, width, height)).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
    return root


def worker_view_sets(data_dir):
    """(name, method, flags, per-GPU batch): the views each script's workers make at the papers' settings."""
    return [("vader", "vader", ["--data", data_dir, "--image-size", "224", "--num-matches", "32"], 128 // 4),
            ("clove 2x224", "clove", ["--data", data_dir, "--image-size", "224", "--local-crops", "0"], 2048 // 4),
            ("clove 2x224+6x96", "clove", ["--data", data_dir, "--image-size", "224", "--local-crops", "6"], 2048 // 4)]


def batch_bytes(sample):
    """Bytes of one collated sample's tensors, per field, as (dtype, bytes)."""
    return [(str(x.dtype).replace("torch.", ""), x.numel() * x.element_size()) if torch.is_tensor(x)
            else (type(x).__name__, 8) for x in sample]


def training_dataset(mods, method, args, d):
    """The training set a checkout's script builds from `args` (its views on the --data folder)."""
    mod, c = mods[method], mods["common"]
    if hasattr(mod, "build_data"):  # checkouts before the teaching redesign
        return mod.build_data(args, d)
    if method == "vader":
        views = mod.ablation_parts(args).get("views", mod.PairedViews(args.image_size, args.num_matches))
        return c.ViewDataset(args.data, views, args.seed)
    views = mod.CLoVEViews(args.image_size, args.local_crops, args.local_size, args.global_scale, args.local_scale,
                           args.t_pos, args.match_coords)
    return c.ViewDataset(args.data, views, args.seed)


def bench_data(a):
    """Item 7: what crosses from the data-loading workers to the training process (shared memory) and from the host
    to the device, per batch, and what a worker spends per image in __getitem__, for each --code checkout."""
    import tempfile
    import warnings
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # make_loader is only inspected
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    load_before = load_average()
    trees = {path: load_tree(path) for path in a.code}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_photo_folder(tmp, a.images)
        cases = []  # (tree, name, dataset, per-GPU batch, loader)
        for path, mods in trees.items():
            for name, method, flags, per_gpu in worker_view_sets(data_dir):
                mod = mods[method]
                args = mod.get_parser().parse_args(flags)
                d = mods["common"].init_distributed()
                dataset = training_dataset(mods, method, args, d)
                try:  # the checkout's own loader settings (workers, prefetch, pinned memory) at --workers default
                    gpu = mods["common"].Dist(device=torch.device("cuda"))
                    loader = mods["common"].make_loader(dataset, gpu, per_gpu, args.workers, 0)[1]
                    loader_info = dict(workers=loader.num_workers, prefetch_factor=loader.prefetch_factor,
                                       pin_memory_on_gpu=loader.pin_memory)
                except Exception as e:  # noqa: BLE001 - a changed signature: report it, measure the rest
                    loader_info = dict(error=f"make_loader: {type(e).__name__}: {e}"[:200])
                cases.append((path, name, dataset, per_gpu, loader_info))
        for _, _, dataset, _, _ in cases:
            dataset[0]  # warm-up (imports, first-call costs)
        plain = moco_two_crop(224)
        files = common.list_images(data_dir)
        reference = ("reference", "moco v2 two-crop (torchvision)", [files, plain])
        per_image = {(p, n): [] for p, n, *_ in cases}
        per_image[reference[:2]] = []
        timed_cases = [c[:3] for c in cases] + [reference]
        for r in range(a.repeats):  # interleaved: every case over the same images, order reversed every round
            for p, n, dataset in (timed_cases if r % 2 == 0 else timed_cases[::-1]):
                t = time.perf_counter()
                if p == "reference":
                    for path in dataset[0]:
                        dataset[1](common.load_image(path))
                else:
                    for i in range(len(dataset)):
                        dataset[i]
                per_image[(p, n)].append((time.perf_counter() - t) / a.images)
        out = {}
        for p, n, dataset, per_gpu, loader_info in cases:
            fields = batch_bytes(dataset[0])
            per_sample = sum(b for _, b in fields)
            row = dict(fields=[f"{dt}:{b}" for dt, b in fields], bytes_per_image=per_sample, per_gpu_batch=per_gpu,
                       mb_per_batch=round(per_sample * per_gpu / 1e6, 1),
                       worker_ms_per_image=spread([1000 * x for x in per_image[(p, n)]], 2), loader=loader_info)
            c = trees[p]["common"]
            uint8 = any(torch.is_tensor(x) and x.dtype == torch.uint8 for x in dataset[0])
            convert = c.to_uint8 if uint8 else c.to_tensor  # what the views end with: the part item 7 changes
            view = common.load_image(files[0]).resize((224, 224))
            t_conv = []
            for _ in range(20 * a.repeats):
                t = time.perf_counter()
                convert(view)
                t_conv.append(time.perf_counter() - t)
            row["view_to_tensor_ms_per_224px_view"] = dict(function=convert.__name__,
                                                           **spread([1000 * x for x in t_conv], 3))
            normalize = getattr(c, "normalize", None)
            images = [x for x in dataset[0] if torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() >= 3]
            if normalize is not None and images:  # the work moved from the workers to the training process
                stacks = [torch.stack([x] * 8) for x in images]  # 8 images' views
                t_norm = []
                for _ in range(10 * a.repeats):  # short: many repeats against scheduling noise
                    t = time.perf_counter()
                    for s in stacks:
                        normalize(s, torch.device("cpu"))
                    t_norm.append((time.perf_counter() - t) / 8)
                row["normalize_on_cpu_ms_per_image"] = spread([1000 * x for x in t_norm], 2)
            if "prefetch_factor" in loader_info and loader_info["workers"]:
                row["shared_memory_in_flight_gb"] = round(per_sample * per_gpu * loader_info["workers"]
                                                          * loader_info["prefetch_factor"] / 1e9, 2)
            out.setdefault(p, {})[n] = row
        reference_ms = [1000 * x for x in per_image[reference[:2]]]
        out["reference"] = {reference[1]: dict(worker_ms_per_image=spread(reference_ms, 2))}
    return dict(benchmark="data", threads=1, source_images=f"{a.images} JPEGs 500x375", repeats=a.repeats,
                per_checkout=out, load_average_before_after=[load_before, load_average()])


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


def saved_for_backward(fn):
    """(bytes of the distinct storages autograd saves while `fn` runs its forward, fn's output)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def bench_warmup_memory(a):
    import clove
    import vader
    cpu, images = torch.device("cpu"), 2  # BN in training mode needs more than one image
    if a.method_net == "clove":
        net = clove.CLoVENet(a.arch).train()
        shapes = [(2 * images, 3, a.image_size, a.image_size), (a.local_crops * images, 3, a.local_size, a.local_size)]
    else:
        net = vader.VADeRNet(a.arch).train()
        shapes = [(images, 3, a.image_size, a.image_size)]
    per_image = {}
    for precision in ("fp32", "bf16"):
        inputs = [torch.randn(s) for s in shapes]
        with common.autocast(cpu, precision):
            saved, _ = saved_for_backward(lambda: net(*inputs))
        per_image[precision] = saved / images
    gib = 2**30
    return dict(benchmark="warmup-memory", network=a.method_net, arch=a.arch, per_rank_images=a.per_rank,
                views=[list(s[1:]) for s in shapes], per_image_mib={k: round(v / 2**20, 1) for k, v in per_image.items()},
                old_warmup_gib=round(a.per_rank * per_image["fp32"] / gib, 1),
                new_warmup_gib=round(images * per_image[a.precision if a.precision != "auto" else "bf16"] / gib, 3),
                training_step_gib=round(a.per_rank * per_image["bf16"] / gib, 1))


def _stop_flag_worker(rank, port, repeats, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ways = {"loss alone": lambda: dist.all_reduce(torch.zeros(1, dtype=torch.float64)),
            "loss + flag in one": lambda: dist.all_reduce(torch.zeros(2, dtype=torch.float64)),
            "loss, then flag": lambda: (dist.all_reduce(torch.zeros(1, dtype=torch.float64)),
                                        dist.all_reduce(torch.zeros(1, dtype=torch.float64)))}
    times = {name: [] for name in ways}
    for r in range(repeats):
        for name, fn in (ways.items() if r % 2 == 0 else list(ways.items())[::-1]):
            dist.barrier()
            t = time.perf_counter()
            for _ in range(200):
                fn()
            times[name].append((time.perf_counter() - t) / 200 * 1e6)
    if rank == 0:
        queue.put({name: spread(v, 1) for name, v in times.items()})
    dist.destroy_process_group()


def bench_stop_flag(a):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_stop_flag_worker, args=(r, port, a.repeats, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = queue.get()
    for p in procs:
        p.join()
    return dict(benchmark="stop-flag", backend="gloo", processes=2, microseconds_per_step=out)


FINGERPRINT_RUNS = {
    "vader": ("vader.py", []), "vader same-view": ("vader.py", ["--matching", "same-view"]),
    "vader in-image r8": ("vader.py", ["--in-image-negatives", "--negative-radius", "8"]),
    "vader shared": ("vader.py", ["--key-encoder", "shared"]), "vader global": ("vader.py", ["--objective", "global"]),
    "clove": ("clove.py", []), "clove official-loss": ("clove.py", ["--official-loss"]),
    "clove mhsa": ("clove.py", ["--attention", "mhsa"]), "clove inter": ("clove.py", ["--negatives", "inter"]),
    "clove l2": ("clove.py", ["--loss", "l2"]), "clove accum2": ("clove.py", ["--accum-steps", "2"]),
}


def checkpoint_digest(path):
    """sha256 (16 hex digits) of every tensor of a checkpoint's networks, queue and optimiser state, in key order."""
    def tensors(obj, prefix):
        if torch.is_tensor(obj):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                yield from tensors(obj[k], f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{prefix}/{i}")
    ckpt, digest = torch.load(path, map_location="cpu", weights_only=False), hashlib.sha256()
    for part in ("model", "momentum_encoder", "teacher", "queue", "optimizer"):
        for name, t in tensors(ckpt.get(part), part):
            digest.update(name.encode())
            digest.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


TINY_FLAGS = {"vader.py": ["--batch-size", "4", "--queue-size", "256", "--synthetic-images", "8"],
              "clove.py": ["--batch-size", "4", "--image-size", "64", "--local-size", "32", "--local-crops", "2",
                           "--synthetic-images", "8"]}


def bench_fingerprint(a):
    import subprocess
    import tempfile
    out = {}
    runs = {name: FINGERPRINT_RUNS[name] for name in ("vader", "clove")} if a.tiny else FINGERPRINT_RUNS
    for code in a.code:
        for name, (script, flags) in runs.items():
            flags = [*flags, *TINY_FLAGS[script], "--max-steps", "1"] if a.tiny else [*flags, "--max-steps", "3"]
            with tempfile.TemporaryDirectory() as tmp:
                r = subprocess.run([sys.executable, os.path.join(code, script), "--output-dir", tmp, "--workers", "0",
                                    *flags], capture_output=True, text=True, cwd=code)
                digest = checkpoint_digest(os.path.join(tmp, "checkpoint.pth")) if r.returncode == 0 else "failed"
            out.setdefault(name, {})[code] = digest
            print(f"{name:22s} {code}: {digest}", file=sys.stderr, flush=True)
    identical = all(len(set(v.values())) == 1 and "failed" not in v.values() for v in out.values())
    return dict(benchmark="fingerprint", identical=identical, digests=out)


SYNCING = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")  # host reads


@contextlib.contextmanager
def sync_spy():
    """Record every call that would make the host wait for a GPU: a tensor read on the host (SYNCING) and a tensor
    built from Python data with a `device` (a copy from pageable memory). On a CPU nothing waits, but the same code
    runs, so the count is the GPU's. Yields the list of call names."""
    calls, originals, tensor = [], {name: getattr(torch.Tensor, name) for name in SYNCING}, torch.tensor

    def spy(name, method):
        def counted(self, *args, **kwargs):
            calls.append(name)
            return method(self, *args, **kwargs)
        return counted

    def device_tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            calls.append("torch.tensor(device=...)")
        return tensor(*args, **kwargs)

    for name, method in originals.items():
        setattr(torch.Tensor, name, spy(name, method))
    torch.tensor = device_tensor
    try:
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.tensor = tensor


def syncs_per_step(script, argv):
    """Run `script.train` (vader or clove) in this process on `argv` and return, for every optimiser step after the
    first, (step, whether it logged, the host-waiting calls it made): sync_spy's count on a CPU, the warnings of
    torch.cuda.set_sync_debug_mode on a GPU. Data loading is left out (run it with --workers >= 1)."""
    import warnings
    args, marks, step_done = script.parse_args(argv), [], common.TrainingRun.step_done
    cuda = torch.cuda.is_available()
    with sync_spy() as calls, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")

        def mark(run, step, *rest, **kwargs):
            marks.append((step, step % run.args.log_every == 0 or step == run.total_steps,
                          sum("synchroniz" in str(w.message) for w in warned) if cuda else len(calls)))
            return step_done(run, step, *rest, **kwargs)

        common.TrainingRun.step_done = mark
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            script.train(args)
        finally:
            common.TrainingRun.step_done = step_done
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return [(step, logged, count - previous) for (step, logged, count), (_, _, previous) in zip(marks[1:], marks)]


def timed_training_step(method, arch, size, per_gpu, precision, device, repeats=3, micro=None):
    """(seconds per optimiser step, micro-batch) of vader.py's or clove.py's step on synthetic uint8 views at a
    per-GPU batch, with the micro-batch halved (accumulation) until it fits; the step ends with its one read."""
    import clove
    import vader
    micro = micro or per_gpu
    while True:
        try:
            torch.manual_seed(0)
            if method == "vader":
                f = vader.VADeRNet(arch).to(device)
                g = copy.deepcopy(f).requires_grad_(False)
                queue = vader.PixelQueue(65536, 128).to(device)
                opt = torch.optim.SGD(f.parameters(), lr=1e-4, momentum=0.9)
                views = [torch.randint(0, 256, (micro, 3, size, size), dtype=torch.uint8, device=device)] * 2
                matches = torch.randint(0, (size // 4) ** 2, (micro, 32, 4), device=device)
                appearance = torch.zeros(micro, 2, len(common.APPEARANCE), device=device)

                def forward():
                    loss, keys, top1 = vader.vader_step(f, g, queue, *views, matches, appearance, bn_splits=4)
                    return loss, top1, lambda: queue.enqueue(keys.flatten(0, 1))
            else:
                args = clove.get_parser().parse_args(["--arch", arch, "--image-size", str(size), "--precision",
                                                      precision])
                f = clove.CLoVENet(arch).to(device)
                teacher = clove.make_teacher(f)
                opt = clove.build_optimizer(f, 1e-3)
                batch = clove.probe_batch(micro, args, device)

                def forward():
                    loss, _ = clove.clove_step(f, teacher, *batch)
                    return loss, loss, lambda: clove.update_teacher(teacher, f, 0.99)

            def step():
                for _ in range(per_gpu // micro):
                    with common.autocast(device, precision):
                        loss, watched, after = forward()
                    (loss / (per_gpu // micro)).backward()
                torch.stack([loss.detach().float(), watched.float()]).tolist()  # the step's one read
                opt.step()
                opt.zero_grad(set_to_none=True)
                after()

            step()  # warm-up (cuDNN picks its algorithms)
            return statistics.median(timed(step, device) for _ in range(repeats)), micro
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise
            micro //= 2
            torch.cuda.empty_cache()


def bench_gpu(a):
    """Everything the GPU path promises, in one command for the day a GPU is lent (under 8 minutes on one GPU;
    --tiny: seconds on a CPU, as the test suite runs it)."""
    import tempfile
    import clove
    import vader
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tiny:
        arch, vader_size, clove_size, vader_batch, clove_batch = "resnet18", 64, 64, 4, 4
    else:
        arch, vader_size, clove_size, vader_batch, clove_batch = "resnet50", 224, 224, 128 // 4, 2048 // 4
    out = dict(benchmark="gpu", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               arch=arch, steps={}, load_average_before=load_average())
    precisions = ("bf16", "fp32")
    for method, size, batch in (("vader", vader_size, vader_batch), ("clove", clove_size, clove_batch)):
        for precision in precisions:
            seconds, micro = timed_training_step(method, arch, size, batch, precision, device, 1 if a.tiny else 3)
            out["steps"][f"{method} {precision}"] = dict(per_gpu_batch=batch, micro_batch=micro,
                                                         images_per_s=round(batch / seconds, 1))
    with tempfile.TemporaryDirectory() as tmp:
        files = common.list_images(write_photo_folder(tmp, 4 if a.tiny else 64))
        torch.set_num_threads(1)  # as a loader worker
        views = dict(vader=vader.PairedViews(224, 32), clove=clove.CLoVEViews(224, 6, 96),
                     reference=moco_two_crop(224))
        per_item = {name: [] for name in views}
        for r in range(1 if a.tiny else 5):
            for name, view in (views.items() if r % 2 == 0 else list(views.items())[::-1]):
                t = time.perf_counter()
                for i, path in enumerate(files):
                    view(common.load_image(path), random.Random(i)) if name != "reference" else \
                        view(common.load_image(path))
                per_item[name].append((time.perf_counter() - t) / len(files))
        torch.set_num_threads(os.cpu_count() or 1)
        out["loader_images_per_s_per_worker"] = {name: round(1 / statistics.median(v), 1)
                                                 for name, v in per_item.items()}
        out["loader_cost_over_moco_v2_two_crop"] = {name: round(statistics.median(v) /
                                                                statistics.median(per_item["reference"]), 2)
                                                    for name, v in per_item.items() if name != "reference"}
        tiny = ["--arch", "resnet18", "--batch-size", "4", "--workers", "1", "--log-every", "2", "--max-steps", "5",
                "--save-minutes", "1000", "--synthetic-images", "32"]
        syncs = {}
        for script, extra in ((vader, ["--image-size", "64", "--queue-size", "256", "--num-matches", "8"]),
                              (clove, ["--image-size", "64", "--local-size", "32", "--local-crops", "2",
                                       "--accum-steps", "2"])):
            rows = syncs_per_step(script, [*tiny, *extra, "--output-dir", os.path.join(tmp, script.__name__)])
            syncs[script.__name__] = dict(per_step=max(n for _, logged, n in rows if not logged),
                                          per_log_step=max(n for _, logged, n in rows if logged))
        out["syncs"] = syncs
    if device.type == "cuda":
        args = clove.get_parser().parse_args(["--arch", arch, "--image-size", str(clove_size), "--precision", "bf16"])
        f = clove.CLoVENet(arch).to(device)
        per_image, fixed = clove.step_memory(f, clove.make_teacher(f), clove.clove_loss, args, device,
                                             torch.contiguous_format)
        out["clove_step_memory"] = dict(per_image_mib=round(per_image / 2**20, 1), besides_gib=round(fixed / 2**30, 2),
                                        per_gpu_batch_gib=round((fixed + per_image * clove_batch) / 2**30, 1))
    out["load_average_after"] = load_average()
    return out


def main_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["gpu", "vader", "clove", "data", "clove-position", "probe-ceiling",
                                      "warmup-memory", "stop-flag", "fingerprint"],
                   help="what to measure (see above)")
    p.add_argument("--weights", nargs="+", default=["random"], help="clove-position, probe-ceiling: 'random' and/or checkpoints")
    p.add_argument("--arch", default="resnet50", help="ResNet depth")
    p.add_argument("--image-size", type=int, default=224, help="view size")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (one process)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (medians are reported)")
    p.add_argument("--queue-size", type=int, default=65536, help="negatives (the paper: 65536)")
    p.add_argument("--num-matches", type=int, default=32, help="vader: matched cells per image (the paper: 32)")
    p.add_argument("--precision", default="auto", choices=common.PRECISIONS, help="autocast dtype, as the training "
                   "scripts' flag ('auto': bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--code", nargs="+", default=[os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
                   help="data, fingerprint: repository checkouts to measure side by side (e.g. a `git worktree` of "
                   "the commit before a change, and this one)")
    p.add_argument("--compare", default=None, help="vader: also time Eq. 2 and the EMA as the checkout at this path "
                   "implements them (e.g. a `git worktree` of the commit before a speed-up)")
    p.add_argument("--local-crops", type=int, default=6, help="clove: 96-px student-only views (the official code: 6)")
    p.add_argument("--local-size", type=int, default=96, help="clove: local view size")
    p.add_argument("--network", dest="method_net", default="clove", choices=["clove", "vader"],
                   help="warmup-memory: whose network")
    p.add_argument("--per-rank", type=int, default=512, help="warmup-memory: images a rank trains on (CLoVE: 2048/4)")
    p.add_argument("--images", type=int, default=32, help="data: JPEGs (500 x 375) each round goes through")
    p.add_argument("--profile", action="store_true", help="vader, clove: add torch.profiler's top ops of one step "
                   "and the ops where the step spends more than the bare network")
    p.add_argument("--tiny", action="store_true", help="gpu, fingerprint: CPU-sized settings (the test suite's)")
    return p


def main():
    a = main_parser().parse_args()
    if a.method == "gpu":
        print(json.dumps(bench_gpu(a)))
    elif a.method == "stop-flag":
        print(json.dumps(bench_stop_flag(a)))
    elif a.method == "warmup-memory":
        print(json.dumps(bench_warmup_memory(a)))
    elif a.method == "fingerprint":
        print(json.dumps(bench_fingerprint(a)))
    elif a.method == "clove-position":
        print(json.dumps(bench_clove_position(a)))
    elif a.method == "data":
        print(json.dumps(bench_data(a)))
    elif a.method == "probe-ceiling":
        print(json.dumps(bench_probe_ceiling(a)))
    elif a.method == "clove":
        print(json.dumps(bench_clove(a)))
    else:
        print(json.dumps(bench_vader(a)))


if __name__ == "__main__":
    main()
