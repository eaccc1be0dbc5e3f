"""Tests of evaluate_linear.py --retrieval (Hummingbird dense nearest-neighbour retrieval): each step against a
naive loop, and whole runs on features that encode their class (mIoU 1) and on constant ones (one class
everywhere), then the run on the embedded set."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import evaluate_linear as E

COLOURS = np.array([(200, 30, 30), (30, 200, 30), (30, 30, 200)], dtype=np.uint8)  # class -> RGB


def test_patch_histograms_count_the_labelled_pixels_of_each_patch():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.choice([0, 1, 2, 255], size=(2, 8, 12)).astype(np.uint8))
    labels[1, :4, :4] = 255  # a patch of void only
    hist, valid = E.patch_histograms(labels, 4, 3)
    assert hist.shape == (2, 6, 3) and valid.shape == (2, 6)
    for n in range(2):
        for p in range(6):
            block = labels[n, (p // 3) * 4:(p // 3) * 4 + 4, (p % 3) * 4:(p % 3) * 4 + 4].flatten().tolist()
            counted = [block.count(c) for c in range(3)]
            assert valid[n, p] == (sum(counted) > 0)
            expected = [c / sum(counted) if sum(counted) else 0.0 for c in counted]
            assert torch.allclose(hist[n, p], torch.tensor(expected)), (n, p)
    assert not valid[1, 0]


def test_balanced_patches_keep_the_lowest_reference_scores():
    """The reference's loops (get_class_frequency, get_patch_scores, then score x uniform, lowest kept), re-run with
    the same uniform draws."""
    rng = np.random.default_rng(1)
    present = torch.from_numpy(rng.random((20, 4)) < 0.3)
    present[3] = False  # a patch with no labelled pixel
    valid = present.any(1)
    frequency = [sum(bool(present[p, c]) for p in range(20)) for c in range(4)]
    uniform = torch.rand(20, generator=torch.Generator().manual_seed(5))
    scores = [sum(frequency[c] for c in range(4) if present[p, c]) * float(uniform[p]) if valid[p] else math.inf
              for p in range(20)]
    expected = sorted(range(20), key=lambda p: scores[p])[:6]
    kept = E.balanced_patches(present, valid, 6, torch.Generator().manual_seed(5))
    assert sorted(kept.tolist()) == sorted(expected)
    everything = E.balanced_patches(present, valid, 100, torch.Generator().manual_seed(5))
    assert sorted(everything.tolist()) == valid.nonzero()[:, 0].tolist()  # never a patch without a label


def test_retrieved_labels_match_a_brute_force_loop(monkeypatch):
    torch.manual_seed(0)
    features = torch.randn(2, 5, 3, 4)
    memory = F.normalize(torch.randn(40, 5), dim=1)
    labels = torch.rand(40, 3)
    labels /= labels.sum(1, keepdim=True)
    monkeypatch.setattr(E, "RETRIEVAL_QUERIES", 10)  # the 24 queries in three chunks
    monkeypatch.setattr(E, "RETRIEVAL_CHUNK", 10 * 7)  # memory tiles of 7 entries: the k = 6 merge across 6 tiles
    out = E.retrieve_labels(features, memory, labels, k=6, temperature=0.1)
    assert out.shape == (2, 3, 3, 4)
    for n in range(2):
        for y in range(3):
            for x in range(4):
                q = features[n, :, y, x]
                cos = [float(q @ m / q.norm()) for m in memory]
                nearest = sorted(range(40), key=lambda i: -cos[i])[:6]
                w = [math.exp(cos[i] / 0.1) for i in nearest]
                expected = sum(wi / sum(w) * labels[i] for wi, i in zip(w, nearest))
                assert torch.allclose(out[n, :, y, x], expected, atol=1e-5)


class Blocks:
    """A tiny segmentation set: 32 x 32 images of four 8-pixel stripes, each a class (0..2) shown by its colour.
    Stripes, not blocks: where four blocks meet, bilinear upsampling of even a perfect 1/4 prediction can give a
    corner pixel its two neighbours' class."""
    task, num_classes, aspect = "segmentation", 3, 1.0

    def __init__(self, length, seed):
        self.length, self.seed = length, seed

    def __len__(self):
        return self.length

    def read(self, index):
        classes = np.random.default_rng([self.seed, index]).integers(0, 3, (1, 4))
        label = np.kron(classes, np.ones((32, 8), dtype=np.int64)).astype(np.uint8)
        return Image.fromarray(COLOURS[label]), label


class ColourFeatures(torch.nn.Module):
    """Features that encode the class: the mean colour of each 4 x 4 cell (normalised images)."""

    def forward(self, x):
        return F.avg_pool2d(x, 4)


class ConstantFeatures(torch.nn.Module):
    def forward(self, x):
        return torch.ones(len(x), 8, x.shape[-2] // 4, x.shape[-1] // 4)


def retrieval_scores(backbone, memory_size):
    """build_memory and evaluate as retrieval() runs them, on Blocks."""
    d = common.init_distributed()
    args = argparse.Namespace(batch_size=4, workers=0, seed=0, precision="fp32")
    train, val = Blocks(8, seed=0), Blocks(4, seed=1)
    memory, labels = E.build_memory(backbone, train, (32, 32), memory_size, args, d)
    loader = E.validation_loader(val, (32, 32), 4, 0, d)
    vote = lambda f: E.retrieve_labels(f, memory, labels, 30, 0.02)  # noqa: E731
    return E.evaluate(lambda images: backbone(common.normalize(images, d.device)), [vote], loader, "segmentation",
                      3, d, "fp32")[0], memory


def test_features_that_encode_their_class_retrieve_every_label():
    scores, memory = retrieval_scores(ColourFeatures(), memory_size=8 * 20)
    assert len(memory) == 8 * 20  # 20 of the 64 patches of each training image
    assert scores["miou"] == 1.0 and scores["pixel_acc"] == 1.0


def test_constant_features_predict_one_class_everywhere():
    scores, memory = retrieval_scores(ConstantFeatures(), memory_size=0)
    assert len(memory) == 8 * 64  # every patch
    labels = np.concatenate([Blocks(4, seed=1).read(i)[1].ravel() for i in range(4)])
    frequency = np.bincount(labels, minlength=3) / labels.size
    # one class c everywhere: IoU_c = its pixel share, 0 for the others
    assert any(math.isclose(scores["miou"], f / 3) and math.isclose(scores["pixel_acc"], f) for f in frequency)


def test_a_memory_smaller_than_the_training_set_is_refused():
    with pytest.raises(common.UserError, match="--memory-size 7: fewer patches than the 8 training images"):
        E.build_memory(ColourFeatures(), Blocks(8, seed=0), (32, 32), 7, None, common.init_distributed())


def test_retrieval_runs_on_the_embedded_set(tmp_path, capsys):
    out = tmp_path / "run"
    E.main(["--retrieval", "--image-size", "32", "--synthetic-train", "6", "--synthetic-val", "3",
            "--memory-size", "60", "--output-dir", str(out)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((out / "metrics.json").read_text())
    assert result["mode"] == "retrieval" and result["weights_format"] == "random"
    assert result["memory_entries"] == 60 and result["neighbours"] == 30 and result["temperature"] == 0.02
    assert 0 <= result["miou"] <= 1 and result["image_size"] == [32, 32]
