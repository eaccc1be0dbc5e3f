"""The training step's device path: the appearance ops batched on the device against torchvision, the parameters
the loader draws for them, one read of the device per step, rank 0's checkpoint clock, CLoVE's memory check and
the benchmarks that measure all of it (each run at a tiny size, so that none can rot)."""
import argparse
import collections
import itertools
import os
import random

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import benchmarks
import clove
import common
import vader

MEAN, STD = torch.tensor(common.IMAGENET_MEAN)[:, None, None], torch.tensor(common.IMAGENET_STD)[:, None, None]


def sample_images(n=12, seed=0):
    """uint8 N x 3 x 24 x 32 images with smooth ramps, noise, saturated and grey pixels (hue's edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 24, 32, generator=g) * 255).round()
    x[:, :, :6] = x[:, :1, :6]  # grey rows: r = g = b
    x[:, 0, 6:9], x[:, 1, 9:12] = 255, 0  # saturated channels
    return x.to(torch.uint8)


def torchvision_appearance(image, p):
    """torchvision's tensor ops applied to one image (float in [0, 1]) with one row of draw_appearance."""
    x = image.float() / 255
    if p[0]:
        ops = [lambda x: TF.adjust_brightness(x, p[1].item()), lambda x: TF.adjust_contrast(x, p[2].item()),
               lambda x: TF.adjust_saturation(x, p[3].item()), lambda x: TF.adjust_hue(x, p[4].item())]
        for op in p[5:9].long().tolist():
            x = ops[op](x)
    if p[9]:
        x = TF.rgb_to_grayscale(x, 3)
    if p[10]:
        x = TF.gaussian_blur(x, [common.BLUR_TAPS] * 2, [p[10].item()] * 2)
    if p[11]:
        x = TF.solarize(x, 128 / 255)
    return x


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue", "grayscale", "blur", "solarize"])
def test_each_appearance_op_on_a_batch_equals_torchvision_one_image_at_a_time(op):
    images, rng = sample_images(), random.Random(1)
    params = torch.zeros(len(images), len(common.APPEARANCE))
    params[:, 1:4], params[:, 5:9] = 1.0, torch.arange(4.0)  # identities
    for i in range(len(images)):  # each image its own value, drawn from the op's full range (and 1 in 4 left alone)
        on = i % 4 != 3
        if op in ("brightness", "contrast", "saturation"):
            column = 1 + ["brightness", "contrast", "saturation"].index(op)
            params[i, 0], params[i, column] = on, rng.uniform(0.0, 2.0)
        elif op == "hue":
            params[i, 0], params[i, 4] = on, rng.uniform(-0.5, 0.5)
            params[i, 5:9] = torch.tensor([3.0, 0.0, 1.0, 2.0])  # the shift first, so that it meets the raw pixels
        elif op == "grayscale":
            params[i, 9] = on
        elif op == "blur":
            params[i, 10] = rng.uniform(0.1, 2.0) if on else 0.0
        else:
            params[i, 11] = on
    out = common.apply_appearance(images, params) * STD + MEAN  # back to [0, 1]
    for i in range(len(images)):
        expected = torchvision_appearance(images[i], params[i])
        assert (out[i] - expected).abs().max() <= 1 / 255, (op, i)
    assert (out[3] - images[3] / 255).abs().max() < 1e-6  # an image whose op is off is left as it was


def test_the_whole_appearance_pipeline_equals_torchvision_in_each_images_own_order():
    images, rng = sample_images(48, seed=2), random.Random(3)
    params = torch.stack([common.draw_appearance(rng, (0.4, 0.4, 0.4, 0.1), 1.0, 0.3, 0.6, 0.3) for _ in images])
    assert len({tuple(p[5:9].tolist()) for p in params}) > 15  # many of the 24 orders in one batch
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the training step calls it: in fp32 all the same
        out = common.apply_appearance(images, params, torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    for i in range(len(images)):
        expected = (torchvision_appearance(images[i], params[i]) - MEAN) / STD  # then ImageNet's normalisation
        assert ((out[i] - expected) * STD).abs().max() <= 1 / 255, i


def frequency(rows, column, value=None):
    hits = [(r[column] != 0) if value is None else r[column] == value for r in rows]
    return sum(map(bool, hits)) / len(rows)


def within(p_hat, p, n, sigmas=4.5):
    return abs(p_hat - p) <= sigmas * (p * (1 - p) / n) ** 0.5


def test_appearance_parameters_follow_moco_v2s_distributions():
    """PairedViews' draws against MoCo v2's aug-plus: ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 in a uniformly
    random order, RandomGrayscale(0.2), GaussianBlur sigma U(0.1, 2) with p 0.5, no solarisation."""
    rng, views, n = random.Random(0), vader.PairedViews(32, 4), 12000
    rows = [views.appearance(rng) for _ in range(n)]
    assert within(frequency(rows, 0), 0.8, n) and within(frequency(rows, 9), 0.2, n)
    assert within(frequency(rows, 10), 0.5, n) and frequency(rows, 11) == 0
    jittered, blurred = [r for r in rows if r[0]], [r[10].item() for r in rows if r[10]]
    off = [r for r in rows if not r[0]]
    assert all(r[1:9].tolist() == [1, 1, 1, 0, 0, 1, 2, 3] for r in off)  # identity values when skipped
    for column, (lo, hi) in zip((1, 2, 3, 4), ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))):
        values = torch.stack([r[column] for r in jittered])
        assert lo <= values.min() < lo + 0.01 and hi - 0.01 < values.max() <= hi  # the whole range, nothing beyond
        assert abs(values.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo) * 4  # uniform: the mean in the middle
    assert 0.1 <= min(blurred) < 0.12 and 1.98 < max(blurred) <= 2.0 and abs(sum(blurred) / len(blurred) - 1.05) < 0.03
    orders = collections.Counter(tuple(r[5:9].long().tolist()) for r in jittered)
    assert set(orders) == set(itertools.permutations(range(4)))  # every order of the four ops, equally often
    expected = len(jittered) / 24
    chi2 = sum((c - expected) ** 2 / expected for c in orders.values())
    assert chi2 < 60  # 23 degrees of freedom: p < 1e-4 above 60


def test_clove_views_draw_byols_probabilities_view_by_view():
    """CLoVEViews: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 and grayscale p 0.2 on every view; blur p 1.0 / 0.1 on the
    global views and 0.5 on the local ones; solarisation p 0 / 0.2 on the global views, never on the local ones."""
    views, image, n = clove.CLoVEViews(64, 2, 32), Image.new("RGB", (80, 60), (90, 120, 30)), 1500
    rows = torch.stack([views(image, random.Random(i))[4] for i in range(n)])  # n x 4 views x 12
    for v, blur, solarize in ((0, 1.0, 0.0), (1, 0.1, 0.2), (2, 0.5, 0.0), (3, 0.5, 0.0)):
        r = rows[:, v]
        assert within(frequency(r, 0), 0.8, n) and within(frequency(r, 9), 0.2, n), v
        assert frequency(r, 10) == blur if blur in (0.0, 1.0) else within(frequency(r, 10), blur, n), v
        assert frequency(r, 11) == solarize if solarize == 0 else within(frequency(r, 11), solarize, n), v
    saturation = rows[:, :, 3][rows[:, :, 0] > 0]
    assert 0.8 <= saturation.min() < 0.81 and 1.19 < saturation.max() <= 1.2  # BYOL's 0.2, not MoCo's 0.4


def test_a_training_step_reads_the_device_once_and_the_gpu_benchmark_runs():
    """tests/benchmarks.py gpu at CPU size: img/s of both steps in bf16 and fp32, the loader's cost, and the calls
    that would make the host wait for a GPU during real training steps (vader.py with one-process shuffle BN,
    clove.py with --accum-steps 2): one a step, at log steps too (top-1 and the pairs count ride with the loss)."""
    out = benchmarks.bench_gpu(argparse.Namespace(tiny=True))
    assert all(row["images_per_s"] > 0 and row["micro_batch"] == 4 for row in out["steps"].values())
    assert set(out["steps"]) == {"vader bf16", "vader fp32", "clove bf16", "clove fp32"}
    assert all(v > 0 for v in out["loader_images_per_s_per_worker"].values())
    assert out["syncs"] == {"vader": dict(per_step=1, per_log_step=1), "clove": dict(per_step=1, per_log_step=1)}


SAVE_CLOCK_CHECK = r'''
import argparse
import sys
import time
import torch
sys.path.insert(0, sys.argv[1])
import common
d = common.init_distributed()
now = [0.0]
time.monotonic = lambda: now[0]  # this rank's clock, set by hand below
args = argparse.Namespace(output_dir=sys.argv[2], image_size=32, resume="never", log_every=100, save_every=0,
                          save_minutes=1.5)
run = common.TrainingRun("vader", args, d, common.ViewDataset(None, None, length=4), dict(model=torch.nn.Linear(2, 2)))
run.start(0, 6, "clock check")
saved = []
for step in range(1, 7):
    now[0] = 60.0 * step if d.rank == 0 else 0.0  # a minute a step on rank 0; rank 1's clock never moves
    run.read_step(step - 1, torch.tensor(1.0), torch.zeros(1))
    saved.append(run.saving)
    run.step_done(step, 0, dict(loss=1.0), 4)
every = common.all_gather_cat(torch.tensor([saved]))
assert every[0].tolist() == every[1].tolist() == [False, True, False, True, False, True], every
open(f"{sys.argv[2]}/rank{d.rank}.ok", "w").close()
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def test_rank_zeros_clock_decides_when_every_rank_saves(tmp_path, run_script):
    """--save-minutes 1.5 on rank 0's clock (a minute a step) and a stopped clock on rank 1: both ranks save after
    steps 2, 4 and 6, the decision riding in the loss's all-reduce."""
    script = tmp_path / "check.py"
    script.write_text(SAVE_CLOCK_CHECK)
    r = run_script(str(script), os.path.dirname(os.path.dirname(os.path.abspath(__file__))), tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()
    assert (tmp_path / "checkpoint.pth").exists() and (tmp_path / "curves.png").exists()


class FakeGPUMemory:
    """torch.cuda's memory calls stood in for: a step holds `per_image` bytes an image plus `fixed`, the device has
    `free` bytes; the images of each probe are counted by a forward hook on the student."""

    def __init__(self, monkeypatch, student, per_image, fixed, free):
        self.per_image, self.fixed, self.free, self.images = per_image, fixed, free, 0
        student.register_forward_hook(lambda module, inputs, output: setattr(self, "images", len(inputs[0]) // 2))
        for name, fn in dict(synchronize=lambda *a: None, reset_peak_memory_stats=lambda *a: None,
                             memory_allocated=lambda *a: 10**9, memory_reserved=lambda *a: 10**9,
                             empty_cache=lambda: None, get_device_name=lambda *a: "a fake 80 GB GPU",
                             max_memory_allocated=lambda *a: 10**9 + self.fixed + self.per_image * self.images,
                             mem_get_info=lambda *a: (self.free, 80 * 2**30)).items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_clove_names_the_smallest_accum_steps_that_fits_before_step_1(monkeypatch):
    """The paper's batch (2048 on 4 GPUs: 512 images a rank) at 165 MiB an image on an 80 GB card: the probe steps
    measure the per-image cost, and the run stops with one line naming --accum-steps 2 (256 images: 41 GiB)."""
    args = clove.get_parser().parse_args(["--arch", "resnet18", "--image-size", "64", "--local-size", "32",
                                          "--local-crops", "2", "--batch-size", "2048", "--precision", "fp32"])
    f = clove.CLoVENet("resnet18", 64, 32, 8)
    teacher, cpu = clove.make_teacher(f), torch.device("cpu")
    loss = clove.clove_loss
    memory = FakeGPUMemory(monkeypatch, f.encoder.conv1, 165 * 2**20, 2 * 2**30, 78 * 2**30)
    buffers = [b.clone() for b in f.buffers()]
    per_image, fixed = clove.step_memory(f, teacher, loss, args, cpu, torch.contiguous_format)
    momentum = sum(p.numel() * 4 for p in f.parameters())
    assert per_image == 165 * 2**20 and fixed == 2 * 2**30 + momentum
    assert all(torch.equal(a, b) for a, b in zip(buffers, f.buffers())) and all(p.grad is None for p in f.parameters())
    d = common.Dist(world_size=4, device=cpu)
    with pytest.raises(common.UserError) as error:
        clove.check_memory(f, teacher, loss, args, d, 512, torch.contiguous_format)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "--accum-steps 1" in message and "fits is 2 (256 images" in message
    clove.check_memory(f, teacher, loss, vars_with(args, accum_steps=2), d, 256, torch.contiguous_format)  # fits
    memory.free = 30 * 2**30  # a 40 GB card with a third in use: 4 (128 images, 20.6 GiB + the rest)
    with pytest.raises(common.UserError, match="fits is 4 "):
        clove.check_memory(f, teacher, loss, args, d, 512, torch.contiguous_format)
    memory.free = 2**30  # nothing fits
    with pytest.raises(common.UserError, match="not even one image per rank fits"):
        clove.check_memory(f, teacher, loss, args, d, 512, torch.contiguous_format)


def vars_with(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def test_every_benchmark_runs_at_a_tiny_size(tmp_path):
    """Each command of tests/benchmarks.py at a CPU size (gpu runs in the test above): none can rot unnoticed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    a = benchmarks.main_parser().parse_args(["vader", "--arch", "resnet18", "--image-size", "64", "--batch-size", "2",
                                             "--repeats", "1", "--queue-size", "256", "--num-matches", "8",
                                             "--local-crops", "2", "--local-size", "32", "--images", "2",
                                             "--per-rank", "4", "--weights", "random", "--code", root, root, "--tiny"])
    assert benchmarks.bench_vader(a)["appearance_over_step"]["median"] > 0
    assert benchmarks.bench_clove(a)["appearance_over_step"]["median"] > 0
    data = benchmarks.bench_data(a)["per_checkout"]
    assert data[root]["vader"]["fields"][-2].startswith("float32") and data["reference"]  # appearance rows travel
    assert benchmarks.bench_warmup_memory(a)["per_image_mib"]["fp32"] > 0
    assert 0 <= benchmarks.bench_clove_position(a)["position_share"]["random"]["c5"] <= 1
    assert benchmarks.bench_probe_ceiling(a)["probe"]["random"]["miou"] >= 0
    assert benchmarks.bench_stop_flag(vars_with(a, repeats=1))["microseconds_per_step"]
    fingerprint = benchmarks.bench_fingerprint(a)  # the same code twice: the same weights, bit for bit
    assert fingerprint["identical"] and set(fingerprint["digests"]) == {"vader", "clove"}
