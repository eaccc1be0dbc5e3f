"""Plumbing shared by vader.py, clove.py, evaluate_linear.py and davis_propagate.py.

A reader of the methods need not read this file: nothing here knows about a method. It holds what two or more
scripts use: distributed setup, precision, image loading and the embedded procedural data set (dead leaves), crop
geometry and appearance augmentations, the resumable sampler, EMA, a training run's bookkeeping (log, progress bar,
checkpoints, exact resumption: TrainingRun), ResNet weights, and the feature pictures.
"""
import collections
import colorsys
import functools
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFile
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
PREEMPTED = 75  # the exit status of a preempted run (sysexits' EX_TEMPFAIL: re-run the same command to resume)


# ---- errors and printing ----
class UserError(Exception):
    """A bad flag, file or folder: main() prints it as one line and exits non-zero, with no traceback."""


class Preempted(BaseException):
    """A stop signal ended the run. `agreed`: every rank stopped at the same point (after the same optimiser step,
    with rank 0's checkpoint written, or before step 1); otherwise this process stopped alone during start-up, where
    waiting on the other ranks could hang. A BaseException, as KeyboardInterrupt: raised by the signal handler
    wherever start-up is, it must not be swallowed by an `except Exception` on the way."""

    def __init__(self, message, agreed=True):
        super().__init__(message)
        self.agreed = agreed


def run_main(main):
    """Call a script's main() with SLURM's variables mapped and the stop signals caught first (job_place,
    catch_stop_signals): a UserError is one line on stderr and exit status 2; a preempted run exits with PREEMPTED,
    and rank 0 of a training run leaves <output-dir>/PREEMPTED (torchrun's own status cannot carry 75)."""
    try:
        job_place()
        catch_stop_signals()
        main()
    except Preempted as e:
        _stop["deferred"] = True  # a second signal while closing must not interrupt the close
        if job_place().rank == 0:
            if _stop["marker"]:
                with open(_stop["marker"], "w") as f:
                    f.write(f"{e}; re-run the same command to resume\n")
            print(f"preempted: {e}; re-run the same command to resume", flush=True)
        if e.agreed:
            finish_distributed()
        # no interpreter shutdown: it resets the handlers, and a peer's exit under `srun --kill-on-bad-exit` sends
        # SIGTERM, which would then turn this 75 into 143
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(PREEMPTED)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():  # a live gloo/NCCL group aborts the interpreter at exit
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(2)
        sys.exit(2)


def print_result(result, path=None):
    """Every script ends with its result as one JSON line on stdout (and in `path`)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)


def finite_or_none(value):
    """`value` with every NaN or infinite float (also inside lists and dicts) replaced by None: JSON has no NaN, so
    a score with nothing to count is null in metrics.json."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def apply_preset(parser, args, preset, argv=None, announce=None):
    """Set the values of `preset` the user did not type; returns them (printed on rank 0 with `announce`)."""
    typed = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")]
    given = {parser._option_string_actions[a].dest for a in typed if a in parser._option_string_actions}
    changed = {k: v for k, v in preset.items() if k not in given}
    for k, v in changed.items():
        setattr(args, k, v)
    if announce and job_place().rank == 0:
        print(f"no --data: {announce} and the CPU demo preset "
              + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items()), flush=True)
    return changed


def throughput_bar(iterable, total, enabled, initial=0, desc="train"):
    return tqdm(iterable, total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                smoothing=0.05)


# ---- distributed ----
@dataclass
class Dist:
    """This process's place in the job; `is_main` (rank 0) alone prints, shows progress and writes files."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_main = property(lambda self: self.rank == 0)


def init_distributed(deterministic=False):
    """This process's place (job_place: torchrun's variables, srun's, or one plain process) and its device; the
    process group when there are several ranks: NCCL on GPU, gloo on CPU. `deterministic`: no cuDNN benchmarking,
    deterministic algorithms."""
    rank, local_rank, world = job_place()
    # a launcher may show each process only its own GPU (srun --gpus-per-task=1): then LOCAL_RANK exceeds the count
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else \
        torch.device("cpu")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode needs it
        torch.use_deterministic_algorithms(True, warn_only=True)  # warns where an op has no deterministic version
        torch.backends.cudnn.deterministic = True
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not deterministic  # fixed view sizes: cuDNN times its algorithms once
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, local_rank, world, device)


Place = collections.namedtuple("Place", "rank local_rank world_size")
SLURM_PORTS = (15000, 10000)  # MASTER_PORT under srun: 15000 + SLURM_JOB_ID mod 10000, below Linux's ephemeral ports


def job_place():
    """(rank, local rank, world size) of this process: torchrun's RANK/LOCAL_RANK/WORLD_SIZE; or, under srun
    without torchrun, SLURM's, written into torchrun's variables (with MASTER_ADDR, the step's first host, and
    MASTER_PORT, slurm_port, unless the job sets them); or one plain process. The one place that reads a
    launcher's variables: every script calls it (run_main, init_distributed) before it reads a rank or a size."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # srun, without torchrun
        env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
                   WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"])
        if "MASTER_ADDR" not in env:
            name = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
            env["MASTER_ADDR"] = first_host(env.get(name, "127.0.0.1"), name)
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID"))))
    return Place(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def slurm_port(job_id):
    """The rendezvous port of a SLURM job: two jobs that share a node get different ones (unless their ids are
    10,000 apart), and no outgoing connection holds it (Linux's ephemeral range starts at 32768). Two steps of one
    job on one node at once need a MASTER_PORT each."""
    start, count = SLURM_PORTS
    return start + int(job_id) % count if job_id and job_id.isdigit() else 29500


def hostnames(nodelist, name="node list"):
    """Every host of a SLURM node list, in order, as `scontrol show hostnames` prints them (SLURM's hostlist.c):
    entries separated by commas (or blanks), each a name with any number of bracket groups of numbers and ranges
    separated by commas, where a range keeps the zero padding of its lower bound and the leftmost group varies
    slowest: "rack[1-2]-n[08-09]-ib" -> rack1-n08-ib, rack1-n09-ib, rack2-n08-ib, rack2-n09-ib."""
    entry = r"(?:[^\s,\[\]]|\[[\d,\-]+\])+"
    if not re.fullmatch(rf"[\s,]*{entry}(?:[\s,]+{entry})*[\s,]*", nodelist):
        raise UserError(f"{name} {nodelist!r}: not a SLURM node list; set MASTER_ADDR to its first host")
    hosts = []
    for pattern in re.findall(entry, nodelist):
        parts = re.split(r"\[([\d,\-]+)\]", pattern)  # text, group, text, ..., text
        choices = [[text] if i % 2 == 0 else [n for item in text.split(",") for n in hostlist_range(item, name)]
                   for i, text in enumerate(parts)]
        hosts += ["".join(p) for p in itertools.product(*choices)]
    return hosts


def hostlist_range(item, name="node list"):
    """One item of a node list's bracket group: "7" -> ["7"]; "08-10" -> ["08", "09", "10"] (lo's width)."""
    lo, dash, hi = item.partition("-")
    hi = hi if dash else lo
    if not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
        raise UserError(f"{name}: range {item!r}: expected a number or lo-hi with lo <= hi")
    return [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)]


def first_host(nodelist, name="node list"):
    """The first host of a SLURM node list, the usual master: "dgx-[01,05]-ib" -> "dgx-01-ib"."""
    return hostnames(nodelist, name)[0]


def distributed():
    """Whether a process group of several ranks is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def finish_distributed():
    """Wait for every rank, then close the process group (a live gloo group aborts the interpreter at exit)."""
    if distributed():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model, d, shapes, memory_format=torch.contiguous_format, precision="fp32"):
    """`model` in DDP (or itself on one process) with its gradient buckets settled. DDP rebuilds them once, in the
    order of the first backward, and the all-reduce's summation order follows: one zero-weighted pass on fixed
    inputs of `shapes`, in the training's `precision` (never more memory than a step), makes fresh and resumed runs
    sum alike."""
    if d.world_size == 1:
        return model
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None)
    saved = [b.detach().clone() for b in model.buffers()]
    generator = torch.Generator().manual_seed(0)  # not the global RNG: runs stay reproducible
    with autocast(d.device, precision):
        outputs = ddp(*[torch.randn(s, generator=generator).to(d.device, memory_format=memory_format) for s in shapes])
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    (sum(o.float().sum() for o in outputs) * 0).backward()
    with torch.no_grad():
        torch._foreach_copy_(list(model.buffers()), saved)
    model.zero_grad(set_to_none=True)
    return ddp


@torch.no_grad()
def all_gather_cat(tensor):
    """Concatenate `tensor` from every rank along dim 0 (rank order); no gradient flows back."""
    if not distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_mean(*values):
    """Python floats averaged over ranks, in one collective: a float, or a list for several."""
    if distributed():
        t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        values = [v / dist.get_world_size() for v in t.tolist()]
    return values[0] if len(values) == 1 else list(values)


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable object, e.g. a whole checkpoint) on every rank."""
    if not distributed():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- stop signals: preemption ----
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # a scheduler's notice: SLURM's --signal, scancel, preemption
_stop = dict(signal=None, deferred=False, marker=None, pid=None)


def catch_stop_signals():
    """From now on SIGTERM and SIGUSR1 stop the run with the PREEMPTED status instead of killing the process
    (run_main calls it first). Until a training run takes over (defer_stop_signals) the handler raises Preempted
    wherever start-up is: nothing has been written yet that a re-run would miss. After that it only records the
    signal (stop_signal), and the ranks stop together: before step 1 (TrainingRun.start) or after the current step."""
    _stop["pid"] = os.getpid()
    for s in STOP_SIGNALS:
        signal.signal(s, on_stop_signal)


def on_stop_signal(signum, frame):
    if os.getpid() != _stop["pid"]:  # a forked loader worker: the process that forked it stops the run
        return
    _stop["signal"] = signum
    if not _stop["deferred"]:
        raise Preempted(f"stopped by {signal.Signals(signum).name}, with nothing saved yet", agreed=False)


def defer_stop_signals(marker):
    """A training run takes over the stop signals; `marker` is the file rank 0 writes if the run is preempted
    (run_main): what an sbatch script tests under torchrun, whose own exit status is 1 whatever its workers
    return."""
    _stop.update(deferred=True, marker=marker)


def stop_signal():
    """The number of the stop signal this process received, or None."""
    return _stop["signal"]


# ---- seeding and rng ----
def seed_all(seed):
    """Python's, NumPy's and torch's generators, the same on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_rng(seed, epoch, index):
    """The random stream of one sample: fixed by (seed, epoch, index), so a resumed run sees the same views."""
    return random.Random(f"{seed}/{epoch}/{index}")


def rng_states():
    """The generators' states; of the GPUs, this rank's own (all would tie the checkpoint to the machine)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and torch.is_tensor(states.get("cuda")):
        torch.cuda.set_rng_state(states["cuda"])


# ---- images ----
def load_image(path):
    """Any image as 8-bit RGB (grayscale, palette, RGBA, CMYK, 16-bit converted); OSError/ValueError for empty,
    truncated or non-image files (the caller decides to skip them)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, not later inside a transform
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(img, dtype=np.float64)
            if img.mode.startswith("I;16"):
                a = a / 257  # the full 16-bit range onto 8 bits
            else:  # 32-bit integer or float images have no fixed range: stretch what is there
                lo, hi = a.min(), a.max()
                a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
            img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
        return img.convert("RGB")


UNREADABLE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, SyntaxError)  # what load_image raises


def warn_unreadable(path, error):
    """One line on stderr naming a file that is skipped because it cannot be decoded."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"warning: skipping unreadable image {path}: {reason}", file=sys.stderr)


def list_images(root, name="--data"):
    """All image files below `root` (root/train when it exists), sorted; one-line errors when there are none."""
    if not root or not os.path.isdir(root):
        raise UserError(f"{name} {root}: no such folder; point it at a folder of images")
    if os.path.isdir(os.path.join(root, "train")):
        root = os.path.join(root, "train")
    files = [os.path.join(folder, n) for folder, _, names in os.walk(root, followlinks=True) for n in names
             if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UserError(f"{name} {root}: no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) found below it")
    return sorted(files)


def shared_image_list(root, name="--data"):
    """list_images(root) as an ImageList, walked by rank 0 alone and sent to every rank: one walk of the tree a
    job, not one a rank (ImageNet's 1.28M files on each of 64 ranks is a metadata storm on Lustre or NFS)."""
    listing = None
    if not distributed() or dist.get_rank() == 0:
        try:
            listing = ImageList(list_images(root, name))
        except UserError as e:
            listing = e  # every rank stops with rank 0's one-line error
    listing = broadcast_object(listing)
    if isinstance(listing, UserError):
        raise listing
    return listing


class ImageList:
    """File paths held in two numpy arrays (all their bytes end to end, and where each starts) instead of a list of
    str: a forked loader worker that reads a path touches no Python object of the list, so its memory stays shared
    with the training process. Each str of a list gets its reference count written as it is read, which copies its
    page into the worker: for ImageNet, a copy of a 1.28M-path list in every worker."""

    def __init__(self, paths):
        encoded = [os.fsencode(p) for p in paths]
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.starts = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)

    def __len__(self):
        return len(self.starts) - 1

    def __getitem__(self, i):
        return os.fsdecode(self.blob[self.starts[i]:self.starts[i + 1]].tobytes())


class ViewDataset(torch.utils.data.Dataset):
    """A training set: item i of epoch e is `transform(image_i, rng(seed, e, i))`, followed by the number of
    unreadable files skipped to produce it (counted in the workers, logged by the loop). The images are the files
    below a folder (`root`: any tree of images, or root/train; rank 0 lists them for all), or `length` embedded
    dead leaves (root None)."""

    def __init__(self, root, transform, seed=0, length=2048, size=160):
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.files = shared_image_list(root) if root is not None else None
        self.leaves, self.length = DeadLeaves(size=size, seed=seed), len(self.files) if self.files else length

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def image(self, index):
        return load_image(self.files[index]) if self.files else self.leaves.image(index)[0]

    def __getitem__(self, index):
        for skipped in range(len(self)):  # an unreadable file: the next one, counted
            i = (index + skipped) % len(self)
            try:
                img = self.image(i)
                break
            except UNREADABLE_ERRORS as e:
                warn_unreadable(self.files[i], e)
        else:
            raise RuntimeError("every image of the data set is unreadable")
        return (*self.transform(img, sample_rng(self.seed, self.epoch, index)), skipped)

    def pictures(self, size, count=4):
        """The first `count` readable images, at size x size (at least 128 px, to be readable): features.png's."""
        size, images = max(size, 128), []
        for i in range(len(self)):
            try:
                images.append(self.image(i).resize((size, size), Image.BILINEAR))
            except UNREADABLE_ERRORS:
                continue
            if len(images) == count:
                break
        return images


# ---- embedded procedural data: dead leaves ----
class DeadLeaves:
    """Random occluding shapes ("dead leaves", Matheron 1968), a scale-free model of natural images, deterministic
    by (seed, index). A shape's class (1..num_classes) shows, like an object category, in two ambiguous cues: its
    texture family and a palette around the class's hue, wider than the hues' spacing (with colours independent of
    the class, a probe at 1/4 could not read the texture: tests/benchmarks.py probe-ceiling). `image(i)` gives the
    picture with its exact class and instance maps; evaluate_linear.py and davis_propagate.py paint with its parts.
    """

    HUE_SPREAD = 0.2
    TEXTURES = ("flat", "stripes", "checks", "dots", "rings", "noise")

    def __init__(self, size=160, num_classes=4, shapes=(12, 30), seed=0):
        if not 1 <= num_classes <= len(self.TEXTURES):
            raise ValueError(f"num_classes must be 1..{len(self.TEXTURES)}")
        self.size, self.num_classes, self.shapes, self.seed = size, num_classes, shapes, seed

    def rng(self, kind, index):
        return np.random.default_rng([self.seed, kind, index])

    @staticmethod
    def rotate(x, y, angle):
        """Coordinates (x, y) turned by -angle: (u, v) along and across the direction `angle`."""
        return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)

    @staticmethod
    def texture(cls, yy, xx, rng):
        """Pattern in [0, 1] for one class; the class decides the family, `rng` its phase and orientation."""
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        u, v = DeadLeaves.rotate(xx, yy, angle)
        name = DeadLeaves.TEXTURES[cls - 1]
        if name == "flat":
            return np.full(np.broadcast(yy, xx).shape, 0.5)
        if name == "stripes":
            return 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * u / 8 + phase))
        if name == "checks":
            return ((np.floor(u / 6) + np.floor(v / 6)) % 2).astype(np.float64)
        if name == "dots":
            return (((u % 8) - 4) ** 2 + ((v % 8) - 4) ** 2 < 6).astype(np.float64)
        if name == "rings":
            return 0.5 + 0.5 * np.sign(np.sin(np.hypot(u - u.mean(), v - v.mean()) / 2 + phase))
        return rng.random(np.broadcast(yy, xx).shape)

    @staticmethod
    def shape_mask(kind, yy, xx, cy, cx, r, angle):
        """A disc, a rectangle, an ellipse or a triangle (`kind` 0..3) of radius r, turned by `angle`."""
        u, v = DeadLeaves.rotate(xx - cx, yy - cy, angle)
        if kind == 0:
            return u**2 + v**2 <= r**2
        if kind == 1:
            return (np.abs(u) <= r) & (np.abs(v) <= 0.6 * r)
        if kind == 2:
            return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1
        return (v >= -0.5 * r) & (v <= r - 1.7 * np.abs(u))

    def leaf(self, rng, height, width):
        r = self.size * float(np.exp(rng.uniform(np.log(0.04), np.log(0.3))))
        cls = int(rng.integers(1, self.num_classes + 1))
        return dict(cls=cls, kind=int(rng.integers(0, 4)), r=r,
                    cy=rng.uniform(0, height), cx=rng.uniform(0, width), angle=rng.uniform(0, np.pi),
                    c0=self.colour(rng, cls), c1=self.colour(rng, cls), tex_seed=int(rng.integers(2**31)))

    def colour(self, rng, cls):
        """An RGB colour in [0, 1] from class `cls`'s palette: hue within HUE_SPREAD of the class centre."""
        hue = ((cls - 1) / self.num_classes + rng.uniform(-self.HUE_SPREAD, self.HUE_SPREAD)) % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.3, 1), rng.uniform(0.3, 1)))

    def paint(self, canvas, labels, instances, leaf, instance_id, offset=(0.0, 0.0)):
        h, w = labels.shape
        cy, cx, r = leaf["cy"] + offset[0], leaf["cx"] + offset[1], leaf["r"]
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
        if y0 >= y1 or x0 >= x1:
            return
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        mask = self.shape_mask(leaf["kind"], yy, xx, cy, cx, r, leaf["angle"])
        # the texture is attached to the shape (shape-relative coordinates), so it moves with the shape
        t = self.texture(leaf["cls"], yy - cy, xx - cx, np.random.default_rng(leaf["tex_seed"]))[..., None]
        canvas[y0:y1, x0:x1][mask] = ((1 - t) * leaf["c0"] + t * leaf["c1"])[mask]
        labels[y0:y1, x0:x1][mask] = leaf["cls"]
        instances[y0:y1, x0:x1][mask] = instance_id

    def background(self, rng, height, width):
        yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        t = (0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(0.3, 1) * xx + rng.uniform(0.3, 1) * yy)))[..., None]
        return (1 - t) * a + t * b

    def image(self, index):
        """(PIL RGB image, class map uint8 HxW with 0 = background, instance map int32 HxW with 0 = background)."""
        rng, s = self.rng(0, index), self.size
        canvas = self.background(rng, s, s)
        labels, instances = np.zeros((s, s), np.uint8), np.zeros((s, s), np.int32)
        for i in range(int(rng.integers(self.shapes[0], self.shapes[1] + 1))):
            self.paint(canvas, labels, instances, self.leaf(rng, s, s), i + 1)
        pixels = np.clip(canvas * 255 + rng.normal(0, 3, canvas.shape), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels), labels, instances


# ---- crop-box geometry ----
@dataclass(frozen=True)
class Box:
    """A crop in original-image pixel coordinates: pixel k covers [k, k+1), so a box is [x0, x1) x [y0, y1)."""
    x0: float
    y0: float
    x1: float
    y1: float
    width = property(lambda self: self.x1 - self.x0)
    height = property(lambda self: self.y1 - self.y0)


def sample_crop_box(rng, width, height, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (torchvision's algorithm: area fraction in `scale`, log-uniform aspect ratio,
    10 tries, then a centre crop clamped to `ratio`), drawn from `rng` (random.Random)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return Box(x, y, x + w, y + h)
    in_ratio, w, h = width / height, width, height  # the fallback: a centre crop clamped to `ratio`
    if in_ratio < min(ratio):
        h = int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w = int(round(height * max(ratio)))
    x, y = (width - w) // 2, (height - h) // 2
    return Box(x, y, x + w, y + h)


def crop_resize(img, box, size, flip=False, resample=Image.BILINEAR):
    """`box` of `img` resized to size x size, then mirrored when `flip`: output pixel j covers
    [x0 + j w / size, x0 + (j + 1) w / size) of the original, as cell_axes assumes."""
    view = img.resize((size, size), resample=resample, box=(box.x0, box.y0, box.x1, box.y1))
    return view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view


def cell_axes(box, flip, grid):
    """Original-image x of a view's grid columns and y of its rows (float64 arrays of `grid`): cell (r, c) of the
    view is centred at (x[c], y[r]). A flip mirrors the columns: column j of the view shows column grid - 1 - j of
    the crop."""
    j = np.arange(grid, dtype=np.float64) + 0.5
    xs = box.x0 + j * box.width / grid
    return (xs[::-1] if flip else xs), box.y0 + j * box.height / grid


# ---- appearance augmentations: drawn in the loader, applied on the training device (they never move pixels) ----
APPEARANCE = ("jitter", "brightness", "contrast", "saturation", "hue", "op1", "op2", "op3", "op4", "grayscale",
              "sigma", "solarize")  # one view's row of draw_appearance; opK: the jitter op applied K-th (0..3: b c s h)
BLUR_TAPS = 13  # the Gaussian blur's kernel: +-3 sigma at the largest sigma, 2 px (99.7 % of the mass)


def draw_appearance(rng, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5, p_solarize=0.0,
                    sigma=(0.1, 2.0)):
    """One view's appearance parameters, drawn from `rng` (random.Random) as torchvision's transforms draw them:
    ColorJitter(b, c, s, h) with p_jitter (factors uniform in [1 - x, 1 + x], the hue shift in [-h, h], the four
    ops in a random order), RandomGrayscale(p_gray), a Gaussian blur with p_blur and sigma uniform in `sigma`, and
    solarisation with p_solarize (drawn only when p_solarize > 0). A float32 row laid out as APPEARANCE; a skipped op
    keeps its identity value (factor 1, shift 0, sigma 0). apply_appearance applies it on the device."""
    b, c, s, h = jitter
    row = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0]
    if rng.random() < p_jitter:
        order = [0, 1, 2, 3]
        factors = [rng.uniform(max(0, 1 - b), 1 + b), rng.uniform(max(0, 1 - c), 1 + c),
                   rng.uniform(max(0, 1 - s), 1 + s), rng.uniform(-h, h)]
        rng.shuffle(order)
        row[:9] = [1.0, *factors, *order]
    row[9] = float(rng.random() < p_gray)
    row[10] = rng.uniform(*sigma) if rng.random() < p_blur else 0.0
    row[11] = float(p_solarize > 0 and rng.random() < p_solarize)
    return torch.tensor(row, dtype=torch.float32)


def apply_appearance(images, params, memory_format=torch.contiguous_format):
    """The network's input from a batch of views: uint8 N x 3 x H x W on the training device and their appearance
    parameters N x 12 (draw_appearance) -> float32 N x 3 x H x W, ImageNet-normalised, in `memory_format`.

    Each image gets its own parameters, in torchvision's order and arithmetic (float in [0, 1], as its tensor ops):
    colour jitter, grayscale, Gaussian blur, solarisation. Batched, with no read of the parameters on the host, so
    the step never waits for the device here. Needs APPEARANCE, colour_jitter, shift_hue, grey, GREY,
    gaussian_blur, BLUR_TAPS, imagenet_constants, IMAGENET_MEAN and IMAGENET_STD."""
    if images.dtype != torch.uint8:
        raise TypeError(f"apply_appearance takes the views' raw uint8 pixels (it normalises them), not {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3 or tuple(params.shape) != (len(images), len(APPEARANCE)):
        raise ValueError(f"apply_appearance takes N x 3 x H x W views and N x {len(APPEARANCE)} parameters "
                         f"(draw_appearance); got {tuple(images.shape)} and {tuple(params.shape)}")
    with torch.autocast(images.device.type, enabled=False):  # fp32, as torchvision: no bf16 blur in a bf16 step
        x = images.float().div_(255)  # N x 3 x H x W in [0, 1]
        p = params.float()
        on = lambda column: p[:, column].bool()[:, None, None, None]  # noqa: E731  N x 1 x 1 x 1
        x = colour_jitter(x, p[:, 1:5], p[:, 5:9].long(), on(0))
        x = torch.where(on(9), grey(x).expand_as(x), x)
        x = torch.where(on(10), gaussian_blur(x, p[:, 10]), x)
        x = torch.where(on(11) & (x >= 128 / 255), 1 - x, x)  # PIL's solarize(img, 128): invert the values >= 128
        mean, std = imagenet_constants(x.device)
        return x.sub_(mean).div_(std).contiguous(memory_format=memory_format)


GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def grey(x):
    """torchvision's rgb_to_grayscale: N x 3 x H x W -> N x 1 x H x W."""
    return (GREY[0] * x[:, 0] + GREY[1] * x[:, 1] + GREY[2] * x[:, 2]).unsqueeze(1)


def colour_jitter(x, factors, order, on):
    """torchvision's ColorJitter on a batch, each image with its own factors (N x 4: brightness, contrast,
    saturation, hue shift) and order (N x 4: the op applied at each position, 0..3 in that list); `on`: N x 1 x 1 x 1.

    Brightness, contrast and saturation are torchvision's blends clamp(f x + (1 - f) r, 0, 1), with r = 0, the
    image's mean grey level and its grey image. Each is linear in the pixel's colour, so a position of the order is
    one colour matrix and offset per image (f I, or f I + (1 - f) 1 w^T for saturation, w the grey weights) applied
    in one pass; f = 1 (the op is elsewhere, or off) is the identity, exactly. The costly hue shift runs once per
    image: the blends placed before it (positions 0-2 can be), the shift, then those after it (positions 1-3)."""
    n, _, h, w = x.shape
    weights = torch.stack([torch.full((), v, device=x.device) for v in GREY])  # 3, built on the device
    eye, hue_at = torch.eye(3, device=x.device), (order == 3).int().argmax(1)  # hue_at: N, the shift's position
    for before, positions in ((True, range(3)), (False, range(1, 4))):
        for position in positions:
            op = order[:, position]  # N
            applies = on.flatten() & (op != 3) & ((position < hue_at) if before else (position > hue_at))
            f = torch.where(applies, factors.gather(1, op.clamp(max=2)[:, None]).flatten(), 1.0)[:, None, None]
            matrix = f * eye + (1 - f) * (op == 2)[:, None, None] * weights  # N x 3 x 3: rows mix the channels
            mean_grey = x.mean((2, 3)) @ weights  # N: the contrast blend's reference
            offset = ((1 - f) * ((op == 1) * mean_grey)[:, None, None]).expand(n, 3, 1)  # N x 3 x 1
            x = torch.baddbmm(offset, matrix, x.reshape(n, 3, h * w)).view(n, 3, h, w).clamp_(0, 1)
        if before:
            x = torch.where(on, shift_hue(x, factors[:, 3]), x)
    return x


def shift_hue(x, shift):
    """torchvision's adjust_hue on a batch (N x 3 x H x W in [0, 1]), each image with its own shift (N): RGB to HSV,
    h + shift (mod 1), back. V (the max) and the chroma (max - min) are unchanged; h is torchvision's _rgb2hsv."""
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)  # N x H x W
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, 1.0)  # a grey pixel has no hue, and stays grey
    rc, gc, bc = (high - r) / safe, (high - g) / safe, (high - b) / safe
    h = torch.where(high == r, bc - gc, torch.where(high == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.fmod(h / 6 + 1, 1) + shift[:, None, None]  # in [0, 1) before the shift
    k = (torch.arange(5, 0, -2, device=x.device)[:, None, None] + 6 * h.unsqueeze(1)) % 6  # N x 3 x H x W: R, G, B
    return high.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)  # HSV -> RGB


def gaussian_blur(x, sigma):
    """torchvision's gaussian_blur (reflect padding, kernel normalised to 1) with BLUR_TAPS taps on a batch
    N x 3 x H x W, each image with its own sigma (N; <= 0: left alone by the caller), as two separable passes."""
    n, c, h, w = x.shape
    taps = torch.arange(BLUR_TAPS, device=x.device, dtype=x.dtype) - BLUR_TAPS // 2
    kernel = torch.exp(-0.5 * (taps / torch.where(sigma > 0, sigma, 1.0)[:, None]) ** 2)  # N x taps
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # N*3 x taps
    y = F.pad(x.reshape(1, n * c, h, w), [BLUR_TAPS // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)  # along x
    return F.conv2d(y, kernel[:, None, :, None], groups=n * c).reshape(n, c, h, w)  # along y


@functools.lru_cache(maxsize=None)
def imagenet_constants(device, scale=1.0):
    """ImageNet's mean and std as 3 x 1 x 1 tensors on `device` (x `scale`), built once: a tensor built from Python
    numbers on a GPU is a copy that waits for the device."""
    return (torch.tensor(IMAGENET_MEAN, device=device)[:, None, None] * scale,
            torch.tensor(IMAGENET_STD, device=device)[:, None, None] * scale)


def to_tensor(img):
    """PIL RGB -> float tensor 3xHxW normalised with ImageNet mean/std."""
    return TF.normalize(TF.pil_to_tensor(img).float().div_(255), IMAGENET_MEAN, IMAGENET_STD)


def to_uint8(img):
    """PIL RGB -> uint8 3 x H x W: what the workers hand over (4x fewer bytes than float32); see normalize."""
    return TF.pil_to_tensor(img)


def normalize(images, device):
    """uint8 images ... x 3 x H x W -> float32 on `device`, ImageNet-normalised there: (x - 255 mean) / (255 std)."""
    mean, std = imagenet_constants(torch.device(device), 255.0)
    return images.to(device, non_blocking=True).float().sub_(mean).div_(std)


# ---- sampling and loading ----
class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler's shuffle (one permutation, padded; rank r takes every world-th index) that can start
    part-way through an epoch, so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, length, rank=0, world_size=1, seed=0):
        super().__init__(range(length), world_size, rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """`start`: how many of this rank's indices of the epoch to skip (batches done x per-rank batch)."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def make_loader(dataset, d, per_rank, workers, seed):
    """(sampler, loader) of a training set: this rank's batches of uint8 views (pinned on a GPU), resumable
    part-way through an epoch. The loader has a generator of its own: every new iterator draws a seed from it, and
    a draw from the global RNG would shift a resumed run's later random numbers."""
    sampler = ResumableSampler(len(dataset), d.rank, d.world_size, seed)
    return sampler, torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=d.device.type == "cuda", persistent_workers=False, prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals if workers > 0 else None)


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGTERM and SIGUSR1 to the training process, which stops cleanly (TrainingRun)."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


# ---- schedules, EMA and precision ----
def cosine(step, total, start, end):
    """Half-cosine from `start` (step 0) to `end` (step `total`)."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(teacher, student, momentum, copy_buffers=True):
    """teacher <- momentum teacher + (1 - momentum) student, parameter by parameter (one lerp pass: half the
    memory traffic of a mul_ then an add_). BN buffers are copied with `copy_buffers` (BYOL, CLoVE); MoCo's key
    encoder keeps its own (copy_buffers=False)."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum)
    if copy_buffers:
        torch._foreach_copy_(list(teacher.buffers()), list(student.buffers()))


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION_HELP = ("autocast: auto = bf16 on GPUs with native bf16, fp16 (loss-scaled) on older ones, fp32 on a CPU")


def autocast_dtype(device, precision):
    """The autocast dtype `--precision` means on `device`, or None for plain fp32. 'auto' takes bf16 only where it
    is native (compute capability 8.0: A100, H100); V100 and T4 emulate it, and fp16 with loss scaling is their
    fast path."""
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        precision = "fp32" if device.type != "cuda" else "bf16" if native else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16: needs a GPU (fp16 autocast with loss scaling); use bf16 or fp32 on a CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def grad_scaler(device, precision):
    """The AMP loss scaler: enabled for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, precision) == torch.float16)


def autocast(device, precision):
    """Autocast to `--precision` on `device` (GPU or CPU: CPU autocast supports bf16); disabled for fp32."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def memory_format(device, channels_last):
    """--channels-last auto|on|off: NHWC for the convolutions (auto: on a GPU, where tensor-core kernels want it)."""
    on = device.type == "cuda" if channels_last == "auto" else channels_last == "on"
    return torch.channels_last if on else torch.contiguous_format


# ---- a training run: log, progress, checkpoints, exact resumption ----
# Flags a resumed run may change: they move no state and leave the result unchanged (precision too, so that a run
# stopped by a non-finite loss can go on in fp32). Every other flag, and the facts, must equal the checkpoint's.
RESUMABLE_CHANGES = {"max_steps", "log_every", "save_every", "save_minutes", "workers", "resume", "output_dir", "data",
                     "init", "precision", "channels_last", "deterministic"}


class TrainingRun:
    """A training script's bookkeeping: rank 0's log.jsonl, tqdm bar, features.png and curves.png, images/s, the
    checkpoint, exact resumption, and a clean stop on a signal.

    `state`: checkpoint key -> what a resumed run restores (anything with state_dict / load_state_dict). Rank 0
    writes the checkpoint atomically every --save-minutes of its clock, at every epoch's end, every --save-every
    steps (when set) and at the end, with the flags, the RNG states and the facts exact resumption needs (world
    size, images). `may_change`: the method's flags a resumed run may change besides RESUMABLE_CHANGES. On SIGTERM or
    SIGUSR1 every rank finishes the step, rank 0 writes the checkpoint and the run raises Preempted. The step reads
    the device once (read_step): one all-reduce carries the loss, the watched values, the stop signal of any rank
    and rank 0's decision to save, so every rank agrees on both decisions with no extra collective."""

    def __init__(self, method, args, d, dataset, state, may_change=(), remedy=""):
        self.method, self.args, self.d, self.state, self.may_change = method, args, d, state, may_change
        os.makedirs(args.output_dir, exist_ok=True)
        self.path, self.remedy = os.path.join(args.output_dir, "checkpoint.pth"), remedy
        self.log = JsonLog(os.path.join(args.output_dir, "log.jsonl"), d.is_main)
        self.facts = dict(world_size=d.world_size, images=len(dataset))
        self.pictures = dataset.pictures(args.image_size)
        self.first_loss = self.last_loss = None
        self.skipped, self.stopping, self.saving = 0, False, False

    def resume(self):
        """Restore `state` and the RNGs from the checkpoint this run continues from; returns its step (0: afresh).
        Rank 0 decides; ranks that can read the same file load it, otherwise (node-local disks) rank 0 sends it.
        From here on a stop signal stops the run where every rank agrees, and rank 0 writes <output-dir>/PREEMPTED
        when it does; a re-run removes the marker first."""
        marker = os.path.join(self.args.output_dir, "PREEMPTED")
        defer_stop_signals(marker)
        if self.d.is_main and os.path.exists(marker):
            os.remove(marker)
        decision, ckpt = self.decide() if self.d.is_main else (None, None)
        decision = broadcast_object(decision)
        if "error" in decision:
            raise UserError(decision["error"])
        if decision["path"] is None:
            return 0
        if not self.d.is_main and os.path.isfile(decision["path"]):
            try:
                ckpt = torch.load(decision["path"], map_location="cpu", weights_only=False)
            except Exception:
                ckpt = None
            ckpt = ckpt if isinstance(ckpt, dict) and ckpt.get("id") == decision["id"] else None
        sent = all_reduce_mean(float(ckpt is not None)) < 1  # some rank sees no file, or another one
        ckpt = broadcast_object(ckpt) if sent else ckpt
        if self.d.is_main:
            print(f"resumed from {decision['path']} at step {ckpt['step']}"
                  + (" (rank 0 sent it to every rank: not every rank could read that file)" if sent else "")
                  + (f"; changed flags: {', '.join(decision['allowed'])}" if decision["allowed"] else ""), flush=True)
        self.log.write(event="resume", step=ckpt["step"], path=decision["path"], sent_by_rank0=sent,
                       changed=decision["allowed"])
        for name, obj in self.state.items():
            if isinstance(obj, torch.amp.GradScaler) and not ckpt[name]:
                continue  # saved by a disabled scaler (--precision may change): an enabled one starts afresh
            obj.load_state_dict(ckpt[name])
        set_rng_states(ckpt["rng"])
        return ckpt["step"]

    def decide(self):
        """Rank 0's half of resume: (decision, checkpoint or None); a decision with an `error` stops every rank."""
        resume = self.args.resume
        path = self.path if resume == "auto" else None if resume == "never" else resume
        if path is None or not os.path.isfile(path):
            return (dict(error=f"--resume {resume}: no such checkpoint") if resume not in ("auto", "never")
                    else dict(path=None)), None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else ""
            return dict(error=f"{path}: unreadable checkpoint ({type(e).__name__}: {reason}); move it away, or pass "
                        "--resume never to start afresh"), None
        if not isinstance(ckpt, dict) or ckpt.get("method") != self.method:
            found = ckpt.get("method") if isinstance(ckpt, dict) else type(ckpt).__name__
            return dict(error=f"{path}: not a {self.method}.py checkpoint (method {found}); pass --resume never or "
                        "another --output-dir"), None
        saved, now = dict(ckpt.get("args", {}), **ckpt.get("facts", {})), dict(vars(self.args), **self.facts)
        forbidden, allowed = [], []
        for key in sorted(set(saved) & set(now)):  # flags unknown to either side are not compared
            if as_list(saved[key]) != as_list(now[key]):  # a two-value flag typed (a list) vs its default (a tuple)
                name = key.replace("_", " ") if key in self.facts else "--" + key.replace("_", "-")
                may = key in RESUMABLE_CHANGES or key in self.may_change
                (allowed if may else forbidden).append(f"{name} {saved[key]} -> {now[key]}")
        if forbidden:
            more = f" (and {len(forbidden) - 1} more: {'; '.join(forbidden[1:])})" if len(forbidden) > 1 else ""
            return dict(error=f"{path}: cannot resume with {forbidden[0]}{more}: rerun with the checkpoint's value, "
                        "or start afresh with another --output-dir or --resume never"), None
        return dict(path=path, id=ckpt.get("id"), allowed=allowed), ckpt

    def save(self, epoch, step):
        """The checkpoint, and curves.png drawn from the log's records in memory (rank 0); restarts the save clock."""
        if self.d.is_main:
            save_checkpoint(self.path, dict(
                method=self.method, epoch=epoch, step=step, args=vars(self.args), rng=rng_states(), facts=self.facts,
                **{name: obj.state_dict() for name, obj in self.state.items()}))
            draw_curves(self.log.records, os.path.join(self.args.output_dir, "curves.png"))
        self.next_save = time.monotonic() + 60 * self.args.save_minutes

    def start(self, step, total_steps, banner, **facts):
        """Print `banner` (rank 0), open the bar at `step` of `total_steps`, log the start with `facts`, and from
        now on take SIGTERM and SIGUSR1 as a request to stop after the current step. A signal that came during
        start-up, on any rank, stops every rank here, before step `step` + 1."""
        if all_reduce_mean(float(stop_signal() is not None)) > 0:
            self.log.write(event="preempted", step=step)
            raise Preempted(f"stopped by a signal before step {step + 1}, " + (
                f"checkpoint {self.path} (step {step}) unchanged" if step else "no checkpoint written"))
        if self.d.is_main:
            print(f"{banner}; {self.facts['images']} images, {total_steps} steps in all", flush=True)
        self.total_steps, self.t_start, self.marks = total_steps, time.time(), collections.deque(maxlen=21)
        self.marks.append((time.perf_counter(), 0))
        self.next_save = time.monotonic() + 60 * self.args.save_minutes
        self.bar = throughput_bar(None, total_steps, self.d.is_main, initial=step, desc=self.method)
        self.log.write(event="start", step=step, **self.facts, total_steps=total_steps, **facts)

    def read_step(self, step, loss, skipped, **means):
        """The step's one read from the device: the loss and `means` (device scalars, e.g. the match top-1) averaged
        over the ranks, and `skipped` (unreadable files, on the device) summed, in one all-reduce that also carries
        any rank's stop signal and rank 0's decision to save (its clock: every --save-minutes). Returns the averages
        as floats; a non-finite loss stops the run before the update, so the checkpoint on disk still holds the last
        good state. Everything is built on the device: a tensor made from Python numbers would be a second wait."""
        flags = loss.new_zeros(2, dtype=torch.float64)
        if stop_signal() is not None:
            flags[0] = 1.0
        if self.d.is_main and time.monotonic() >= self.next_save:
            flags[1] = 1.0
        values = torch.cat([torch.stack([loss.detach().double(), *(m.detach().double() for m in means.values())]),
                            skipped.sum().double()[None], flags])
        if distributed():
            dist.all_reduce(values)
        values = values.tolist()  # the one wait for the device
        world = self.d.world_size
        averages = dict(loss=values[0] / world, **{k: v / world for k, v in zip(means, values[1:])})
        self.skipped += round(values[-3])
        self.stopping, self.saving = values[-2] > 0, values[-1] > 0
        if not math.isfinite(averages["loss"]):
            self.bar.close()
            raise UserError(f"non-finite loss ({averages['loss']}) at step {step + 1}; stopped without saving, so "
                            f"{self.path} still holds the last good state. {self.remedy}")
        return averages

    def step_done(self, step, epoch, values, images, postfix=None, **fields):
        """After optimiser step `step`, with read_step's `values`: a log.jsonl line and a refresh of the bar every
        --log-every steps (and at the last one; the bar writes nothing in between, so a cluster's log stays small),
        a checkpoint when rank 0's clock says so or every --save-every steps. Images/s is over the last 20 steps."""
        loss = values["loss"]
        self.first_loss, self.last_loss = loss if self.first_loss is None else self.first_loss, loss
        self.marks.append((time.perf_counter(), self.marks[-1][1] + images))
        if step % self.args.log_every == 0 or step == self.total_steps:
            (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
            rate = (n1 - n0) / max(t1 - t0, 1e-9)
            self.bar.set_postfix(**{k: f"{v:.3f}" for k, v in values.items()}, **(postfix or {}),
                                 img_s=f"{rate:.1f}", refresh=False)
            self.bar.update(step - self.bar.n)
            self.log.write(step=step, epoch=epoch, **values, **fields, images_per_s=rate, skipped_files=self.skipped,
                           elapsed_s=round(time.time() - self.t_start, 1))
        if self.saving or self.args.save_every and step % self.args.save_every == 0 or self.stopping:
            self.save(epoch, step)
        if self.stopping:
            self.bar.close()
            self.log.write(event="preempted", step=step)
            raise Preempted(f"stopped by a signal after step {step}, checkpoint {self.path}")

    def end_epoch(self, epoch, step, model):
        """The checkpoint, and features.png: `model`'s features of a few fixed images (VADeR Figures 2 and 5)."""
        self.save(epoch, step)
        if self.d.is_main:
            feature_picture(model, self.pictures, os.path.join(self.args.output_dir, "features.png"))

    def finish(self, step, steps_per_epoch, message=None, **fields):
        """Close the run: log its end, print `message(result)` (rank 0) and the result as one JSON line."""
        self.bar.close()
        result = dict(method=self.method, steps=step, epochs=round(step / steps_per_epoch, 3),
                      first_loss=self.first_loss, final_loss=self.last_loss, **fields,
                      seconds=round(time.time() - self.t_start, 1), skipped_files=self.skipped, checkpoint=self.path)
        self.log.write(event="end", **result)
        if self.d.is_main:
            if message:
                print(message(result))
            print_result(result, os.path.join(self.args.output_dir, "result.json"))
        finish_distributed()
        return result


def as_list(value):
    return list(value) if isinstance(value, tuple) else value


def save_checkpoint(path, state):
    """Write atomically and durably: the file is on disk (fsync) before it replaces the old one, so a node that
    fails right after the rename leaves a whole checkpoint. A fresh `id` tells a rank that finds a file of that
    name whether it is rank 0's latest."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(dict(state, id=uuid.uuid4().hex), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself
    finally:
        os.close(folder)


class JsonLog:
    """Appends one JSON object per line to <output-dir>/log.jsonl (rank 0 only), and keeps the records in memory
    (`records`, with those of the file it continues), so a picture of the curves never re-reads the file."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled, self.records = path, enabled, []
        if enabled and os.path.isfile(path):
            with open(path) as f:
                self.records = [json.loads(line) for line in f if line.strip()]

    def write(self, **record):
        if self.enabled:
            self.records.append(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---- ResNet weights, and the frozen features the evaluations read ----
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # the scripts' --arch choices


def resnet(arch):
    """A torchvision ResNet without weights; the classifier is dropped (dense methods never use it). Needs RESNETS."""
    if arch not in RESNETS:
        raise ValueError(f"arch {arch!r}: expected one of {', '.join(RESNETS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    return net


def resnet_channels(arch):
    """Channels of C2..C5 (the outputs of layer1..layer4)."""
    return [64, 128, 256, 512] if arch in ("resnet18", "resnet34") else [256, 512, 1024, 2048]


def resnet_stages(net, x, stages=4):
    """C2..C5 of a torchvision ResNet (strides 4, 8, 16, 32 unless dilated); the first `stages` of them."""
    outputs = [net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))]
    for layer in (net.layer2, net.layer3, net.layer4)[:stages - 1]:
        outputs.append(layer(outputs[-1]))
    return outputs


# --weights: the checkpoint formats read, each unwrapped to the ResNet its authors transfer. A row: the top-level key
# (None: the file is the state dict), the encoder's prefix once `module.` is dropped, the prefixes that tell it apart
# from the rows below it, and where the layout comes from. The first row that fits wins, so a specific layout stands
# above a general one (MoCo's encoder_q.* + encoder_k.* under `state_dict`, SlotCon's under `model`, where the
# teacher is the one transferred). A generic "first key ending in conv1.weight" would take SlotCon's student.
WEIGHT_FORMATS = {
    "densecl": ("state_dict", "backbone.", ("encoder_k.0.",), "OpenSelfSup: backbone is an alias of encoder_q.0"),
    "moco": ("state_dict", "encoder_q.", (), "MoCo v1/v2 main_moco.py: the query encoder (fc: its MLP head)"),
    "mocov3": ("state_dict", "base_encoder.", ("momentum_encoder.",), "moco-v3 convert_to_deit / lincls: "
               "base_encoder (fc: the projector)"),
    "solo-learn": ("state_dict", "backbone.", ("classifier.",), "solo-learn BaseMethod: backbone (momentum_backbone "
                   "and the online classifier dropped)"),
    "solo-learn-old": ("state_dict", "encoder.", ("classifier.",), "solo-learn before it renamed encoder to backbone"),
    "lightly": ("state_dict", "backbone.", (), "lightly: backbone, torchvision names or nn.Sequential(*children)"),
    "slotcon": ("model", "encoder_k.", ("encoder_q.",), "SlotCon transfer: the teacher, encoder_k"),
    "pixpro": ("model", "encoder.", ("encoder_k.",), "PixPro and the official CLoVE (one layout): the online encoder"),
    "vicregl": ("model", "backbone.", (), "VICRegL full checkpoint: backbone"),
    "dino": ("teacher", "backbone.", (), "DINO main_dino.py: the teacher, as its released backbones"),
    "torchvision": (None, "", ("layer1.0.conv1.",), "a ResNet state dict (also under state_dict), fc dropped"),
}
SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}  # children()


def known_formats():
    """One line for the errors: every format read, with its top-level key and encoder prefix."""
    rows = [f"{name} ({top or 'flat'}: {prefix or ''}*)" for name, (top, prefix, _, _) in WEIGHT_FORMATS.items()]
    return "vader.py/clove.py checkpoints, " + ", ".join(rows)


def unwrap(ckpt, top, prefix, marks):
    """The ResNet state dict of `ckpt` under one WEIGHT_FORMATS row, or None if the row does not fit. In order: the
    top-level key, `module.`, the method's prefix, a Sequential's indices to torchvision names, heads (fc) dropped."""
    state = ckpt.get(top) if top else ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        return None
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if not any(k.startswith(prefix) for k in state) or not all(any(k.startswith(m) for k in state) for m in marks):
        return None
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    split = [k.split(".", 1) for k in state]
    if all(h.isdigit() for h, _ in split):  # lightly's nn.Sequential(*list(resnet.children())[:-1])
        state = {f"{SEQUENTIAL_NAMES.get(h, h)}.{rest}": v for (h, rest), v in zip(split, state.values())}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return state if "conv1.weight" in state else None


def read_weights(path):
    """(format, state dict, meta) of a weights file: 'vader' / 'clove' (our checkpoints: the whole online model, its
    args in meta), or a WEIGHT_FORMATS name and the ResNet state dict its authors transfer (torchvision's names)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such weights file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}); expected one of: {known_formats()}")
    if isinstance(ckpt, dict) and ckpt.get("method") in ("vader", "clove"):
        return ckpt["method"], ckpt["model"], dict(arch=ckpt["args"]["arch"], args=ckpt["args"])
    for name, (top, prefix, marks, _) in WEIGHT_FORMATS.items():
        state = unwrap(ckpt, top, prefix, marks) if isinstance(ckpt, dict) else None
        if state is not None:
            return name, state, {}
    raise UserError(f"{path}: not a known weights file (found {key_prefixes(ckpt)}); known formats: "
                    f"{known_formats()}")


def key_prefixes(ckpt):
    """What a checkpoint holds, for the error: its top-level keys and, in each dict among them, the key prefixes."""
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}"
    parts = []
    for top, value in list(ckpt.items())[:8]:
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            prefixes = sorted({".".join(k.split(".")[:2 if k.startswith("module.") else 1]) for k in value})
            parts.append(f"{top}: {', '.join(p + '.*' for p in prefixes[:6])}{', ...' if len(prefixes) > 6 else ''}")
        else:
            parts.append(str(top))
    return "; ".join(parts)


def weights_format(weights):
    """The format name of --weights ('random' for none), as metrics.json records it."""
    return "random" if weights == "random" else read_weights(weights)[0]


def encoder_state(state):
    """The ResNet part (`encoder.*`, prefix dropped) of a vader.py / clove.py model state dict."""
    return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}


def load_resnet_state(net, state, path):
    """Load ResNet weights strictly (but the classifier); a mismatch is a one-line error naming the file."""
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: another depth than --arch
        raise UserError(f"{path}: does not fit --arch ({str(e).splitlines()[1].strip()}); pass the --arch it was "
                        "trained with") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"{path}: does not fit this --arch ({len(missing)} missing keys, e.g. {missing[:2]}, "
                        f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); pass the --arch it was trained with")


def infer_arch(state):
    """The ResNet depth of a state dict, from its keys (MoCo and torchvision files carry no args)."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4))
    table = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
             (3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"}
    return table.get((*blocks, any(k.endswith("conv3.weight") for k in state)))


def set_resnet_stride(net, stride):
    """Make a torchvision ResNet (plain or dilated) output C5 at 1/stride (4, 8, 16 or 32), in place: going down
    the stages, a stage keeps its stride 2 while the output is finer than 1/stride, then trades it for dilation
    (DeepLab's "large field of view", VADeR §4.1). For Bottlenecks this is torchvision's
    replace_stride_with_dilation (e.g. [False, True, True] for 8); BasicBlocks, which torchvision refuses to
    dilate, follow the same rule (first block: the previous dilation in conv1; conv2 and later blocks: the new one).
    Parameter names and shapes do not change, so loaded weights stay."""
    current, dilation = 4, 1
    for layer in (net.layer2, net.layer3, net.layer4):
        if current < stride:
            s, previous, current = 2, dilation, current * 2
        else:
            s, previous, dilation = 1, dilation, dilation * 2
        for i, block in enumerate(layer):
            bottleneck = hasattr(block, "conv3")
            strided = block.conv2 if bottleneck else block.conv1  # torchvision puts the stride in the 3x3 conv
            if i == 0:
                strided.stride = (s, s)
                if block.downsample is not None:
                    block.downsample[0].stride = (s, s)
            first = previous if i == 0 else dilation
            if bottleneck:
                block.conv2.dilation = block.conv2.padding = (first, first)
            else:
                block.conv1.dilation = block.conv1.padding = (first, first)
                block.conv2.dilation = block.conv2.padding = (dilation, dilation)
    return net


class DilatedResNet(nn.Module):
    """res5: a ResNet whose C5 is computed at 1/4 resolution, the frozen-feature baseline of VADeR §4.1 (which
    evaluates the baselines at its decoder's resolution)."""

    def __init__(self, arch):
        super().__init__()
        self.net = set_resnet_stride(resnet(arch), 4)
        self.out_channels = resnet_channels(arch)[-1]

    def forward(self, x):
        return resnet_stages(self.net, x)[-1]


class Res4ResNet(nn.Module):
    """res4: layer3's output with layer3's stride set to 1 (no dilation) and layer4 unused, C4 at 1/8: where CRW and
    TimeCycle read their ResNet baselines (videowalk's resnet.py modify(), TimeCycle's resnet_res4s1.py). layer4
    stays in the module, so that any ResNet state dict of the same depth loads into it."""

    def __init__(self, arch):
        super().__init__()
        self.net = resnet(arch)
        for m in self.net.layer3.modules():
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
        self.out_channels = resnet_channels(arch)[2]

    def forward(self, x):
        return resnet_stages(self.net, x, stages=3)[-1]


BASELINE_LAYERS = {"res5": DilatedResNet, "res4": Res4ResNet}  # --layer of the evaluation scripts


def dense_feature_model(weights, arch, dense_models, layer="res5"):
    """(frozen network, description) that an evaluation reads, from `weights` ('random' or a file): N x 3 x H x W ->
    N x C x H/4 x W/4 (H/8 for res4). `dense_models` maps a method to its class with a dense head ({"vader":
    VADeRNet}, so this file imports no method), whose `from_args(saved_args)` builds the trained network (None: no
    dense head was trained). Every other kind is a ResNet read at `layer` (BASELINE_LAYERS)."""
    where = "dilated to 1/4" if layer == "res5" else "res4 at 1/8"
    if weights == "random":
        return BASELINE_LAYERS[layer](arch), f"random init ({arch}, {where})"
    kind, state, meta = read_weights(weights)
    arch = meta.get("arch") or infer_arch(state) or arch
    model = dense_models[kind].from_args(meta["args"]) if kind in dense_models else None
    if model is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{weights}: does not fit the network its saved arguments describe "
                            f"({str(e).splitlines()[1].strip()})") from None
        return model, f"{kind} checkpoint {weights} ({arch}, its own dense head)"
    model = BASELINE_LAYERS[layer](arch)
    load_resnet_state(model.net, encoder_state(state) if kind in ("vader", "clove") else state, weights)
    return model, f"{kind} weights {weights} ({arch}, {where})"


# ---- pictures: training curves, and the features (VADeR Figures 2 and 5) ----
def draw_curves(records, path, width=720, height=170):
    """curves.png from a run's log records (JsonLog.records): the loss against its chance level (the start event's
    `chance_loss`), the learning rates, images/s, and the training-time match top-1 against its chance, over the
    steps."""
    steps = [r for r in records if "loss" in r and "step" in r]
    chance = {k: r[k] for r in records if r.get("event") == "start" for k in ("chance_loss", "match_chance") if k in r}
    panels = [("loss", ["loss"], chance.get("chance_loss")), ("learning rate", [k for k in steps[-1] if
              k.startswith("lr")] if steps else [], None), ("images/s", ["images_per_s"], None),
              ("match top-1", ["match_top1"] if chance.get("match_chance", 0) < 1 else [], chance.get("match_chance"))]
    panels = [p for p in panels if steps and all(k in steps[-1] for k in p[1]) and p[1]]
    canvas = Image.new("RGB", (width, max(1, len(panels)) * height), "white")
    draw, colours = ImageDraw.Draw(canvas), [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    for p, (title, keys, reference) in enumerate(panels):
        top, x0, x1 = p * height + 18, 60, width - 10
        values = [v for k in keys for v in (r[k] for r in steps) if v is not None] + ([reference] if reference else [])
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + abs(lo) / 10 + 1e-12  # a flat curve
        first, span = steps[0]["step"], max(steps[-1]["step"] - steps[0]["step"], 1)
        sx = lambda step: x0 + (x1 - x0) * (step - first) / span  # noqa: E731
        sy = lambda v: top + (height - 40) * (hi - v) / (hi - lo)  # noqa: E731
        draw.rectangle([x0, top, x1, top + height - 40], outline=(160, 160, 160))
        draw.text((x0, top - 15), title + (f": {', '.join(keys)}" if len(keys) > 1 else "") + (
            f" (dashed: chance {reference:.3g})" if reference else ""), fill="black")
        draw.text((2, top), f"{hi:.3g}", fill="black"), draw.text((2, top + height - 50), f"{lo:.3g}", fill="black")
        draw.text((x1 - 80, top + height - 36), f"step {steps[-1]['step']}", fill="black")
        if reference:
            for x in range(x0, x1, 8):
                draw.line([(x, sy(reference)), (x + 4, sy(reference))], fill=(120, 120, 120))
        for c, k in enumerate(keys):
            points = [(sx(r["step"]), sy(r[k])) for r in steps if r.get(k) is not None]
            draw.line(points if len(points) > 1 else points * 2, fill=colours[c % 3], width=2)
    canvas.save(path)
    return canvas


def pca_colours(features):
    """N x C x h x w features on their first three principal components, scaled to [0, 1]: N x 3 x h x w."""
    n, c, h, w = features.shape
    x = features.float().permute(0, 2, 3, 1).reshape(-1, c)  # P x C
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # a picture of a diverged model must not stop its run
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # rows of v: principal directions
    y = x @ v[:3].t() if v.shape[0] >= 3 else F.pad(x @ v.t(), (0, 3 - v.shape[0]))  # P x 3
    lo, hi = y.quantile(0.01, dim=0), y.quantile(0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return y.reshape(n, h, w, 3).permute(0, 3, 1, 2)


@torch.no_grad()
def feature_picture(model, images, path, query=None):
    """A PNG: the images, their features in PCA colours (Figure 5), and the cosine similarity of one query pixel
    (marked; default the centre of image 0) to every pixel (Figure 2). `model` (or its `feature_map`) maps
    N x 3 x S x S to N x C x h x w."""
    size = images[0].size
    x = torch.stack([to_tensor(im.convert("RGB").resize(size)) for im in images])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats = getattr(model, "feature_map", model)(x.to(device)).float().cpu()  # N x C x h x w
    model.train(was_training)
    n, _, h, w = feats.shape
    qi, qy, qx = query or (0, h // 2, w // 2)
    unit = F.normalize(feats, dim=1)
    sim = torch.einsum("c,nchw->nhw", unit[qi, :, qy, qx], unit)  # N x h x w, in [-1, 1]
    rows = [[np.asarray(im.convert("RGB").resize(size)) for im in images],
            [(c.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for c in pca_colours(feats)],
            [np.repeat((((s + 1) / 2).clamp(0, 1).numpy() * 255).astype(np.uint8)[..., None], 3, 2) for s in sim]]
    canvas = Image.new("RGB", (size[0] * n, size[1] * 3))
    for r, row in enumerate(rows):
        for i, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile).resize(size, Image.NEAREST), (i * size[0], r * size[1]))
    cx, cy = int((qx + 0.5) * size[0] / w) + qi * size[0], int((qy + 0.5) * size[1] / h)
    for row in (0, 2):  # a red cross on the query pixel, in the image and in its own similarity map
        ImageDraw.Draw(canvas).line([(cx - 4, cy + row * size[1]), (cx + 4, cy + row * size[1])], fill=(255, 0, 0))
        ImageDraw.Draw(canvas).line([(cx, cy - 4 + row * size[1]), (cx, cy + 4 + row * size[1])], fill=(255, 0, 0))
    canvas.save(path)
    return canvas
