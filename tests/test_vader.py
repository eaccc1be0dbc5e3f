"""VADeR: geometry of the views, Eq. 2, the queue, the network, and the training script end to end."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import common
import vader


def coordinate_image(width, height):
    """Red = x, green = y of the pixel (so every pixel tells where it came from)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8))


def original_coordinates(view, grid):
    """Mean (x, y) that the pixels of each cell of a view came from: [grid*grid, 2] (row-major cells)."""
    rgb = view.float()  # 3 x S x S uint8 pixel values (normalisation happens later, on the device)
    cell = view.shape[-1] // grid
    xy = rgb[:2].reshape(2, grid, cell, grid, cell).mean((2, 4))  # 2 x grid x grid
    return xy.reshape(2, -1).t()


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.05, 0.2), (0.9, 1.0)])
def test_matched_cells_see_the_same_original_pixel(scale):
    img = coordinate_image(256, 200)
    views = vader.PairedViews(image_size=64, num_matches=32)
    views.scale = scale
    grid, flips = 16, 0
    for seed in range(25):
        v1, v2, matches, _ = views(img, random.Random(seed))
        assert matches.shape == (32, 4) and matches.dtype == torch.long
        xy1, xy2 = original_coordinates(v1, grid), original_coordinates(v2, grid)
        # columns 2, 3: the original-image pixel of the pair's scene point (--negative-radius measures with it)
        # (a pixel value k covers [k, k + 1): centre k + 0.5, then rounding: within 1 px, plus resampling slack)
        assert ((xy1[matches[:, 0]] + 0.5 - matches[:, 2:].float()).abs() <= 1.01).all(), seed
        # size of a view-2 cell in original pixels, read off the ramp itself (flip-proof: absolute values)
        cell2_w = abs(xy2[grid - 1, 0] - xy2[0, 0]) / (grid - 1)
        cell2_h = abs(xy2[-1, 1] - xy2[0, 1]) / (grid - 1)
        d = (xy1[matches[:, 0]] - xy2[matches[:, 1]]).abs()
        assert (d[:, 0] <= cell2_w / 2 + 1.0).all(), (seed, d[:, 0].max(), cell2_w)
        assert (d[:, 1] <= cell2_h / 2 + 1.0).all(), (seed, d[:, 1].max(), cell2_h)
        flips += int(xy1[grid - 1, 0] < xy1[0, 0]) + int(xy2[grid - 1, 0] < xy2[0, 0])
    assert 10 < flips < 40  # flips happened (p = 0.5 per view), so the mirrored geometry was exercised


def test_matches_are_distinct_cells_of_view_one():
    v1, v2, matches, _ = vader.PairedViews(image_size=64, num_matches=40)(coordinate_image(128, 128),
                                                                        random.Random(3))
    assert len(set(matches[:, 0].tolist())) == 40
    assert matches.min() >= 0 and matches.max() < 16 * 16


def test_same_view_matching_pairs_each_cell_with_itself():
    views = vader.SameViewPairs(image_size=64, num_matches=16)
    v1, v2, matches, _ = views(coordinate_image(100, 80), random.Random(0))
    assert torch.equal(matches[:, 0], matches[:, 1])
    assert torch.equal(v1, v2)  # the colour ops come later, on the device: identical crops give identical pixels


def test_unmatch_pairs_ignore_the_geometry():
    views = vader.UnmatchedPairs(image_size=64, num_matches=32)
    img = coordinate_image(256, 256)
    far = 0
    for seed in range(5):
        v1, v2, matches, _ = views(img, random.Random(seed))
        d = (original_coordinates(v1, 16)[matches[:, 0]] - original_coordinates(v2, 16)[matches[:, 1]]).norm(dim=1)
        far += int((d > 30).sum())
    assert far > 80  # most of the 160 "positives" are far apart in the original image


def test_views_are_uint8_pixels_with_appearance_parameters_drawn_after_the_geometry():
    img = coordinate_image(64, 64)
    views = vader.PairedViews(image_size=32, num_matches=4)
    view1, view2, matches, appearance = views(img, random.Random(7))
    assert view1.shape == view2.shape == (3, 32, 32) and view1.dtype == torch.uint8  # coloured later, on the device
    assert appearance.shape == (2, len(common.APPEARANCE)) and appearance.dtype == torch.float32
    rng = random.Random(7)  # the geometry alone, drawn first from the same stream: the same views and matches
    box1, flip1, box2, flip2, alone = views.match(rng, 64, 64)
    assert torch.equal(matches, alone)
    assert torch.equal(view1, common.to_uint8(common.crop_resize(img, box1, 32, flip1)))
    assert torch.equal(view2, common.to_uint8(common.crop_resize(img, box2, 32, flip2)))
    assert torch.equal(appearance, torch.stack([views.appearance(rng), views.appearance(rng)]))  # then the colours


def random_matches(n, m, grid=4, seed=0):
    """N x M x 4 matches on a small grid, so that view-2 cells repeat (duplicate keys), with original positions."""
    g = torch.Generator().manual_seed(seed)
    cells1 = torch.stack([torch.randperm(grid * grid, generator=g)[:m] for _ in range(n)])
    cells2 = torch.randint(0, grid * grid, (n, m), generator=g)
    position = torch.stack([cells1 % grid * 10 + 5, cells1 // grid * 10 + 5], 2)  # cell centres, 10 px cells
    return torch.cat([cells1[..., None], cells2[..., None], position], 2)


def test_loss_equals_a_naive_loop_over_eq2_with_in_image_negatives_by_radius():
    torch.manual_seed(0)
    n, m, d, k, tau = 3, 6, 8, 10, 0.2
    q = torch.nn.functional.normalize(torch.randn(n * m, d), dim=1)
    key = torch.nn.functional.normalize(torch.randn(n * m, d), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(k, d), dim=1)
    matches = random_matches(n, m)
    cells2, xy = matches[..., 1].flatten().tolist(), matches[..., 2:].reshape(-1, 2).tolist()
    assert any(cells2[i] == cells2[j] for i in range(n * m) for j in range(n * m) if i != j and i // m == j // m)
    for in_image, radius in ((False, 0), (True, 0), (True, 12), (True, 1000)):
        total, counted = 0.0, 0
        for i in range(n * m):
            pos = math.exp(float(q[i] @ key[i]) / tau)
            neg = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(k))
            if in_image:
                for j in range(i // m * m, i // m * m + m):
                    far = math.hypot(xy[i][0] - xy[j][0], xy[i][1] - xy[j][1]) > radius or radius == 0
                    if j != i and cells2[j] != cells2[i] and far:  # never a copy of the positive's view-2 cell
                        neg += math.exp(float(q[i] @ key[j]) / tau)
                        counted += 1
            total += -math.log(pos / (pos + neg))
        if in_image:
            mask = vader.in_image_negatives(matches, radius)
            got = vader.in_image_loss(q, key, queue, tau, mask)
        else:
            got = vader.vader_loss(q, key, queue, tau)
        assert got.item() == pytest.approx(total / (n * m), rel=1e-5), (in_image, radius)
        if in_image:
            assert int(mask.sum()) == counted
            assert (radius < 1000) == (counted > 0)  # radius 1000 px leaves no in-image negative


def naive_nt_xent(z1, z2, matches, tau, in_image, radius):
    """SimCLR's symmetric loss by hand: anchor a of view v, positive = a of the other view, negatives = every other
    pixel of both views whose pair is from another image (or, with in_image, another view-2 cell farther than R)."""
    n, m = matches.shape[:2]
    cells2, xy = matches[..., 1].flatten().tolist(), matches[..., 2:].reshape(-1, 2).tolist()
    p, total = n * m, 0.0
    views = (z1, z2)
    for v in (0, 1):
        for a in range(p):
            anchor = views[v][a]
            pos = math.exp(float(anchor @ views[1 - v][a]) / tau)
            neg = 0.0
            for b in range(p):
                if a // m == b // m:
                    far = radius == 0 or math.hypot(xy[a][0] - xy[b][0], xy[a][1] - xy[b][1]) > radius
                    if not (in_image and cells2[a] != cells2[b] and far):
                        continue
                neg += math.exp(float(anchor @ views[1 - v][b]) / tau) + math.exp(float(anchor @ views[v][b]) / tau)
            total += -math.log(pos / (pos + neg))
    return total / (2 * p)


def test_shared_key_encoder_loss_equals_a_naive_symmetric_nt_xent():
    torch.manual_seed(1)
    n, m, d, tau = 3, 5, 8, 0.3
    z1 = torch.nn.functional.normalize(torch.randn(n * m, d), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(n * m, d), dim=1)
    matches = random_matches(n, m, seed=2)
    for in_image, radius in ((False, 0), (True, 0), (True, 15)):
        got = vader.shared_loss(z1, z2, matches, tau, in_image, radius)
        assert got.item() == pytest.approx(naive_nt_xent(z1, z2, matches, tau, in_image, radius), rel=1e-5)


def test_queue_wraps_around_and_keeps_the_newest_keys():
    queue = vader.PixelQueue(size=6, dim=2)
    batches = [torch.full((3, 2), float(i)) for i in range(1, 4)]
    for b in batches:
        queue.enqueue(b)
    # 3 + 3 filled the ring, the third batch overwrote the first
    assert queue.keys[:, 0].tolist() == [3, 3, 3, 2, 2, 2]
    assert int(queue.ptr) == 3
    with pytest.raises(ValueError):
        queue.enqueue(torch.zeros(4, 2))  # 6 is not a multiple of 4: MoCo's assertion


def test_momentum_update_moves_parameters_only():
    f, g = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        f.weight.fill_(1.0), g.weight.fill_(0.0)
        f.running_mean.fill_(5.0), g.running_mean.fill_(-1.0)
    common.ema_update(g, f, 0.999, copy_buffers=False)
    assert torch.allclose(g.weight, torch.full((3,), 0.001))
    assert torch.equal(g.running_mean, torch.full((3,), -1.0))  # MoCo: g keeps its own BN statistics


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet18", 96), ("resnet50", 64), ("resnet18", (54, 85))])
def test_output_is_128_channels_at_a_quarter_resolution(arch, size):
    h, w = size if isinstance(size, tuple) else (size, size)
    net = vader.VADeRNet(arch).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, h, w))
    assert out.shape == (2, 128, math.ceil(h / 4), math.ceil(w / 4))  # any frame size, e.g. DAVIS' 854 x 480


def test_decoder_has_panoptic_fpn_blocks_per_level():
    decoder = vader.SemanticFPNDecoder()
    convs = [sum(isinstance(m, nn.Conv2d) for m in level.modules()) for level in decoder.levels]
    ups = [sum(isinstance(m, nn.Upsample) for m in level.modules()) for level in decoder.levels]
    assert convs == [1, 1, 2, 3] and ups == [0, 1, 2, 3]  # 1/4, 1/8, 1/16, 1/32 -> 1/4
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for level in decoder.levels
               for m in level.modules() if isinstance(m, nn.GroupNorm))


# ---- the script end to end ----
def make_folder(root, bad=True):
    """A tiny ImageNet-style folder with every odd kind of image, and a few broken files."""
    rng = np.random.default_rng(0)
    train = root / "train" / "n0001"
    train.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (70 + i, 90, 3), dtype=np.uint8)).save(train / f"rgb{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 60), dtype=np.uint8)).save(train / "gray.png")
    Image.fromarray(rng.integers(0, 255, (50, 60, 4), dtype=np.uint8), "RGBA").save(train / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)).convert("CMYK").save(train / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(train / "depth16.png")
    Image.fromarray(rng.integers(0, 255, (3, 5, 3), dtype=np.uint8)).save(train / "tiny.png")
    if bad:
        (train / "empty.jpg").write_bytes(b"")
        (train / "notes.jpg").write_text("this is not an image")
        data = (train / "rgb0.jpg").read_bytes()
        (train / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return root


TINY = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "4", "--queue-size", "64", "--num-matches", "8",
        "--workers", "0", "--log-every", "1", "--lr-encoder", "0.01", "--lr-decoder", "0.01"]


def test_training_on_a_folder_with_odd_and_broken_images(tmp_path, run_script):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    # batch 2 x 7 steps = one epoch over the 14 files: every broken file is met
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "7", *TINY, "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps"] == 7 and math.isfinite(result["final_loss"]) and result["skipped_files"] >= 3
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 8)) and all(math.isfinite(x["loss"]) for x in steps)
    for name in ("empty.jpg", "notes.jpg", "truncated.jpg"):
        assert name in r.stderr  # one warning naming each broken file
    assert "tiny.png" not in r.stderr and "cmyk.jpg" not in r.stderr and "depth16.png" not in r.stderr
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["step"] == 7 and ckpt["method"] == "vader"
    assert {"model", "momentum_encoder", "queue", "optimizer", "scaler", "args", "rng"} <= set(ckpt)
    assert int(ckpt["queue"]["ptr"]) == (7 * 2 * 8) % 64


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, run_script):
    data = make_folder(tmp_path / "data", bad=False)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script("vader.py", "--data", data, "--output-dir", a, "--max-steps", "4", *TINY).returncode == 0
    r = run_script("vader.py", "--data", data, "--output-dir", b, "--max-steps", "2", *TINY, "--save-minutes", "0")
    assert r.returncode == 0  # rank 0's clock saves after every step: the checkpoint read below is the clock's
    assert [x["step"] for x in map(json.loads, (b / "log.jsonl").read_text().splitlines()) if "loss" in x] == [1, 2]
    r = run_script("vader.py", "--data", data, "--output-dir", b, "--max-steps", "4", *TINY)
    assert r.returncode == 0 and "resumed" in r.stdout
    ca, cb = torch.load(a / "checkpoint.pth", weights_only=False), torch.load(b / "checkpoint.pth", weights_only=False)
    assert ca["step"] == cb["step"] == 4
    for part in ("model", "momentum_encoder", "queue"):
        for key in ca[part]:
            assert torch.equal(ca[part][key], cb[part][key]), (part, key)


def test_two_process_torchrun_on_cpu(tmp_path, run_script):
    data = make_folder(tmp_path / "data", bad=False)
    out = tmp_path / "out"
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "2", *TINY, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    # keys of both ranks were gathered: 2 steps x global batch 4 x 8 matches
    assert ckpt["step"] == 2 and int(ckpt["queue"]["ptr"]) == 0 and ckpt["queue"]["keys"].shape == (64, 128)
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 alone reports


def test_init_from_a_moco_checkpoint_loads_the_encoder(tmp_path, run_script):
    data = make_folder(tmp_path / "data", bad=False)
    resnet = torchvision.models.resnet18()
    state = {f"module.encoder_q.{k}": v for k, v in resnet.state_dict().items()}
    state["module.encoder_q.fc.0.weight"] = torch.zeros(2, 2)  # MoCo v2's MLP head: must be ignored
    torch.save({"state_dict": state, "epoch": 800}, tmp_path / "moco.pth.tar")
    out = tmp_path / "out"
    args = [a if a != "0.01" else "0" for a in TINY]  # lr 0: the encoder must still hold the MoCo weights after
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "1", "--init",
                   tmp_path / "moco.pth.tar", *args, "--weight-decay", "0")
    assert r.returncode == 0, r.stderr
    assert "moco" in r.stdout
    model = torch.load(out / "checkpoint.pth", weights_only=False)["model"]
    assert torch.equal(model["encoder.conv1.weight"], resnet.state_dict()["conv1.weight"])
    assert torch.equal(model["encoder.layer4.1.conv2.weight"], resnet.state_dict()["layer4.1.conv2.weight"])


def test_the_two_stage_recipe_starts_vader_from_the_moco_v2_encoder(tmp_path, run_script):
    """The paper's protocol: stage 1 is MoCo v2 (--objective global), stage 2 is VADeR with --init at its checkpoint.
    At lr 0 stage 2's encoder must still be stage 1's, in f and in g, and the FPN decoder is new."""
    data = make_folder(tmp_path / "data", bad=False)
    stage1, stage2 = tmp_path / "moco", tmp_path / "vader"
    flags = list(TINY)
    r = run_script("vader.py", "--data", data, "--output-dir", stage1, "--max-steps", "2", *flags,
                   "--objective", "global", "--loss-weight", "1")
    assert r.returncode == 0, r.stderr
    frozen = [a if a != "0.01" else "0" for a in flags]
    r = run_script("vader.py", "--data", data, "--output-dir", stage2, "--max-steps", "1", *frozen,
                   "--init", stage1 / "checkpoint.pth", "--weight-decay", "0")
    assert r.returncode == 0, r.stderr
    moco = torch.load(stage1 / "checkpoint.pth", weights_only=False)["model"]
    dense = torch.load(stage2 / "checkpoint.pth", weights_only=False)
    assert dense["args"]["objective"] == "dense" and any(k.startswith("decoder.") for k in dense["model"])
    weights = [k for k in moco if k.startswith("encoder.") and k.endswith(".weight")]
    assert len(weights) > 20 and not any(k.startswith("head.") for k in dense["model"])
    for net in ("model", "momentum_encoder"):
        for key in weights:
            assert torch.equal(dense[net][key], moco[key]), (net, key)


def bad_run(run_script, tmp_path, *args):
    r = run_script("vader.py", *TINY, "--max-steps", "1", "--output-dir", tmp_path / "bad-run", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return errors[0]


def test_bad_inputs_give_one_line_errors(tmp_path, run_script):
    assert "no such folder" in bad_run(run_script, tmp_path, "--data", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no image files" in bad_run(run_script, tmp_path, "--data", tmp_path / "empty")
    data = make_folder(tmp_path / "data", bad=False)
    (tmp_path / "notes.txt").write_text("not weights")
    assert "notes.txt" in bad_run(run_script, tmp_path, "--data", data, "--init", tmp_path / "notes.txt")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    assert "--arch" in bad_run(run_script, tmp_path, "--data", data, "--init", tmp_path / "r50.pth")  # TINY says resnet18
    assert "--image-size" in bad_run(run_script, tmp_path, "--data", data, "--image-size", "70")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, run_script):
    data = make_folder(tmp_path / "data", bad=False)
    out = tmp_path / "out"
    assert run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "2", *TINY).returncode == 0
    before = torch.load(out / "checkpoint.pth", weights_only=False)
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "6", *TINY,
                   "--lr-decoder", "nan", "--lr-encoder", "nan")  # step 3's update makes every weight nan
    assert r.returncode != 0 and "non-finite loss" in r.stderr and "Traceback" not in r.stderr
    after = torch.load(out / "checkpoint.pth", weights_only=False)
    assert after["step"] == 2
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


DISTRIBUTED_CHECK = r'''
import random
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import common, vader
d = common.init_distributed()
torch.manual_seed(0)  # the same network and global batch on both ranks; each rank holds its half
g = vader.VADeRNet("resnet18").train()  # train-mode BN: a key depends on the shard it is computed in
images, cells = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8), torch.randint(0, 256, (8, 5))
rng = random.Random(0)
appearance = torch.stack([common.draw_appearance(rng) for _ in range(8)])
mine = slice(4 * d.rank, 4 * d.rank + 4)
received = []  # bytes that reach this rank from the other one, per collective
all_to_all, all_gather = dist.all_to_all_single, dist.all_gather
def counted_all_to_all(out, inp, out_splits, in_splits, **kw):
    received.append(sum(out_splits[r] for r in range(2) if r != d.rank) * out[0].numel() * out.element_size())
    return all_to_all(out, inp, out_splits, in_splits, **kw)
def counted_all_gather(parts, tensor, **kw):
    received.append(tensor.numel() * tensor.element_size())
    return all_gather(parts, tensor, **kw)
dist.all_to_all_single, dist.all_gather = counted_all_to_all, counted_all_gather
torch.manual_seed(100 + d.rank)  # different local RNGs: the permutation must come from the seed alone
with torch.no_grad():
    keys, every_key = vader.key_embeddings(g, images[mine], appearance[mine], cells[mine], seed="7/3")
dist.all_to_all_single, dist.all_gather = all_to_all, all_gather
order = list(range(8))
random.Random("7/3").shuffle(order)  # by hand: shard r is the permutation's r-th half, run by g as one batch
expected = torch.empty(8, 5, 128)
with torch.no_grad():
    for shard in (order[:4], order[4:]):
        x = common.apply_appearance(images[shard], appearance[shard])
        expected[shard] = vader.gather_cells(g(x), cells[shard])
assert every_key.shape == (8, 5, 128) and torch.allclose(every_key, expected, atol=1e-5)
assert torch.equal(keys, every_key[mine])  # this rank's own images' keys, in order
# what travels: uint8 views of the shard (+ appearance and cells) and the keys once, against the old exchange:
# all fp32 views gathered, the cells, and the keys gathered twice (in key_embeddings and again in the queue)
before = 4 * (3 * 64 * 64 * 4 + 5 * 8 + 2 * 5 * 128 * 4)
assert sum(received) <= before / 4, (received, before)
queue = vader.PixelQueue(16, 128)
queue.enqueue(every_key[:, :2].flatten(0, 1))  # the global batch's keys, gathered once: every rank the same queue
assert int(queue.ptr) == 0 and torch.equal(queue.keys, every_key[:, :2].flatten(0, 1))
if d.rank == 0:
    print("exchange bytes per step:", sum(received), "before:", before, flush=True)
open(f"{sys.argv[2]}/rank{d.rank}.ok", "w").close()  # a file per rank: the ranks' stdout may interleave
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # gloo aborts at exit if the group is left alive
'''


def test_shuffle_bn_returns_each_rank_its_own_keys_and_the_queue_gathers_all(tmp_path, run_script):
    script = tmp_path / "check.py"
    script.write_text(DISTRIBUTED_CHECK)
    r = run_script(str(script), os.path.dirname(os.path.dirname(os.path.abspath(__file__))), tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()  # both ranks passed every check


def test_pca_colours_are_constant_on_regions_of_constant_features():
    features = torch.zeros(2, 16, 8, 8)
    features[:, 0, :4] = 3.0  # region A: top half
    features[:, 5, 4:, :4] = -2.0  # region B: bottom left; region C: bottom right (all zeros)
    colours = common.pca_colours(features + 1.0)  # 2 x 3 x 8 x 8
    regions = [(slice(0, 4), slice(0, 8)), (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8))]
    means = []
    for ys, xs in regions:
        patch = colours[:, :, ys, xs]
        assert torch.allclose(patch, patch[:1, :, :1, :1].expand_as(patch), atol=1e-5)  # one colour per region
        means.append(patch[0, :, 0, 0])
    assert min((means[i] - means[j]).abs().max() for i in range(3) for j in range(i + 1, 3)) > 0.2  # distinct


def test_feature_picture_from_a_tiny_checkpoint(tmp_path, run_script):
    out = tmp_path / "out"
    data = make_folder(tmp_path / "data", bad=False)
    assert run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "1", *TINY).returncode == 0
    picture = Image.open(out / "features.png")
    assert picture.size == (4 * 128, 3 * 128)  # 4 images x (image, PCA, similarity) rows, at least 128 px
    net = vader.VADeRNet("resnet18")
    net.load_state_dict(torch.load(out / "checkpoint.pth", weights_only=False)["model"])
    images = [Image.fromarray(np.full((40, 40, 3), c, np.uint8)) for c in (0, 80, 160)]
    pic = common.feature_picture(net, images, tmp_path / "p.png")
    assert pic.size == (3 * 40, 3 * 40) and (tmp_path / "p.png").exists()
    sim = np.asarray(pic)[80:, :40].astype(int)  # similarity row of image 0
    assert sim[22, 22].tolist() == [255, 0, 0]  # the query pixel (centre cell) is marked in red
    assert sim[0, 0, 0] == sim[0, 0, 1] == sim[0, 0, 2]  # the rest is a grey similarity map


# ---- the reviewers' switches and one-process shuffle BN ----
def test_one_process_shuffle_bn_normalises_keys_over_random_sub_batches():
    torch.manual_seed(0)
    g = vader.VADeRNet("resnet18").train()  # train-mode BN: the statistics depend on the sub-batch
    images, cells = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8), torch.randint(0, 256, (8, 5))
    rng = random.Random(1)
    appearance = torch.stack([common.draw_appearance(rng) for _ in range(8)])
    keys, every_key = vader.key_embeddings(g, images, appearance, cells, splits=4, seed="run/5")
    assert torch.equal(keys, every_key)  # one process: the global batch is this batch
    order = list(range(8))
    random.Random("run/5").shuffle(order)  # by hand: MoCo's SplitBatchNorm = g on each sub-batch alone
    expected = torch.empty(8, 5, 128)
    with torch.no_grad():
        for part in (order[0:2], order[2:4], order[4:6], order[6:8]):
            x = common.apply_appearance(images[part], appearance[part])
            z = torch.nn.functional.normalize(g(x).flatten(2), dim=1)  # 2 x 128 x HW
            for row, i in enumerate(part):
                expected[i] = z[row][:, cells[i]].t()
        plain = vader.gather_cells(g(common.apply_appearance(images, appearance)), cells)  # one BN over the batch
    assert torch.allclose(keys, expected, atol=1e-5)
    assert (keys - plain).abs().max() > 1e-2  # not plain BN: the query's batch statistics are not reused
    g.eval()  # with fixed statistics the shuffle must hand each image its own keys back, in order
    with torch.no_grad():
        assert torch.allclose(vader.key_embeddings(g, images, appearance, cells, splits=3, seed=1)[0],
                              vader.gather_cells(g(common.apply_appearance(images, appearance)), cells),
                              atol=1e-5)  # 8 images in 3 splits: sizes 2, 3, 3


def test_data_without_init_and_a_tiny_encoder_lr_is_refused(tmp_path, run_script):
    data = make_folder(tmp_path / "data", bad=False)
    args = [a for a in TINY]
    args[args.index("--lr-encoder") + 1] = "3e-7"  # the paper's lr, meant for a MoCo v2 start
    r = run_script("vader.py", "--data", data, "--output-dir", tmp_path / "x", "--max-steps", "1", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--init" in r.stderr and "--lr-encoder 0.03 --lr-decoder 0.03 --loss-weight 1" in r.stderr
    assert not (tmp_path / "x" / "checkpoint.pth").exists()
    # the embedded demo (no --data) is unaffected by the rule
    r = run_script("vader.py", "--output-dir", tmp_path / "demo", "--max-steps", "1", "--synthetic-images", "8",
                   *args)
    assert r.returncode == 0, r.stderr


def test_global_net_is_avg_pooled_c5_through_moco_v2s_mlp_head():
    head = vader.GlobalNet("resnet50").head
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(2048, 2048), (2048, 128)]
    torch.manual_seed(0)
    net = vader.GlobalNet("resnet18").eval()
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()  # torchvision's own forward: avgpool(C5), flattened
    reference.load_state_dict(net.encoder.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = reference.eval()(x)  # 2 x 512
        expected = net.head[2](torch.relu(net.head[0](pooled)))
        assert net(x).shape == (2, 128, 1, 1)  # a one-cell map: vader_step with one match per image is MoCo v2
        assert torch.allclose(net(x).flatten(1), expected, atol=1e-5)


def test_global_objective_is_infonce_over_the_image_queue():
    torch.manual_seed(0)
    f = vader.GlobalNet("resnet18").eval()
    g = vader.GlobalNet("resnet18").eval()
    queue = vader.PixelQueue(6, 128)
    view1, view2 = (torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8) for _ in range(2))
    appearance = torch.stack([common.draw_appearance(random.Random(i)) for i in range(6)]).view(3, 2, -1)
    args = vader.parse_args(["--objective", "global"])
    assert args.temperature == 0.2  # MoCo v2's
    matches = vader.TwoCrops(64)(Image.new("RGB", (80, 80)), random.Random(0))[2]
    assert matches.shape == (1, 4) and not matches.any()  # one "cell" per image: the 1 x 1 map's
    loss, keys, _ = vader.vader_step(f, g, queue, view1, view2, matches.expand(3, 1, 4), appearance, temperature=0.2,
                                     momentum=1.0, bn_splits=1)
    with torch.no_grad():
        q = torch.nn.functional.normalize(f(common.apply_appearance(view1, appearance[:, 0])).flatten(1), dim=1)
        k = torch.nn.functional.normalize(g(common.apply_appearance(view2, appearance[:, 1])).flatten(1), dim=1)
    total = 0.0
    for i in range(3):
        pos = math.exp(float(q[i] @ k[i]) / 0.2)
        neg = sum(math.exp(float(q[i] @ queue.keys[j]) / 0.2) for j in range(6))
        total += -math.log(pos / (pos + neg))
    assert loss.item() == pytest.approx(total / 3, rel=1e-4)
    assert keys.shape == (3, 1, 128) and torch.allclose(keys[:, 0], k, atol=1e-5)  # one key per image


def test_crops_objective_views_both_come_from_one_non_overlapping_region():
    img = coordinate_image(200, 160)
    views = vader.RegionCrops(image_size=32, regions=2)
    seen = set()
    for seed in range(30):
        v1, v2, _, _ = views(img, random.Random(seed))
        quadrants = []
        for v in (v1, v2):
            rgb = v.float()  # uint8 pixel values = original coordinates
            x, y = rgb[0].round(), rgb[1].round()
            qx, qy = (x >= 100).long(), (y >= 80).long()
            assert qx.min() == qx.max() and qy.min() == qy.max(), seed  # the whole view lies in one quadrant
            quadrants.append((int(qx[0, 0]), int(qy[0, 0])))
        assert quadrants[0] == quadrants[1]  # both views are crops of the same instance
        seen.add(quadrants[0])
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}  # each of the four regions is an instance


def test_keys_per_image_enqueues_k_random_matched_keys_of_each_image(tmp_path, run_script):
    """One step with --keys-per-image 2: the queue's first rows are g's embeddings of the first 2 matches of each
    image of the step's batch (rebuilt here from the sampler and the views), computed by the g the run saved."""
    data, out = make_folder(tmp_path / "data", bad=False), tmp_path / "out"
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "1", *TINY, "--keys-per-image", "2",
                   "--shuffle-bn-splits", "1")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    dataset = common.ViewDataset(str(data), vader.PairedViews(64, 8), seed=0)
    sampler = common.ResumableSampler(len(dataset), 0, 1, seed=0)
    batch = [dataset[i] for i in list(sampler)[:4]]  # step 1's four images
    view2 = common.apply_appearance(torch.stack([b[1] for b in batch]), torch.stack([b[3][1] for b in batch]))
    matches = torch.stack([b[2] for b in batch])  # 4 x 8 x 4
    g = vader.VADeRNet("resnet18")
    g.load_state_dict(ckpt["momentum_encoder"])
    with torch.no_grad():
        keys = vader.gather_cells(g.train()(view2), matches[:, :, 1])  # 4 x 8 x 128, BN on the batch as in training
    assert int(ckpt["queue"]["ptr"]) == 8  # 4 images x 2 keys
    assert torch.allclose(ckpt["queue"]["keys"][:8], keys[:, :2].flatten(0, 1), atol=1e-5)
    assert not torch.allclose(ckpt["queue"]["keys"][:8], keys[:, 2:4].flatten(0, 1), atol=1e-2)  # not any 2


def copy_of(net):
    import copy
    return copy.deepcopy(net).requires_grad_(False)


def test_cosine_schedule_follows_moco_v2s_formula(tmp_path, run_script):
    data = make_folder(tmp_path / "data", bad=False)  # 11 images, batch 4: 2 steps an epoch, 2 epochs = T = 4
    out = tmp_path / "out"
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--epochs", "2", "--max-steps", "3", *TINY,
                   "--lr-schedule", "cosine", "--lr-encoder", "0.02")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [lr for x in lines if "loss" in x for lr in (x["lr_encoder"], x["lr_decoder"])]
    expected = [lr for t in range(3)  # the lr of step t+1 is set from t steps done
                for lr in (0.02 * 0.5 * (1 + math.cos(math.pi * t / 4)), 0.01 * 0.5 * (1 + math.cos(math.pi * t / 4)))]
    assert logged == pytest.approx(expected)  # a flat list: pytest 9's approx refuses nested sequences


@pytest.mark.parametrize("switches", [
    ["--in-image-negatives", "--negative-radius", "6", "--keys-per-image", "2", "--queue-size", "24"],
    ["--key-encoder", "shared", "--in-image-negatives"],
    ["--objective", "crops", "--queue-size", "8"],
])
def test_each_switch_trains_end_to_end(tmp_path, run_script, switches):
    data = make_folder(tmp_path / "data", bad=False)
    out = tmp_path / "out"
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "2", *TINY, *switches)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    flags = {a.lstrip("-").replace("-", "_") for a in switches if a.startswith("--")}
    assert flags <= set(ckpt["args"])  # the checkpoint's args carry the new flags
    if "--keys-per-image" in switches:
        assert int(ckpt["queue"]["ptr"]) == 2 * 4 * 2 % 24  # 2 steps x 4 images x 2 keys (24 is no multiple of 32)
    if "shared" in switches:
        assert ckpt["momentum_encoder"] == {} and ckpt["queue"] == {}  # no g, no queue
    if "crops" in switches:
        assert int(ckpt["queue"]["ptr"]) == 2 * 4 % 8 and ckpt["queue"]["keys"].shape == (8, 128)


def test_global_objective_resumes_exactly_and_evaluates_its_encoder(tmp_path, run_script):
    data = make_folder(tmp_path / "data", bad=False)
    a, b = tmp_path / "a", tmp_path / "b"
    flags = [*TINY, "--objective", "global", "--queue-size", "8"]
    assert run_script("vader.py", "--data", data, "--output-dir", a, "--max-steps", "3", *flags).returncode == 0
    assert run_script("vader.py", "--data", data, "--output-dir", b, "--max-steps", "2", *flags).returncode == 0
    r = run_script("vader.py", "--data", data, "--output-dir", b, "--max-steps", "3", *flags)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    ca, cb = torch.load(a / "checkpoint.pth", weights_only=False), torch.load(b / "checkpoint.pth", weights_only=False)
    assert any(k.startswith("head.") for k in ca["model"]) and ca["args"]["objective"] == "global"
    for part in ("model", "momentum_encoder", "queue"):
        for key in ca[part]:
            assert torch.equal(ca[part][key], cb[part][key]), (part, key)
    assert vader.VADeRNet.from_args(ca["args"]) is None  # no dense head: evaluation probes the encoder
    model, _ = common.dense_feature_model(str(a / "checkpoint.pth"), "resnet50", {"vader": vader.VADeRNet})
    assert isinstance(model, common.DilatedResNet)
    assert torch.equal(model.net.conv1.weight, ca["model"]["encoder.conv1.weight"])
    assert torch.equal(model.net.layer4[1].conv2.weight, ca["model"]["encoder.layer4.1.conv2.weight"])


SHARED_CHECK = r'''
import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
import common, vader
d = common.init_distributed()
torch.manual_seed(0)  # the same global batch on both ranks; each rank holds its half
n, m, tau = 4, 3, 0.5
z1, z2 = F.normalize(torch.randn(n * m, 8), dim=1), F.normalize(torch.randn(n * m, 8), dim=1)
matches = torch.zeros(n, m, 4, dtype=torch.long)
mine = slice(6 * d.rank, 6 * d.rank + 6)  # 2 images x 3 pixels per rank
local1, local2 = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
loss = vader.shared_loss(local1, local2, matches[2 * d.rank:2 * d.rank + 2], tau)
loss.backward()
# reference by hand, one process: NT-Xent over the whole batch, other images' pixels of both views as negatives
ref1, ref2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
image = torch.arange(n).repeat_interleave(m)
other = image[:, None] != image[None, :]
total = 0
for a, b in ((ref1, ref2), (ref2, ref1)):
    neg = torch.cat([(a @ b.t()).masked_fill(~other, float("-inf")),
                     (a @ a.t()).masked_fill(~other, float("-inf"))], 1)
    pos = (a * b).sum(1, keepdim=True)
    total = total + F.cross_entropy(torch.cat([pos, neg], 1) / tau, torch.zeros(n * m, dtype=torch.long)) / 2
total.backward()
losses = common.all_gather_cat(loss.detach()[None])
assert torch.allclose(losses.mean(), total.detach(), atol=1e-5), (losses, total)
# DDP averages gradients over the 2 ranks: each rank's local gradient must be 2 x the full-batch gradient
assert torch.allclose(local1.grad, 2 * ref1.grad[mine], atol=1e-5), (local1.grad - 2 * ref1.grad[mine]).abs().max()
assert torch.allclose(local2.grad, 2 * ref2.grad[mine], atol=1e-5)
open(f"{sys.argv[2]}/rank{d.rank}.ok", "w").close()
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def test_shared_key_encoder_gathers_every_ranks_pixels_with_gradients(tmp_path, run_script):
    script = tmp_path / "check.py"
    script.write_text(SHARED_CHECK)
    r = run_script(str(script), os.path.dirname(os.path.dirname(os.path.abspath(__file__))), tmp_path, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()


def step_one_batch(data, views, batch, seed=0):
    """The first batch a vader.py run on `data` (one process, --workers 0) trains on, rebuilt from its sampler."""
    dataset = common.ViewDataset(str(data), views, seed=seed)
    items = [dataset[i] for i in list(common.ResumableSampler(len(dataset), 0, 1, seed=seed))[:batch]]
    return [torch.stack([it[part] for it in items]) for part in range(4)]  # view1, view2, matches, appearance


def test_global_objective_from_scratch_takes_moco_v2s_sgd_step(tmp_path, run_script):
    """--objective global from scratch at lr 0.03 is MoCo v2's update exactly: weight decay 1e-4 on the weights
    and loss weight 1, p1 = p0 - 0.03 (grad InfoNCE + 1e-4 p0) on the first SGD step (momentum buffer = gradient)."""
    data, out = make_folder(tmp_path / "data", bad=False), tmp_path / "out"
    args = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "4", "--queue-size", "64", "--workers", "0",
            "--objective", "global", "--lr-encoder", "0.03", "--lr-decoder", "0.03", "--shuffle-bn-splits", "1"]
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--max-steps", "1", *args)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["args"]["loss_weight"] == 1.0 and ckpt["args"]["weight_decay"] == 1e-4
    common.seed_all(0)  # the run's initialisation, in the run's order: f, g (a copy), the queue
    f = vader.GlobalNet("resnet18", 128)
    g = copy_of(f)
    queue = vader.PixelQueue(64, 128)
    p0 = {k: v.detach().clone() for k, v in f.named_parameters()}
    view1, view2, matches, appearance = step_one_batch(data, vader.TwoCrops(64), 4)
    f.train(), g.train()
    loss, _, _ = vader.vader_step(f, g, queue, view1, view2, matches, appearance, temperature=0.2, momentum=0.999,
                                  bn_splits=1)
    loss.backward()  # the plain InfoNCE of MoCo v2, weight 1
    for name, p in f.named_parameters():
        expected = p0[name] - 0.03 * (p.grad + 1e-4 * p0[name])
        assert torch.allclose(ckpt["model"][name], expected, rtol=1e-5, atol=1e-7), name


def test_match_top1_is_one_on_features_that_encode_their_cell_and_chance_on_constant_ones():
    cells2 = torch.tensor([[3, 7, 7, 12, 0, 5]])  # two queries match view-2 cell 7: either key is their match
    positions = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    k = positions[cells2]  # 1 x 6 x 8: a key encodes its view-2 cell
    assert vader.match_top1(k.clone(), k, cells2) == 1.0
    constant = torch.ones(1, 6, 8) / 8 ** 0.5
    assert vader.match_top1(constant, constant, cells2) == pytest.approx(1 / 6)  # ties: the first key, cell 3
    confused = positions[torch.tensor([[12, 0, 0, 5, 3, 7]])]  # each query looks like another point of the image
    assert vader.match_top1(confused, k, cells2) == 0.0


def test_a_missing_data_folder_is_named_before_any_other_check(tmp_path, run_script):
    r = run_script("vader.py", "--data", tmp_path / "no" / "such", "--output-dir", tmp_path / "o", "--max-steps", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"--data {tmp_path / 'no' / 'such'}: no such folder" in r.stderr and "--lr-encoder" not in r.stderr


def test_ablation_table_rows_spread_over_seeds_not_over_probe_trials():
    """tests/ablation_table.py: a seeded row's mIoU ± is the std of its seeds' mIoUs (hand-computed: 0.2, 0.3,
    0.4 -> 0.1), not the mean of the probe's trial stds (0.01), which once overwrote it."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "ablation_table.py")
    spec = importlib.util.spec_from_file_location("ablation_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    per_seed = [dict(miou=m, miou_std=0.01, top1=t, loss=None) for m, t in ((0.2, 0.5), (0.3, 0.5), (0.4, 0.8))]
    row = table.over_seeds("diff. view", ["--seed"], per_seed)
    assert row["seeds"] == 3 and row["miou"] == pytest.approx(0.3) and row["miou_std"] == pytest.approx(0.1)
    assert row["top1_std"] == pytest.approx(math.sqrt(0.03)) and row["loss"] is None and "loss_std" not in row
    assert table.over_seeds("one seed", [], per_seed[:1]).keys() == {"row", "flags", "seeds", "miou", "top1", "loss"}
