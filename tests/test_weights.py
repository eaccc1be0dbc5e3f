"""Tests of --weights (common.WEIGHT_FORMATS): one synthetic checkpoint per format, built from a torchvision
ResNet-18 with its keys renamed as that repository saves them, beside decoy student / teacher / momentum copies that
hold other values. Each must load to the original network's features, which the decoys would not give."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
import vader
from vader import VADeRNet


def resnet18_state(seed):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


REFERENCE, DECOY = resnet18_state(0), resnet18_state(1)
HEAD = {"weight": torch.randn(16, 512)}  # a projector or classifier: never part of the encoder


def renamed(state, prefix, sequential=False):
    """`state` under `prefix`; with `sequential`, as nn.Sequential(*list(resnet.children())[:-1]) names it."""
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    out = {}
    for k, v in state.items():
        if sequential:
            if k.startswith("fc."):
                continue
            head, rest = k.split(".", 1)
            k = f"{index[head]}.{rest}"
        out[prefix + k] = v
    return out


def heads(prefix):
    return {f"{prefix}{k}": v for k, v in HEAD.items()}


# format -> the checkpoint as its repository saves it: the transferred encoder holds REFERENCE, every decoy DECOY
CHECKPOINTS = {
    "densecl": lambda: {"meta": {"epoch": 200}, "state_dict": {
        **renamed(REFERENCE, "encoder_q.0."), **renamed(REFERENCE, "backbone."), **heads("encoder_q.1.mlp."),
        **renamed(DECOY, "encoder_k.0."), **heads("encoder_k.1.mlp."), "queue": torch.randn(128, 8)}},
    "pixpro": lambda: {"epoch": 400, "optimizer": {}, "model": {
        **renamed(REFERENCE, "module.encoder."), **renamed(DECOY, "module.encoder_k."),
        **heads("module.projector."), **heads("module.predictor.")}},
    "clove-official": lambda: {"epoch": 400, "model": {
        **renamed(REFERENCE, "module.encoder."), **renamed(DECOY, "module.encoder_k."),
        **heads("module.projector."), **heads("module.projector_k.")}},
    "slotcon": lambda: {"epoch": 800, "model": {
        **renamed(DECOY, "module.encoder_q."), **renamed(REFERENCE, "module.encoder_k."),
        **heads("module.projector_q."), **heads("module.projector_k."), "module.grouping_k.slot_embed.weight":
        torch.randn(256, 16)}},
    "vicregl": lambda: {"epoch": 300, "model": {**renamed(REFERENCE, "module.backbone."),
                                                **heads("module.projector."), **heads("module.maps_projector.")}},
    "dino": lambda: {"epoch": 800, "student": {**renamed(DECOY, "module.backbone."), **heads("module.head.mlp.0.")},
                     "teacher": {**renamed(REFERENCE, "module.backbone."), **heads("module.head.mlp.0.")},
                     "args": {"arch": "resnet50"}},
    "mocov3": lambda: {"epoch": 100, "arch": "resnet50", "state_dict": {
        **renamed(REFERENCE, "module.base_encoder."), **heads("module.base_encoder.fc.0."),
        **renamed(DECOY, "module.momentum_encoder."), **heads("module.predictor.0.")}},
    "solo-learn": lambda: {"epoch": 399, "pytorch-lightning_version": "2.0", "state_dict": {
        **renamed({k: v for k, v in REFERENCE.items() if not k.startswith("fc.")}, "backbone."),
        **renamed(DECOY, "momentum_backbone."), **heads("projector.0."), **heads("classifier.")}},
    "solo-learn-old": lambda: {"epoch": 399, "state_dict": {
        **renamed(REFERENCE, "encoder."), **renamed(DECOY, "momentum_encoder."), **heads("classifier.")}},
    "lightly": lambda: {"epoch": 100, "state_dict": {
        **renamed(REFERENCE, "backbone."), **renamed(DECOY, "backbone_momentum."), **heads("projection_head.")}},
    "lightly-sequential": lambda: {"epoch": 100, "state_dict": {
        **renamed(REFERENCE, "backbone.", sequential=True), **renamed(DECOY, "backbone_momentum.", sequential=True),
        **heads("projection_head.layers.0.")}},
    "moco": lambda: {"epoch": 800, "arch": "resnet50", "state_dict": {
        **renamed(REFERENCE, "module.encoder_q."), **heads("module.encoder_q.fc.0."),
        **renamed(DECOY, "module.encoder_k."), "module.queue": torch.randn(128, 8)}},
    "torchvision": lambda: dict(REFERENCE),
    "torchvision-ddp": lambda: {"state_dict": renamed(REFERENCE, "module.")},
}
EXPECTED = {"clove-official": "pixpro", "lightly-sequential": "lightly", "torchvision-ddp": "torchvision"}


def save(tmp_path, name):
    path = str(tmp_path / f"{name}.pth")
    torch.save(CHECKPOINTS[name](), path)
    return path


def dilated(state):
    """The probe's res5 network (C5 dilated to 1/4) holding `state`, loaded directly with torchvision's names."""
    model = common.DilatedResNet("resnet18")
    model.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    return model.eval()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_each_format_loads_the_encoder_its_authors_transfer(tmp_path, name):
    path = save(tmp_path, name)
    kind, state, _ = common.read_weights(path)
    assert kind == EXPECTED.get(name, name)
    original = torchvision.models.resnet18(weights=None)
    original.load_state_dict(REFERENCE)
    original.fc = torch.nn.Identity()
    loaded = torchvision.models.resnet18(weights=None)
    loaded.fc = torch.nn.Identity()
    loaded.load_state_dict(state, strict=True)  # exactly a ResNet: no head, no missing key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), original.eval()(x))
        probe, description = common.dense_feature_model(path, "resnet50", {"vader": VADeRNet})  # arch: from keys
        out = probe.eval()(x)
        assert kind in description and out.shape == (2, 512, 16, 16)
        assert torch.equal(out, dilated(REFERENCE)(x))
        assert not torch.allclose(out, dilated(DECOY)(x))  # the decoys would have given other features


def test_weights_format_is_what_metrics_json_records(tmp_path):
    assert common.weights_format("random") == "random"
    assert common.weights_format(save(tmp_path, "dino")) == "dino"


def test_an_unknown_checkpoint_names_its_prefixes_and_the_known_formats(tmp_path):
    path = str(tmp_path / "trunk.pth")
    torch.save({"net": renamed(REFERENCE, "module.trunk."), "epoch": 3}, path)
    with pytest.raises(common.UserError) as error:
        common.read_weights(path)
    message = str(error.value)
    assert "\n" not in message and path in message
    assert "module.trunk.*" in message and "epoch" in message  # what it found
    assert all(name in message for name in common.WEIGHT_FORMATS)  # what it knows


def test_a_renamed_encoder_with_an_extra_key_fails_the_strict_check(tmp_path):
    checkpoint = CHECKPOINTS["vicregl"]()
    checkpoint["model"]["module.backbone.layer5.0.weight"] = torch.zeros(1)
    path = str(tmp_path / "extra.pth")
    torch.save(checkpoint, path)
    with pytest.raises(common.UserError, match="1 unexpected"):
        common.dense_feature_model(path, "resnet18", {"vader": VADeRNet})


@pytest.mark.parametrize("name", ["mocov3", "dino"])
def test_vader_init_takes_the_transferred_encoder(tmp_path, name):
    f = VADeRNet("resnet18")
    assert vader.load_init(f, save(tmp_path, name)) == name
    encoder = f.encoder.state_dict()
    assert all(torch.equal(encoder[k], v) for k, v in REFERENCE.items() if not k.startswith("fc."))


def test_vader_run_starts_from_a_dino_teacher(tmp_path, run_script):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "out"
    r = run_script("vader.py", "--data", data, "--output-dir", out, "--init", save(tmp_path, "dino"),
                   "--arch", "resnet18", "--image-size", "64", "--batch-size", "4", "--queue-size", "64",
                   "--num-matches", "8", "--workers", "0", "--max-steps", "1", "--lr-encoder", "0",
                   "--lr-decoder", "0.01", "--weight-decay", "0")
    assert r.returncode == 0, r.stderr
    assert "dino" in r.stdout and json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 1
    model = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)["model"]
    assert torch.equal(model["encoder.layer4.1.conv2.weight"], REFERENCE["layer4.1.conv2.weight"])
