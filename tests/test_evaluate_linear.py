"""Tests of evaluate_linear.py: metrics against hand counts, the data set readers, every weights kind, the Detectron2
export, label subsets, bad inputs, and short end-to-end runs (probe, fine-tuning, torchrun) on tiny folders."""
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import common
import evaluate_linear as E
from vader import VADeRNet

COLOURS = {0: (30, 30, 200), 1: (200, 30, 30), 2: (30, 200, 30)}  # class -> RGB: separable by colour alone
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)


def block_image(rng, size=64, grid=2):
    """An image of grid x grid blocks of class colours (with a little noise), its class map, 255 on the seams."""
    classes = rng.integers(0, 3, (grid, grid))
    label = np.kron(classes, np.ones((size // grid, size // grid), dtype=np.int64)).astype(np.uint8)
    rgb = np.array([COLOURS[c] for c in range(3)], dtype=np.float64)[label]
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    for k in range(1, grid):  # void seams (VOC marks object borders so), 8 pixels: two cells of the 1/4 feature map
        label[k * size // grid - 4:k * size // grid + 4, :] = 255
        label[:, k * size // grid - 4:k * size // grid + 4] = 255
    return Image.fromarray(rgb), label


def make_voc(root, n_train=8, n_val=4, seed=0, split_files=("train", "val")):
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    names = {"train": [f"2007_{i:06d}" for i in range(n_train)], "val": [f"2008_{i:06d}" for i in range(n_val)]}
    for split, ids in names.items():
        for name in ids:
            image, label = block_image(rng)
            image.save(os.path.join(root, "JPEGImages", f"{name}.jpg"), quality=95)
            png = Image.fromarray(label, mode="P")
            png.putpalette(PALETTE)
            png.save(os.path.join(root, "SegmentationClass", f"{name}.png"))
        if split in split_files:
            with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
                f.write("\n".join(ids) + "\n")
    return names


def make_nyu(root, n_train=8, n_val=4, seed=0):
    """Depth fixed by colour: class 0 -> 3 m, 1 -> 1 m, 2 -> 2 m; 16-bit millimetre PNGs, 0 at the seams."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "rgb"), exist_ok=True)
    os.makedirs(os.path.join(root, "depth"), exist_ok=True)
    names = [f"{i + 1:05d}" for i in range(n_train + n_val)]
    depths = {}
    for name in names:
        image, label = block_image(rng)
        depth_mm = np.choose(np.minimum(label, 3), [3000, 1000, 2000, 0]).astype(np.uint16)  # 255 -> 0 (missing)
        image.save(os.path.join(root, "rgb", f"{name}.png"))
        Image.fromarray(depth_mm).save(os.path.join(root, "depth", f"{name}.png"))
        depths[name] = depth_mm
    with open(os.path.join(root, "train.txt"), "w") as f:
        f.write("\n".join(names[:n_train]) + "\n")
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("\n".join(names[n_train:]) + "\n")
    return depths


def colour_keeping_weights(path):
    """A torchvision ResNet-18 file with zero-initialised residual branches (torchvision's zero_init_residual): every
    block starts as an identity, so the features are local functions of the colour and a linear probe can read it."""
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(zero_init_residual=True).state_dict(), path)
    return path


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return json.load(f)


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


# ---- metrics against hand counts ----
def test_miou_and_pixel_accuracy_match_a_hand_count():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, (2, 9, 7))
    gt[0, :2] = 255  # ignored pixels
    pred = rng.integers(0, 5, (2, 9, 7))  # class 4 is predicted but never in the ground truth
    pred[gt == 1] = 1  # make class 1 mostly right
    num_classes = 6  # class 5 never occurs at all: it must not count in the mean
    ious, correct, counted = [], 0, 0
    for c in range(num_classes):
        tp = fp = fn = 0
        for g, p in zip(gt.flatten(), pred.flatten()):
            if g == 255:
                continue
            tp += g == c and p == c
            fp += g != c and p == c
            fn += g == c and p != c
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    for g, p in zip(gt.flatten(), pred.flatten()):
        if g != 255:
            counted += 1
            correct += g == p
    conf = E.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), num_classes)
    scores = E.segmentation_scores(conf)
    assert scores["miou"] == pytest.approx(sum(ious) / len(ious))
    assert scores["pixel_acc"] == pytest.approx(correct / counted)
    assert scores["per_class_iou"][5] is None and len(ious) == 5
    assert int(conf.sum()) == counted


def test_depth_errors_match_naive_loops():
    gt = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 2.5]])  # 0 = no measurement
    pred = torch.tensor([[1.1, 1.0, 7.0], [5.5, 3.0, -1.0]])  # -1 is clamped to 1e-3 m
    sq, rel, good, n = 0.0, 0.0, 0, 0
    for p, g in zip(pred.flatten().tolist(), gt.flatten().tolist()):
        if g > 0:
            p = min(max(p, 1e-3), 10.0)
            sq += (p - g) ** 2
            rel += abs(p - g) / g
            good += max(p / g, g / p) < 1.25
            n += 1
    rmse, abs_rel, delta1 = E.depth_image_errors(pred, gt)
    assert rmse == pytest.approx(math.sqrt(sq / n))
    assert abs_rel == pytest.approx(rel / n)
    assert delta1 == pytest.approx(good / n) and n == 4 and good == 1
    assert E.depth_image_errors(pred, torch.zeros_like(gt)) is None


# ---- data sets ----
def test_synthetic_classes_show_in_texture_and_in_an_overlapping_palette():
    """Each textured class's pixels have hues within HUE_SPREAD of the class centre (pixels are painted without
    anti-aliasing, so each is one of the shape's two colours plus sensor noise); neighbouring palettes overlap, so
    hue alone cannot name every class; the background is class 0 and every class occurs."""
    leaves = common.DeadLeaves(size=96, seed=3)
    spread, k = common.DeadLeaves.HUE_SPREAD, leaves.num_classes
    hues = {c: [] for c in range(k + 1)}
    for i in range(12):
        image, classes, _ = leaves.image(i)
        rgb = np.asarray(image, dtype=np.float64) / 255
        hi, lo = rgb.max(-1), rgb.min(-1)
        saturated = (hi - lo) > 0.15  # hue is ill-defined for nearly grey pixels
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        hue = (np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b) / (2 * np.pi)) % 1.0  # the HSV hue, up to 1%
        for c in range(k + 1):
            hues[c].append(hue[(classes == c) & saturated])
    assert all(np.concatenate(hues[c]).size > 100 for c in range(k + 1))
    for c in range(2, k + 1):  # class 1 ("flat") paints the average of its two colours, whose hue may drift
        centre = (c - 1) / k
        distance = np.abs((np.concatenate(hues[c]) - centre + 0.5) % 1.0 - 0.5)
        assert np.quantile(distance, 0.99) < spread + 0.05, c
        assert np.quantile(distance, 0.9) > 1 / (2 * k), c  # reaches past halfway to the neighbouring centres


def test_voc_reader_gives_palette_indices_and_falls_back_to_train(tmp_path):
    names = make_voc(str(tmp_path))
    train = E.VOCSegmentation(str(tmp_path), "train")
    image, label = train.read(3)
    written = np.array(Image.open(tmp_path / "SegmentationClass" / f"{names['train'][3]}.png"))
    assert image.size == (64, 64) and label.dtype == np.uint8
    assert np.array_equal(label, written) and set(np.unique(label)) <= {0, 1, 2, 255}


def test_nyu_reader_returns_metres(tmp_path):
    depths = make_nyu(str(tmp_path))
    val = E.NYUDepth(str(tmp_path), "val")
    _, depth = val.read(0)
    assert len(val) == 4 and depth.dtype == np.float32
    assert np.allclose(depth, depths["00009"].astype(np.float64) / 1000)


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    for folder in ("leftImg8bit/train/aachen", "gtFine/train/aachen"):
        os.makedirs(tmp_path / folder)
    ids = np.array([[7, 8, 26, 33], [0, 1, 255, 24]], dtype=np.uint8)  # road, sidewalk, car, bicycle / void...
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / "leftImg8bit/train/aachen/a_1_leftImg8bit.png")
    Image.fromarray(ids).save(tmp_path / "gtFine/train/aachen/a_1_gtFine_labelIds.png")
    _, train_ids = E.CityscapesSegmentation(str(tmp_path), "train").read(0)
    assert train_ids.tolist() == [[0, 1, 13, 18], [255, 255, 255, 11]]


def test_label_subset_is_deterministic_by_seed_and_of_the_right_size():
    for n, fraction in ((1464, 0.02), (10582, 0.05), (795, 0.1), (7, 0.5), (3, 0.02)):
        a, b = E.label_subset(n, fraction, seed=3), E.label_subset(n, fraction, seed=3)
        assert a == b
        assert len(a) == max(1, round(fraction * n)) and len(set(a)) == len(a)
        assert all(0 <= i < n for i in a) and a == sorted(a)
    assert E.label_subset(1464, 0.1, seed=0) != E.label_subset(1464, 0.1, seed=1)
    assert E.label_subset(50, 1.0, seed=5) == list(range(50))


def test_shards_cover_every_index_with_equal_counts():
    """Every rank gets ceil(n / world) items, all n indices occur, and no index occurs more often than wrapping
    around the list needs (n = 1 on 4 ranks: the one image on each rank), even when n < world / 2."""
    for n in range(1, 12):
        for world in range(1, 9):
            indices = list(range(100, 100 + n))
            parts = [E.shard(indices, r, world) for r in range(world)]
            per_rank = -(-n // world)
            assert [len(p) for p in parts] == [per_rank] * world, (n, world)
            counts = {i: sum(p.count(i) for p in parts) for i in indices}
            assert set(sum(parts, [])) == set(indices)
            assert max(counts.values()) - min(counts.values()) <= 1, (n, world)
    assert [E.shard([0], r, 4) for r in range(4)] == [[0], [0], [0], [0]]


# ---- weights ----
def save_weights(tmp_path):
    """One file of each kind, all from the same resnet18 tensors: returns ({kind: path}, reference state)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    paths = {"torchvision": str(tmp_path / "resnet18.pth"), "moco": str(tmp_path / "moco.pth.tar"),
             "vader": str(tmp_path / "vader.pth")}
    torch.save(state, paths["torchvision"])
    moco = {f"module.encoder_q.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    moco.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512),
                 "module.encoder_q.fc.2.weight": torch.randn(128, 512),
                 "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7), "module.queue": torch.randn(128, 16)})
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": moco}, paths["moco"])
    vader = VADeRNet("resnet18")
    vader.encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    torch.save({"method": "vader", "model": vader.state_dict(), "args": {"arch": "resnet18", "embedding_dim": 128}},
               paths["vader"])
    return paths, state, vader.state_dict()


def test_every_weights_kind_loads_for_the_probe_and_for_fine_tuning(tmp_path):
    paths, state, vader_state = save_weights(tmp_path)
    for kind in ("torchvision", "moco"):
        probe, description = common.dense_feature_model(paths[kind], "resnet50", {"vader": VADeRNet})
        assert kind in description and torch.equal(probe.net.conv1.weight, state["conv1.weight"])
        assert torch.equal(probe.net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
        net, description = E.finetune_network(paths[kind], "resnet50", 21)
        assert torch.equal(net.body.encoder.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    probe, _ = common.dense_feature_model(paths["vader"], "resnet50", {"vader": VADeRNet})
    assert isinstance(probe, VADeRNet)
    assert torch.equal(probe.decoder.predictor.weight, vader_state["decoder.predictor.weight"])
    net, description = E.finetune_network(paths["vader"], "resnet50", 1)
    assert "FPN batch norms new" in description
    assert torch.equal(net.body.encoder.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.body.fpn.inner_blocks[2][0].weight, vader_state["fpn.inner_blocks.2.0.weight"])
    assert isinstance(net.body.fpn.inner_blocks[2][1], torch.nn.BatchNorm2d)
    assert torch.equal(net.body.decoder.levels[3][0].weight, vader_state["decoder.levels.3.0.weight"])
    net, description = E.finetune_network("random", "resnet18", 21)
    assert net.head.out_channels == 21 and "random" in description
    x = torch.randn(2, 3, 64, 64)
    assert net.eval()(x).shape == (2, 21, 16, 16)


def torchvision_res4(arch, state):
    """torchvision's `arch` with `state`, read as CRW and TimeCycle read res4: layer3's stride set to 1 (in the
    block's strided 3x3 convolution and its shortcut), layer4 never run."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.load_state_dict(state, strict=False)  # the probe's frozen features: batch norms in eval mode
    net.eval()
    block = net.layer3[0]
    (block.conv1 if arch in ("resnet18", "resnet34") else block.conv2).stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    return lambda x: net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))


def test_layer_res4_probes_torchvision_s_layer3_at_stride_8(tmp_path):
    paths, state, _ = save_weights(tmp_path)
    x = torch.randn(2, 3, 64, 96)
    for weights, arch in ((paths["torchvision"], "resnet18"), ("random", "resnet50")):
        args = E.get_parser().parse_args(["--weights", weights, "--arch", arch, "--layer", "res4"])
        model, description = E.frozen_backbone(args)
        model.eval()
        reference = torchvision_res4(arch, state if weights != "random" else model.net.state_dict())
        with torch.no_grad():
            out, expected = model(x), reference(x)
        assert "res4 at 1/8" in description
        assert out.shape == (2, 256 if arch == "resnet18" else 1024, 8, 12)
        assert torch.allclose(out, expected, atol=1e-5)
    args = E.get_parser().parse_args(["--weights", paths["torchvision"]])
    assert E.frozen_backbone(args)[0](x).shape == (2, 512, 16, 24)  # the default stays C5 dilated to 1/4


def torchvision_key(k):
    """Detectron2's name of a ResNet tensor back to torchvision's, the inverse of MoCo's renaming, by hand."""
    k = k.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    for t in (1, 2, 3):
        k = k.replace(f"conv{t}.norm", f"bn{t}")
    for t in (1, 2, 3, 4):
        k = k.replace(f"res{t + 1}", f"layer{t}")
    return k[len("stem."):] if k.startswith("stem.") else k


def test_detectron2_export_round_trips(tmp_path, run_script):
    paths, state, _ = save_weights(tmp_path)
    out = tmp_path / "d2" / "vader_r18.pkl"
    r = run_script("evaluate_linear.py", "--weights", paths["vader"], "--export-detectron2", out)
    assert r.returncode == 0, r.stderr
    assert last_json_line(r.stdout)["tensors"] == len([k for k in state if not k.startswith("fc.")])
    with open(out, "rb") as f:
        exported = pickle.load(f)
    assert exported["matching_heuristics"] is True and "__author__" in exported
    model = exported["model"]
    assert {"stem.conv1.weight", "res5.1.conv2.norm.running_var", "res3.0.shortcut.weight"} <= set(model)
    assert not any(k.startswith(("layer", "fc")) or ".bn" in k for k in model)
    for key, array in model.items():
        assert isinstance(array, np.ndarray)
        assert np.array_equal(array, state[torchvision_key(key)].numpy()), key


def test_torchvision_export_loads_strictly_into_torchvision_and_computes_the_checkpoint_s_encoder(tmp_path, capsys):
    paths, state, _ = save_weights(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    for kind in ("vader", "moco"):
        out = tmp_path / "tv" / f"{kind}_r18.pth"
        E.main(["--weights", paths[kind], "--export-torchvision", str(out)])
        assert last_json_line(capsys.readouterr().out)["arch"] == "resnet18"
        net = torchvision.models.resnet18()
        net.load_state_dict(torch.load(out), strict=True)
        assert net.fc.weight.shape == (1000, 512)  # torchvision's classifier, untrained (the methods train none)
        net.fc = torch.nn.Identity()
        checkpoint = torch.load(paths[kind], weights_only=False)
        if kind == "vader":
            vader = VADeRNet("resnet18")
            vader.load_state_dict(checkpoint["model"])
            encoder = vader.encoder
        else:
            encoder = common.resnet("resnet18")
            prefix = "module.encoder_q."
            encoder.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                                     if k.startswith(prefix) and not k.startswith(prefix + "fc.")})
        with torch.no_grad():
            assert torch.allclose(net.eval()(x), encoder.eval()(x), atol=1e-6)
    with pytest.raises(common.UserError, match="--export-torchvision needs --weights FILE"):
        E.main(["--export-torchvision", str(tmp_path / "x.pth")])


# ---- end-to-end runs ----
def test_probe_separates_colours_almost_perfectly_on_a_voc_folder(tmp_path, run_script):
    make_voc(str(tmp_path / "voc"), n_train=8, n_val=4)
    out = tmp_path / "run"
    r = run_script("evaluate_linear.py", "--dataset", "voc", "--data", tmp_path / "voc",
                   "--weights", colour_keeping_weights(tmp_path / "r18.pth"), "--image-size", "64", "--epochs", "25",
                   "--batch-size", "4", "--trials", "2", "--workers", "0", "--output-dir", out)
    assert r.returncode == 0, r.stderr
    result = metrics(out)
    assert last_json_line(r.stdout) == result
    assert result["train_images"] == 8 and result["val_images"] == 4 and len(result["per_trial"]) == 2
    assert result["probe_features"] == "cached"
    assert result["trials_differ_in"].startswith("probe initialisation (seed + t) only")
    assert result["mean"]["miou"] > 0.9 and result["mean"]["pixel_acc"] > 0.95
    assert "mean" in r.stdout and "std" in r.stdout  # the readable table comes first
    assert os.path.isfile(out / "log.jsonl")


def test_depth_probe_learns_colour_coded_depth_on_an_nyu_folder(tmp_path, run_script):
    make_nyu(str(tmp_path / "nyu"))
    out = tmp_path / "run"
    r = run_script("evaluate_linear.py", "--dataset", "nyu", "--data", tmp_path / "nyu",
                   "--weights", colour_keeping_weights(tmp_path / "r18.pth"), "--image-size", "64", "--epochs", "25",
                   "--batch-size", "4", "--trials", "1", "--workers", "0", "--output-dir", out)
    assert r.returncode == 0, r.stderr
    result = metrics(out)
    # depths are 1, 2 and 3 m in equal shares: predicting their mean would give RMSE ~0.8 m and delta1 ~1/3
    assert result["task"] == "depth" and result["mean"]["rmse"] < 0.4 and result["mean"]["delta1"] > 0.8
    assert set(result["mean"]) == {"rmse", "abs_rel", "delta1"}


def test_finetuning_with_a_label_fraction_runs_from_a_vader_checkpoint(tmp_path, run_script):
    make_voc(str(tmp_path / "voc"), n_train=8, n_val=2)
    paths, _, _ = save_weights(tmp_path)
    out = tmp_path / "run"
    r = run_script("evaluate_linear.py", "--dataset", "voc", "--data", tmp_path / "voc", "--weights", paths["vader"],
                   "--finetune", "--label-fraction", "0.5", "--image-size", "64", "--epochs", "1", "--batch-size", "2",
                   "--trials", "1", "--workers", "0", "--output-dir", out)
    assert r.returncode == 0, r.stderr
    result = metrics(out)
    assert result["mode"] == "finetune" and result["train_images"] == 4 and 0 <= result["mean"]["miou"] <= 1
    assert "encoder + FPN + decoder" in result["model"]


def test_a_set_smaller_than_the_batch_trains_with_the_whole_set_as_the_batch(tmp_path, capsys):
    """3 training images and --batch-size 16: one step per epoch on all 3, said in the output and in metrics.json;
    fine-tuning too. On 4 ranks each rank's share is padded to ceil(n / 4) images."""
    assert E.training_batch(102, 256, 1) == 102 and E.training_batch(102, 256, 4) == 26 * 4
    assert E.training_batch(5, 4, 1) == 4 and E.training_batch(1, 8, 4) == 4
    make_voc(str(tmp_path / "voc"), n_train=3, n_val=1)
    for mode in ([], ["--finetune"]):
        out = tmp_path / f"run{len(mode)}"
        E.main(["--dataset", "voc", "--data", str(tmp_path / "voc"), "--arch", "resnet18", "--image-size", "32",
                "--epochs", "2", "--batch-size", "16", "--trials", "1", "--workers", "0",
                "--output-dir", str(out)] + mode)
        assert "training on the whole set as the batch (3 images)" in capsys.readouterr().out
        result = metrics(out)
        assert result["batch_size"] == 3 and result["train_images"] == 3 and 0 <= result["mean"]["miou"] <= 1
        with open(out / "log.jsonl") as f:
            epochs = [json.loads(line) for line in f if '"epoch"' in line]
        assert [e["epoch"] for e in epochs] == [0, 1]


def test_probe_under_torchrun_with_two_ranks(tmp_path, run_script):
    make_voc(str(tmp_path / "voc"), n_train=6, n_val=3)
    out = tmp_path / "run"
    r = run_script("evaluate_linear.py", "--dataset", "voc", "--data", tmp_path / "voc", "--arch", "resnet18",
                   "--image-size", "64", "--epochs", "2", "--batch-size", "4", "--trials", "1", "--workers", "0",
                   "--output-dir", out, torchrun=2)
    assert r.returncode == 0, r.stderr
    result = metrics(out)
    assert result["val_images"] == 3 and 0 <= result["mean"]["miou"] <= 1
    assert r.stdout.count('"mode": "probe"') == 1  # only rank 0 prints the result


# ---- bad inputs: one line on stderr, non-zero exit ----
def assert_one_line_error(r, *words):
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0]


def test_missing_split_file_is_a_one_line_error(tmp_path, run_script):
    make_voc(str(tmp_path / "voc"), split_files=("train",))
    r = run_script("evaluate_linear.py", "--dataset", "voc", "--data", tmp_path / "voc", "--workers", "0",
                   "--output-dir", tmp_path / "run")
    assert_one_line_error(r, "val.txt", "split file")


def test_image_label_size_mismatch_is_a_one_line_error(tmp_path, run_script):
    names = make_voc(str(tmp_path / "voc"))
    odd_label = tmp_path / "voc" / "SegmentationClass" / f"{names['val'][1]}.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(odd_label)
    r = run_script("evaluate_linear.py", "--dataset", "voc", "--data", tmp_path / "voc", "--workers", "0",
                   "--output-dir", tmp_path / "run")
    assert_one_line_error(r, names["val"][1], "64x64", "12x10")


def test_an_rgb_label_png_is_a_one_line_error_naming_it_also_with_loader_workers(tmp_path):
    """Colour-coded labels are refused when the pairs are checked (headers only), in the main process, before any
    loader worker starts: a worker's error would arrive as its traceback."""
    names = make_voc(str(tmp_path / "voc"), n_train=4, n_val=2)
    rgb_label = tmp_path / "voc" / "SegmentationClass" / f"{names['train'][2]}.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(rgb_label)
    with pytest.raises(common.UserError) as error:
        E.main(["--dataset", "voc", "--data", str(tmp_path / "voc"), "--arch", "resnet18", "--image-size", "32",
                "--epochs", "1", "--batch-size", "2", "--trials", "1", "--workers", "2",
                "--output-dir", str(tmp_path / "run")])
    message = str(error.value)
    assert "\n" not in message and str(rgb_label) in message and "mode RGB" in message


def test_unknown_weights_are_a_one_line_error(tmp_path, run_script):
    make_voc(str(tmp_path / "voc"))
    torch.save({"encoder": {"w": torch.zeros(1)}}, tmp_path / "odd.pth")
    r = run_script("evaluate_linear.py", "--dataset", "voc", "--data", tmp_path / "voc", "--weights",
                   tmp_path / "odd.pth", "--workers", "0", "--image-size", "64", "--output-dir", tmp_path / "run")
    assert_one_line_error(r, "odd.pth", "not a known weights file")
    r = run_script("evaluate_linear.py", "--weights", tmp_path / "odd.pth", "--export-detectron2", tmp_path / "x.pkl")
    assert_one_line_error(r, "odd.pth")


# ---- the probe's protocol: one backbone pass per batch, the same cached or recomputed ----
class CountingBackbone(torch.nn.Module):
    """A frozen stand-in for a ResNet: a fixed 4x4 stride-4 convolution (8 channels at 1/4) that counts the images
    it has seen."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return self.conv(x)


def probe_args(**changes):
    args = E.get_parser().parse_args([])
    args.__dict__.update(dict(epochs=2, lr=0.1, batch_size=4, image_size=32, workers=0, precision="fp32"), **changes)
    return args


def train_tiny_probes(tmp_path, trials, fraction=1.0, images=8, **changes):
    train_set = E.SyntheticSegmentation(images, 32, seed=0)
    args = probe_args(trials=trials, **changes)
    subset = E.label_subset(len(train_set), fraction, args.seed)
    backbone = CountingBackbone().requires_grad_(False)
    log = common.JsonLog(tmp_path / "l", False)
    heads, path, _ = E.train_probes(backbone, train_set, subset, args, common.Dist(), log)
    return heads, path, backbone.images


def test_one_backbone_pass_per_batch_feeds_every_trial_without_a_cache(tmp_path):
    """--cache-gb 0 trains, and 3 trials see the backbone as often as 1: 8 images in batches of 4 = 2 steps; the
    statistics over all 8 images, then 2 epochs x 2 steps = 6 batches (and one image to learn the feature shape)."""
    heads1, path, images1 = train_tiny_probes(tmp_path, trials=1, cache_gb=0)
    heads3, _, images3 = train_tiny_probes(tmp_path, trials=3, cache_gb=0)
    assert path == "recomputed" and len(heads3) == 3
    assert images1 == images3 == 6 * 4 + 1
    # the trials differ in their initialisation, not in their batches: trial 0 of three is the single trial
    assert torch.allclose(heads3[0].conv.weight, heads1[0].conv.weight, atol=1e-6)
    assert not torch.allclose(heads3[0].conv.weight, heads3[1].conv.weight, atol=1e-3)


def test_cached_and_recomputed_features_train_the_same_probes(tmp_path):
    """The cache is a speed-up only: 3 trials, 16 images in batches of 2 for 3 epochs (24 batches), give the same
    probes (statistics, weights, biases) whether the features are cached or recomputed, to float tolerance; at
    --label-fraction 0.5 too."""
    for fraction in (1.0, 0.5):
        changes = dict(trials=3, fraction=fraction, images=16, batch_size=2, epochs=3 if fraction == 1 else 6)
        cached, path, _ = train_tiny_probes(tmp_path, cache_gb=16, **changes)
        recomputed, other, _ = train_tiny_probes(tmp_path, cache_gb=0, **changes)
        assert (path, other) == ("cached", "recomputed")
        for a, b in zip(cached, recomputed):
            assert torch.allclose(a.mean, b.mean, atol=1e-6) and torch.allclose(a.std, b.std, atol=1e-6)
            assert torch.allclose(a.conv.weight, b.conv.weight, atol=1e-5), fraction
            assert torch.allclose(a.conv.bias, b.conv.bias, atol=1e-5), fraction


def test_a_tiny_cache_budget_gives_the_cached_runs_metrics(tmp_path):
    """Through main(), on the embedded set: 2 trials, 16 training images in batches of 2 for 3 epochs (24 batches),
    a random ResNet-18; --cache-gb 0 forces the recomputed path and reports the same scores per trial."""
    results = {}
    for cache_gb in ("16", "0"):
        out = tmp_path / f"run{cache_gb}"
        E.main(["--image-size", "32", "--epochs", "3", "--batch-size", "2", "--trials", "2", "--synthetic-train",
                "16", "--synthetic-val", "4", "--cache-gb", cache_gb, "--output-dir", str(out)])
        results[cache_gb] = metrics(out)
    assert [r["probe_features"] for r in results.values()] == ["cached", "recomputed"]
    assert results["16"]["precision"] == "fp32"  # MoCo's and DINO's evaluation precision, by default
    for a, b in zip(results["16"]["per_trial"], results["0"]["per_trial"]):
        assert a["miou"] == pytest.approx(b["miou"], abs=1e-6) and a["pixel_acc"] == pytest.approx(b["pixel_acc"],
                                                                                                   abs=1e-6)


def test_trials_share_the_subset_and_the_batches_and_the_cache_sees_each_image_once(tmp_path):
    """Below --label-fraction 1 the trials train on the same subset (that of --seed): the backbone sees each of its
    images once to fill the cache (and one to learn the feature shape), and, recomputed, one batch per step."""
    subset = E.label_subset(8, 0.5, 0)
    heads, path, images = train_tiny_probes(tmp_path, trials=3, fraction=0.5, cache_gb=16)
    assert path == "cached" and images == len(subset) + 1
    _, path, images = train_tiny_probes(tmp_path, trials=3, fraction=0.5, cache_gb=0, batch_size=2)
    assert path == "recomputed" and images == len(subset) + 2 * 2 * 2 + 1  # statistics, 2 epochs x 2 steps of 2
    assert not torch.allclose(heads[1].conv.weight, heads[2].conv.weight, atol=1e-3)


def test_fp16_probe_gradients_underflow_without_loss_scaling_and_sgd_step_scales_them(tmp_path):
    """A probe's loss is a mean over N x h x w = 50,000 pixels: its per-logit gradients (~2e-5 for the labelled
    class, ~1e-6 for the others) all lie below fp16's smallest normal number, so fp16 keeps a few bits of them or
    none. One sgd_step under fp16 autocast (CPU autocast stands in for a GPU's, the CPU GradScaler for
    common.grad_scaler's) moves the weights as fp32 does when it goes through the scaler, and not without it."""
    torch.manual_seed(0)
    features, labels = torch.randn(2, 16, 158, 158), torch.randint(0, 21, (2, 158, 158))
    logits = torch.zeros(2, 21, 158, 158, requires_grad=True)
    E.task_loss(logits, labels, "segmentation").backward()
    tiny = torch.finfo(torch.float16).tiny  # 6.1e-5
    assert logits.grad.abs().max() < tiny and logits.grad.abs().max() > 1e-5
    assert (logits.grad.abs() * 2.0 ** 16 >= tiny).all()  # scaled by GradScaler's initial 2^16 they are normal

    def one_step(fp16, scaler):
        torch.manual_seed(1)
        head = E.LinearProbe(16, 21, torch.zeros(16), torch.ones(16))
        before = head.conv.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = E.task_loss(head(features), labels, "segmentation")
        E.sgd_step(torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9), scaler, loss)
        return head.conv.weight.detach() - before

    reference = one_step(False, torch.amp.GradScaler("cpu", enabled=False))
    scaled = one_step(True, torch.amp.GradScaler("cpu"))
    unscaled = one_step(True, torch.amp.GradScaler("cpu", enabled=False))

    def error(update):
        return float((update - reference).norm() / reference.norm())

    assert error(scaled) < 1e-3 and error(unscaled) > 5 * error(scaled), (error(scaled), error(unscaled))


def test_labels_are_cached_as_uint8_and_counted_in_the_cache_budget(tmp_path):
    """8 images: fp32 features 8 x (8 ch x 8 x 8) x 4 bytes = 16 KiB, labels 8 x 32 x 32 x 1 byte = 8 KiB. A 20 KB
    budget holds the features alone but not features and labels."""
    _, label, _ = E.Samples(E.SyntheticSegmentation(1, 32, seed=0), [0], (32, 32))[0]
    assert label.dtype == torch.uint8 and label.shape == (32, 32)
    _, native, _ = E.Samples(E.SyntheticSegmentation(1, 40, seed=0), [0], (32, 32), native_labels=True)[0]
    assert native.dtype == torch.uint8 and native.shape == (40, 40)  # validation labels travel as uint8 too
    _, path, _ = train_tiny_probes(tmp_path, trials=1, cache_gb=20e-6)
    assert path == "recomputed"
    _, path, _ = train_tiny_probes(tmp_path, trials=1, cache_gb=25e-6)
    assert path == "cached"
    samples = E.Samples(E.SyntheticSegmentation(4, 32, seed=0), range(4), (32, 32))
    features = E.ProbeFeatures(CountingBackbone(), samples, 4, probe_args(), common.Dist())
    assert features.labels.dtype == torch.uint8 and features.labels.shape == (4, 32, 32)
    assert features.features.dtype == torch.float32  # the backbone's output dtype, as recomputed


def test_images_travel_as_uint8_and_are_normalised_on_the_device_as_before():
    """Loader batches hold uint8 images (a quarter of float32's bytes over the bus); common.normalize on the device
    gives what the ImageNet-normalised float tensor of the same resized image was."""
    mean, std = torch.tensor(common.IMAGENET_MEAN)[:, None, None], torch.tensor(common.IMAGENET_STD)[:, None, None]
    for source, shape in ((E.SyntheticSegmentation(2, 40, seed=0), (32, 32)),
                          (E.SyntheticClassification(2, 40, seed=0), (32, 32))):
        images, _, _ = next(iter(E.loader(E.Samples(source, [0, 1], shape), 2, 0, torch.device("cpu"))))
        assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
        image = source.read(1)[0]
        image = E.centre_crop(image, 32) if source.task == "classification" else image.resize((32, 32), Image.BILINEAR)
        expected = (torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255 - mean) / std
        assert torch.allclose(common.normalize(images, torch.device("cpu"))[1], expected, atol=1e-5)


class CoordinateLabels:
    """A 'data set' of one image whose labels encode their own coordinates: depth = 1000 y + x (float32, exact),
    class id = (x + 3 y) % 256 (uint8)."""

    aspect = 70 / 50

    def __init__(self, task):
        self.task = task

    def read(self, index):
        y, x = np.mgrid[0:50, 0:70]
        label = (1000 * y + x).astype(np.float32) if self.task == "depth" else ((x + 3 * y) % 256).astype(np.uint8)
        return Image.new("RGB", (70, 50)), label


def test_training_labels_are_resampled_by_pixel_centres():
    """Output pixel (i, j) of a 50 x 70 -> 32 x 64 resampling takes the source pixel under its centre: row
    floor((i + 0.5) 50 / 32), column floor((j + 0.5) 70 / 64) (PIL samples the image so too)."""
    for task in ("depth", "segmentation"):
        _, label, _ = E.Samples(CoordinateLabels(task), [0], (32, 64))[0]
        assert label.shape == (32, 64) and label.dtype == (torch.float32 if task == "depth" else torch.uint8)
        for i in range(32):
            for j in range(64):
                y, x = math.floor((i + 0.5) * 50 / 32), math.floor((j + 0.5) * 70 / 64)
                assert label[i, j] == (1000 * y + x if task == "depth" else (x + 3 * y) % 256), (task, i, j)


def test_probe_without_a_cache_runs_end_to_end(tmp_path):
    """A probe without a feature cache (--cache-gb 0), at toy size, through main()."""
    make_voc(str(tmp_path / "voc"), n_train=4, n_val=2)
    out = tmp_path / "run"
    E.main(["--dataset", "voc", "--data", str(tmp_path / "voc"), "--arch", "resnet18", "--image-size", "32",
            "--epochs", "1", "--batch-size", "2", "--trials", "2", "--workers", "0", "--cache-gb", "0",
            "--output-dir", str(out)])
    result = metrics(out)
    assert result["probe_features"] == "recomputed" and len(result["per_trial"]) == 2
    assert result["trials_differ_in"].startswith("probe initialisation (seed + t) only")


# ---- NYU-depth v2 as the literature scores it ----
def test_depth_scores_use_the_eigen_crop_and_the_depth_range():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 12.0, (480, 640))
    gt[rng.random(gt.shape) < 0.1] = 0.0  # no measurement
    pred = rng.uniform(-1.0, 12.0, (480, 640))
    for crop in (True, False):
        keep = np.zeros((480, 640), bool)
        if crop:
            keep[45:471, 41:601] = True
        else:
            keep[:] = True
        keep &= (gt > 1e-3) & (gt < 10)
        p, g = np.clip(pred[keep], 1e-3, 10), gt[keep]
        expected = (np.sqrt(np.mean((p - g) ** 2)), np.mean(np.abs(p - g) / g),
                    np.mean(np.maximum(p / g, g / p) < 1.25))
        got = E.depth_image_errors(torch.from_numpy(pred).float(), torch.from_numpy(gt).float(), crop=crop)
        assert np.allclose(got, expected, rtol=1e-5), crop
    assert E.eigen_crop_mask((480, 640)).sum() == (471 - 45) * (601 - 41)


def test_depth_run_records_its_protocol_and_writes_null_when_nothing_is_scored(tmp_path):
    """--depth-crop none is recorded in metrics.json; validation depths that are all missing give null, not NaN."""
    make_nyu(str(tmp_path / "nyu"), n_train=4, n_val=2)
    for name in ("00005", "00006"):
        Image.fromarray(np.zeros((64, 64), np.uint16)).save(tmp_path / "nyu" / "depth" / f"{name}.png")
    out = tmp_path / "run"
    E.main(["--dataset", "nyu", "--data", str(tmp_path / "nyu"), "--arch", "resnet18", "--image-size", "32",
            "--epochs", "1", "--batch-size", "2", "--trials", "2", "--workers", "0", "--depth-crop", "none",
            "--output-dir", str(out)])

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(out / "metrics.json") as f:
        result = json.loads(f.read(), parse_constant=refuse)
    assert result["depth_eval"] == {"crop": None, "crop_of": None, "range_m": [1e-3, 10.0]}
    assert result["mean"]["rmse"] is None and result["per_trial"][1]["delta1"] is None


def test_finite_or_none_replaces_every_nan_and_infinity():
    value = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": 2, "e": None}
    assert common.finite_or_none(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": 2, "e": None}


# ---- what users will give ----
@pytest.mark.parametrize("flags, words", [
    (["--image-size", "0"], ["--image-size 0", "multiple of 32"]),
    (["--image-size", "48"], ["--image-size 48"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--epochs", "0"], ["--epochs 0"]),
    (["--label-fraction", "0"], ["--label-fraction 0"]),
    (["--weights", "no/such/file.pth", "--image-size", "0"], ["--weights no/such/file.pth", "no such file"]),
    (["--weights", "no/such/file.pth", "--export-detectron2", "x.pkl"], ["--weights no/such/file.pth"]),
    (["--data", "no/such/folder", "--dataset", "voc"], ["--data no/such/folder"]),
    (["--dataset", "imagefolder", "--finetune"], ["--finetune"]),
    (["--finetune", "--layer", "res4"], ["--layer res4"]),
    (["--output-dir", "/dev/null/run", "--epochs", "1"], ["--output-dir /dev/null/run"]),
])
def test_bad_flags_fail_before_any_work(flags, words, capsys, tmp_path):
    with pytest.raises(common.UserError) as error:
        E.main(["--output-dir", str(tmp_path / "run")] + flags)
    assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "run")  # nothing printed or written
    for word in words:
        assert word in str(error.value) and "\n" not in str(error.value)


def test_vader_checkpoint_with_another_embedding_dim_is_probed_and_fine_tuned(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vader32.pth"
    torch.save({"method": "vader", "model": VADeRNet("resnet18", 32).state_dict(),
                "args": {"arch": "resnet18", "embedding_dim": 32}}, path)
    make_voc(str(tmp_path / "voc"), n_train=2, n_val=1)
    for mode in ([], ["--finetune"]):
        out = tmp_path / f"run{len(mode)}"
        E.main(["--dataset", "voc", "--data", str(tmp_path / "voc"), "--weights", str(path), "--image-size", "32",
                "--epochs", "1", "--batch-size", "2", "--trials", "1", "--workers", "0",
                "--output-dir", str(out)] + mode)
        assert 0 <= metrics(out)["mean"]["miou"] <= 1
    net, _ = E.finetune_network(str(path), "resnet50", 21)
    assert net.head.in_channels == 32


# ---- Detectron2 export ----
def test_detectron2_key_renaming_is_moco_s():
    """MoCo's convert-pretrain-to-detectron2.py, by hand: stem, resN+1, convK.norm, shortcut(.norm)."""
    pairs = {"conv1.weight": "stem.conv1.weight", "bn1.running_mean": "stem.conv1.norm.running_mean",
             "layer1.0.conv3.weight": "res2.0.conv3.weight", "layer1.0.bn3.bias": "res2.0.conv3.norm.bias",
             "layer3.5.bn2.num_batches_tracked": "res4.5.conv2.norm.num_batches_tracked",
             "layer4.0.downsample.0.weight": "res5.0.shortcut.weight",
             "layer2.0.downsample.1.running_var": "res3.0.shortcut.norm.running_var"}
    state = {k: torch.full((2,), float(i)) for i, k in enumerate(pairs)}
    state["fc.weight"] = torch.zeros(2)
    exported = E.to_detectron2(state)["model"]
    assert set(exported) == set(pairs.values())
    for k, v in pairs.items():
        assert np.array_equal(exported[v], state[k].numpy()) and torchvision_key(v) == k
    assert not hasattr(common, "to_detectron2")


# ---- pooled classification ----
def test_topk_accuracy_matches_a_naive_ranking():
    rng = np.random.default_rng(0)
    for k_classes in (7, 3):
        logits, target = rng.normal(size=(50, k_classes)), rng.integers(0, k_classes, 50)
        hits = [0, 0]
        for row, t in zip(logits, target):
            rank = sorted(range(k_classes), key=lambda c: -row[c]).index(t)  # 0 = the highest score
            hits[0] += rank < 1
            hits[1] += rank < 5
        assert E.topk_correct(torch.from_numpy(logits), torch.from_numpy(target)) == hits


def test_classification_scores_of_evaluate_match_an_independent_count():
    """evaluate() over two batches and two heads: top-1/top-5 against logits computed by hand."""
    torch.manual_seed(0)
    heads = [E.LinearProbe(4, 6, torch.zeros(4), torch.ones(4)) for _ in range(2)]
    for head in heads:
        torch.nn.init.normal_(head.conv.weight)
    batches = [(torch.randn(5, 4, 1, 1), list(torch.randint(0, 6, (5,))), None) for _ in range(2)]
    scores = E.evaluate(lambda x: x, heads, batches, "classification", 6, common.Dist(), "fp32")
    for head, score in zip(heads, scores):
        top1 = top5 = 0
        for features, labels, _ in batches:
            for f, y in zip(features, labels):
                logits = (head.conv.weight[:, :, 0, 0] @ f[:, 0, 0] + head.conv.bias).tolist()
                order = sorted(range(6), key=lambda c: -logits[c])
                top1 += order[0] == int(y)
                top5 += int(y) in order[:5]
        assert score["top1"] == pytest.approx(top1 / 10) and score["top5"] == pytest.approx(top5 / 10)


def test_embedded_classification_label_is_the_class_of_the_largest_object():
    data = E.SyntheticClassification(12, 64, seed=0)
    for i in range(12):
        image, label = data.read(i)
        _, cls, classes, instances = E.object_image(data.leaves, i)
        assert label == cls == i % 6 and image.size == (64, 64)
        ids, areas = np.unique(instances[instances > 0], return_counts=True)
        largest = ids[np.argmax(areas)]
        assert largest == instances.max()  # the object, painted last, is the largest visible shape
        assert areas.max() >= 0.1 * 64 * 64 and np.all(classes[instances == largest] == cls + 1)


def make_class_folder(root, per_class=(4, 2), broken=False):
    """DIR/{train,val}/<class>/*.png: classes red, green, blue (plain colours with noise); one odd file that is no
    image, which the reader must skip; with `broken`, one file in each split that is named as an image but cannot be
    decoded (a truncated PNG in train, text in val). Returns the broken files."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder)
            for i in range(n):
                rgb = np.clip(np.array(colour) + rng.normal(0, 8, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(rgb).save(os.path.join(folder, f"{i}.png"))
    open(os.path.join(root, "train", "class_0", "notes.txt"), "w").close()
    if not broken:
        return []
    paths = [os.path.join(root, "train", "class_1", "x_truncated.png"), os.path.join(root, "val", "class_2", "x.jpg")]
    with open(os.path.join(root, "train", "class_1", "0.png"), "rb") as f:
        whole = f.read()
    with open(paths[0], "wb") as f:
        f.write(whole[:len(whole) // 2])
    with open(paths[1], "w") as f:
        f.write("not a JPEG")
    return paths


def test_imagefolder_classification_runs_end_to_end_skipping_unreadable_images_by_name(tmp_path, run_script):
    broken = make_class_folder(str(tmp_path / "data"), broken=True)
    out = tmp_path / "run"
    r = run_script("evaluate_linear.py", "--dataset", "imagefolder", "--data", tmp_path / "data", "--weights",
                   colour_keeping_weights(tmp_path / "r18.pth"), "--image-size", "32", "--epochs", "30",
                   "--batch-size", "4", "--trials", "2", "--workers", "0", "--output-dir", out,
                   env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    result = metrics(out)
    assert last_json_line(r.stdout) == result
    assert result["task"] == "classification" and result["train_images"] == 13 and result["val_images"] == 7
    warnings = r.stderr.split("warning: skipping unreadable image ")[1:]  # the progress bars share stderr's lines
    assert len(warnings) == 2 and all(any(w.startswith(path) for w in warnings) for path in broken), r.stderr
    assert "Traceback" not in r.stderr and result["unreadable_images"] == {"train": 1, "val": 1}
    assert result["classes"] == 3 and result["top5_k"] == 3 and len(result["per_trial"]) == 2
    assert result["mean"]["top1"] > 0.9 and result["mean"]["top5"] == 1.0
    assert set(result["std"]) == {"top1", "top5"}


def test_embedded_classification_set_runs_without_data(tmp_path):
    out = tmp_path / "run"
    E.main(["--dataset", "imagefolder", "--image-size", "32", "--synthetic-train", "12", "--synthetic-val", "6",
            "--epochs", "1", "--batch-size", "6", "--trials", "1", "--output-dir", str(out)])
    result = metrics(out)
    assert result["dataset"] == "synthetic-objects" and result["classes"] == 6 and result["val_images"] == 6


# ---- correspondence accuracy ----
class CoordinateFeatures(torch.nn.Module):
    """A 'model' whose features are the original-image position each cell sees: the test images' red and green
    channels are their pixels' x and y, pooled to the 1/4 grid and encoded as (cos, sin) of a low frequency per
    axis, so the cosine similarity of two cells, (cos w dx + cos w dy) / 2, falls with the distance along each axis."""

    def forward(self, x):  # x: N x 3 x S x S, ImageNet-normalised
        mean, std = torch.tensor(common.IMAGENET_MEAN), torch.tensor(common.IMAGENET_STD)
        pixels = (x * std[:, None, None] + mean[:, None, None]) * 255  # back to the 0..255 values
        xy = F.avg_pool2d(pixels[:, :2], 4)  # N x 2 x S/4 x S/4: the mean position each cell sees
        w = math.pi / 512
        return torch.cat([torch.cos(w * xy), torch.sin(w * xy)], 1)


class ConstantFeatures(torch.nn.Module):
    def forward(self, x):
        return torch.ones(len(x), 8, x.shape[-2] // 4, x.shape[-1] // 4)


def coordinate_image(path, size):
    """An image whose pixel (x, y) has red x and green y."""
    y, x = np.mgrid[0:size, 0:size]
    Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)).save(path)
    return str(path)


class PlainViews(E.PairedViews):
    """vader.py's views without colour ops: the pixels keep the coordinates they encode."""

    def appearance(self, rng):
        return common.draw_appearance(rng, p_jitter=0, p_gray=0, p_blur=0)


def score_pairs(model, pairs):
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, collate_fn=E.collate_pairs)
    return E.correspondence_scores(model, loader, 16, common.Dist(), "fp32")


def test_a_feature_map_of_its_own_coordinates_scores_100_percent_and_a_constant_one_chance(tmp_path):
    """Views of the whole 64 px image (flipped or not, no colour ops) have coinciding grids: the cell that sees the
    same position is the true match. Constant features tie everywhere; argmax takes view 2's first cell, so top1 is
    the share of matches that are cell 0 (about 1 / 256), and within_one the share within one cell of it."""
    files = [coordinate_image(tmp_path / "xy.png", 64)] * 12
    views = PlainViews(64, 32, scale=(1.0, 1.0))
    pairs = E.CorrespondencePairs(views, seed=0, files=files)
    scores = score_pairs(CoordinateFeatures(), pairs)
    assert scores["top1"] == 1.0 and scores["within_one"] == 1.0 and scores["queries"] == 12 * 32
    flips = [bool((pairs[i][2][:, 0] != pairs[i][2][:, 1]).any()) for i in range(12)]
    assert any(flips) and not all(flips)  # both mirrored and unmirrored pairs occur
    true = torch.cat([pairs[i][2][:, 1] for i in range(12)]).tolist()
    constant = score_pairs(ConstantFeatures(), pairs)
    assert constant["top1"] == sum(c == 0 for c in true) / len(true)
    assert constant["within_one"] == sum(c // 16 <= 1 and c % 16 <= 1 for c in true) / len(true)
    assert constant["chance"]["top1"] == 1 / 256
    neighbours = [sum(max(abs(c // 16 - r), abs(c % 16 - k)) <= 1 for r in range(16) for k in range(16)) for c in true]
    assert constant["chance"]["within_one"] == pytest.approx(sum(neighbours) / 256 / len(true))


def test_coordinate_features_find_their_match_within_one_cell_under_random_crops(tmp_path):
    """Training's crops (20-100% of the area, any aspect in 3/4..4/3): a view-2 cell whose centre is nearest the
    view-1 cell's centre is its match or a neighbour (ties at cell borders and uint8 rounding decide which)."""
    pairs = E.CorrespondencePairs(PlainViews(64, 32), seed=0,
                                  files=[coordinate_image(tmp_path / "xy.png", 160)] * 12)
    scores = score_pairs(CoordinateFeatures(), pairs)
    assert scores["within_one"] == 1.0 and scores["top1"] > 0.9  # 0.95 at seeds 0-2 on 50 pairs


def test_correspondence_runs_for_any_weights_on_embedded_images_and_on_a_folder(tmp_path, capsys):
    paths, _, _ = save_weights(tmp_path)
    for weights in ("random", paths["vader"]):
        E.main(["--dataset", "correspondence", "--weights", weights, "--synthetic-val", "4", "--batch-size", "4",
                "--output-dir", str(tmp_path / "run")])
        result = last_json_line(capsys.readouterr().out)
        assert result == metrics(tmp_path / "run") and result["grid"] == 16 and result["queries"] == 4 * 32
        assert 0 <= result["top1"] <= result["within_one"] <= 1 and set(result["chance"]) == {"top1", "within_one"}
    os.makedirs(tmp_path / "photos" / "val" / "a")
    for i in range(3):
        coordinate_image(tmp_path / "photos" / "val" / "a" / f"{i}.png", 80)
    with open(tmp_path / "photos" / "val" / "a" / "broken.jpg", "w") as f:
        f.write("not a JPEG")
    E.main(["--dataset", "correspondence", "--data", str(tmp_path / "photos"), "--arch", "resnet18",
            "--image-size", "32", "--batch-size", "2", "--workers", "0", "--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    result = last_json_line(captured.out)
    assert result["pairs"] == 3 and result["unreadable"] == 1 and result["grid"] == 8
    assert captured.err.count("skipping unreadable image") == 1 and "broken.jpg" in captured.err
    with pytest.raises(common.UserError, match="--layer res4 is at 1/8") as error:
        E.main(["--dataset", "correspondence", "--layer", "res4", "--output-dir", str(tmp_path / "run")])
    assert "\n" not in str(error.value) and capsys.readouterr().out == ""


def test_features_off_the_grid_of_the_matches_are_a_one_line_error(tmp_path, monkeypatch):
    """A model whose output is not at 1/4 (here C4 at 1/8, read through --layer res5's slot) cannot be scored on
    the matches' grid: one line naming the sizes, before any pair is read."""
    monkeypatch.setitem(common.BASELINE_LAYERS, "res5", common.Res4ResNet)
    with pytest.raises(common.UserError, match="features at 8x8 for 64 px views, not the 16x16 grid") as error:
        E.main(["--dataset", "correspondence", "--output-dir", str(tmp_path / "run")])
    assert "\n" not in str(error.value)
