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
    views = vader.PairedViews(image_size=64, color=False, num_matches=32)
    views.scale = scale
    grid, flips = 16, 0
    for seed in range(25):
        v1, v2, matches = views(img, random.Random(seed))
        assert matches.shape == (32, 2) and matches.dtype == torch.long
        xy1, xy2 = original_coordinates(v1, grid), original_coordinates(v2, grid)
        # size of a view-2 cell in original pixels, read off the ramp itself (flip-proof: absolute values)
        cell2_w = abs(xy2[grid - 1, 0] - xy2[0, 0]) / (grid - 1)
        cell2_h = abs(xy2[-1, 1] - xy2[0, 1]) / (grid - 1)
        d = (xy1[matches[:, 0]] - xy2[matches[:, 1]]).abs()
        assert (d[:, 0] <= cell2_w / 2 + 1.0).all(), (seed, d[:, 0].max(), cell2_w)
        assert (d[:, 1] <= cell2_h / 2 + 1.0).all(), (seed, d[:, 1].max(), cell2_h)
        flips += int(xy1[grid - 1, 0] < xy1[0, 0]) + int(xy2[grid - 1, 0] < xy2[0, 0])
    assert 10 < flips < 40  # flips happened (p = 0.5 per view), so the mirrored geometry was exercised


def test_matches_are_distinct_cells_of_view_one():
    v1, v2, matches = vader.PairedViews(image_size=64, color=False, num_matches=40)(coordinate_image(128, 128),
                                                                                     random.Random(3))
    assert len(set(matches[:, 0].tolist())) == 40
    assert matches.min() >= 0 and matches.max() < 16 * 16


def test_same_view_matching_pairs_each_cell_with_itself():
    views = vader.PairedViews(image_size=64, color=False, matching="same-view", num_matches=16)
    v1, v2, matches = views(coordinate_image(100, 80), random.Random(0))
    assert torch.equal(matches[:, 0], matches[:, 1])
    assert torch.allclose(v1, v2)  # no colour ops: identical crops give identical views


def test_unmatch_pairs_ignore_the_geometry():
    views = vader.PairedViews(image_size=64, color=False, matching="unmatch", num_matches=32)
    img = coordinate_image(256, 256)
    far = 0
    for seed in range(5):
        v1, v2, matches = views(img, random.Random(seed))
        d = (original_coordinates(v1, 16)[matches[:, 0]] - original_coordinates(v2, 16)[matches[:, 1]]).norm(dim=1)
        far += int((d > 30).sum())
    assert far > 80  # most of the 160 "positives" are far apart in the original image


def test_views_are_uint8_pixels_and_colour_ops_change_appearance_only():
    img = coordinate_image(64, 64)
    plain = vader.PairedViews(image_size=32, color=False, num_matches=4)(img, random.Random(7))
    coloured = vader.PairedViews(image_size=32, color=True, num_matches=4)(img, random.Random(7))
    assert plain[0].shape == (3, 32, 32) and plain[0].dtype == torch.uint8  # normalised later, on the device
    assert torch.equal(plain[2], coloured[2])  # same rng -> same geometry and matches
    assert not torch.equal(plain[0], coloured[0]) or not torch.equal(plain[1], coloured[1])


def test_loss_equals_a_naive_loop_over_eq2():
    torch.manual_seed(0)
    n, m, d, k, tau = 3, 4, 8, 10, 0.2
    q = torch.nn.functional.normalize(torch.randn(n * m, d), dim=1)
    key = torch.nn.functional.normalize(torch.randn(n * m, d), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(k, d), dim=1)
    for in_image in (False, True):
        total = 0.0
        for i in range(n * m):
            pos = math.exp(float(q[i] @ key[i]) / tau)
            neg = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(k))
            if in_image:
                img = i // m
                neg += sum(math.exp(float(q[i] @ key[j]) / tau) for j in range(img * m, img * m + m) if j != i)
            total += -math.log(pos / (pos + neg))
        got = vader.vader_loss(q, key, queue, tau, (n, m) if in_image else None)
        assert got.item() == pytest.approx(total / (n * m), rel=1e-5)


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
    assert run_script("vader.py", "--data", data, "--output-dir", b, "--max-steps", "2", *TINY).returncode == 0
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
import sys
import torch
sys.path.insert(0, sys.argv[1])
import common, vader
d = common.init_distributed()
torch.manual_seed(0)  # the same network and batch on both ranks
g = vader.VADeRNet("resnet18").eval()  # eval BN: shuffling must not change any key
images, cells = torch.randn(8, 3, 64, 64), torch.randint(0, 256, (8, 5))
mine = slice(4 * d.rank, 4 * d.rank + 4)
torch.manual_seed(100 + d.rank)  # different local RNGs: the permutation must come from rank 0
with torch.no_grad():
    keys = vader.key_embeddings(g, images[mine], cells[mine])
    expected = vader.gather_cells(g(images[mine]), cells[mine])
assert keys.shape == (4, 5, 128)
assert torch.allclose(keys, expected, atol=1e-5), (keys - expected).abs().max()
queue = vader.PixelQueue(16, 2)
queue.enqueue(torch.full((4, 2), float(d.rank)))
assert queue.keys[:4].eq(0).all() and queue.keys[4:8].eq(1).all() and int(queue.ptr) == 8
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
