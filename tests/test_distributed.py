"""The users' scale on a CPU: multi-node resume, resume compatibility, the GPU's precision and memory-format paths,
and the uint8 data path. The rehearsal launches two `torchrun --nnodes=2` launchers on 127.0.0.1, each in its own
working directory, as two nodes with node-local disks would be."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 ranks x 2 images, 64 px views (16 x 16 output cells), 64 synthetic images: 8 steps an epoch
VADER = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "8", "--num-matches", "4", "--queue-size", "64",
         "--synthetic-images", "64", "--epochs", "2", "--save-every", "2", "--log-every", "1", "--workers", "0"]
# 4 ranks x 2 images x 2 micro-batches; 10 images a rank an epoch: 2 steps and one leftover micro-batch
CLOVE = ["--arch", "resnet18", "--image-size", "64", "--local-crops", "1", "--local-size", "32", "--batch-size", "16",
         "--synthetic-images", "40", "--epochs", "2", "--save-every", "1", "--log-every", "1", "--workers", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(tmp_path, script, args):
    """Two launchers of `torchrun --nnodes=2 --nproc_per_node=2`, node k in tmp_path/node<k> with a relative
    --output-dir (node-local). Returns the two Popen objects (each the leader of its own process group)."""
    port, procs = free_port(), []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
               os.path.join(ROOT, script), *args, "--output-dir", "out"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def kill(procs, root):
    """A scheduler's preemption: SIGKILL to each node's launcher and to its workers (torchrun starts each worker in
    a session of its own, so they are found by their working directory, below `root`)."""
    victims = {p.pid for p in procs}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(root)):
                victims.add(int(pid))
        except OSError:
            continue
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.communicate()


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a, b, keys):
    for key in keys:
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


@pytest.mark.parametrize("script, args, state", [
    ("vader.py", VADER, ("model", "momentum_encoder", "queue")),
    ("clove.py", CLOVE + ["--accum-steps", "2"], ("model", "teacher")),
])
def test_two_nodes_with_local_disks_resume_after_a_kill_exactly(tmp_path, script, args, state):
    """2 nodes x 2 ranks, node-local --output-dir: killed after its first checkpoint and resumed, the run ends with
    the state of an uninterrupted one. Node 1 never has rank 0's checkpoint (only rank 0 writes), and it holds a
    stale checkpoint of another run: rank 0 must decide and send its own."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    finish(launch_two_nodes(whole, script, args))
    reference = checkpoint(whole / "node0" / "out" / "checkpoint.pth")
    assert not (whole / "node1" / "out" / "checkpoint.pth").exists()  # nodes share nothing

    procs = launch_two_nodes(split, script, args)
    ckpt_path = split / "node0" / "out" / "checkpoint.pth"
    deadline = time.time() + 600
    while not ckpt_path.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    kill(procs, split)
    interrupted = checkpoint(ckpt_path)
    assert 0 < interrupted["step"] < reference["step"], "the kill came too late to interrupt the run"
    stale = split / "node1" / "out" / "checkpoint.pth"
    common.save_checkpoint(str(stale), dict(reference, step=1))  # same name, another run's file: must be ignored

    outs = finish(launch_two_nodes(split, script, args))
    assert f"resumed from out/checkpoint.pth at step {interrupted['step']}" in outs[0][0]
    assert "rank 0 sent it to every rank" in outs[0][0]
    resumed = checkpoint(ckpt_path)
    assert resumed["step"] == reference["step"]
    assert_same_state(resumed, reference, state)
    events = [json.loads(line) for line in open(split / "node0" / "out" / "log.jsonl")]
    assert any(e.get("event") == "resume" and e["sent_by_rank0"] for e in events)


def run(script, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="2"))


SINGLE = {  # one process, a few steps
    "vader.py": ["--arch", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-matches", "4",
                 "--queue-size", "32", "--synthetic-images", "16", "--epochs", "1", "--workers", "0"],
    "clove.py": ["--arch", "resnet18", "--image-size", "64", "--local-crops", "1", "--local-size", "32",
                 "--batch-size", "4", "--synthetic-images", "16", "--epochs", "1", "--workers", "0"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(script, out): out/ holds a checkpoint of one step of SINGLE[script] (trained once per module)."""
    cache = {}

    def copy(script, out):
        if script not in cache:
            cache[script] = tmp_path_factory.mktemp(script.split(".")[0])
            r = run(script, *SINGLE[script], "--max-steps", "1", "--log-every", "5", "--output-dir", cache[script])
            assert r.returncode == 0, r.stderr[-2000:]
        shutil.copytree(cache[script], out)
        return out

    return copy


@pytest.mark.parametrize("script, flag, value", [
    ("vader.py", "--queue-size", "64"), ("vader.py", "--num-matches", "2"), ("vader.py", "--arch", "resnet34"),
    ("clove.py", "--accum-steps", "2"), ("clove.py", "--embedding-dim", "128"), ("clove.py", "--image-size", "96"),
])
def test_resume_with_a_changed_setting_is_a_one_line_error_naming_both_values(tmp_path, trained, script, flag, value):
    out = trained(script, tmp_path / "out")
    r = run(script, *SINGLE[script], flag, value, "--output-dir", out)
    saved = checkpoint(out / "checkpoint.pth")["args"][flag[2:].replace("-", "_")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and f"{flag} {saved} -> {value}" in r.stderr, r.stderr


def test_resume_refuses_another_world_size_and_another_data_set(tmp_path, trained):
    out, args = trained("vader.py", tmp_path / "out"), SINGLE["vader.py"]
    r = run("vader.py", *args, "--synthetic-images", "20", "--output-dir", out)
    assert r.returncode == 2 and "images 16 -> 20" in r.stderr and "Traceback" not in r.stderr, r.stderr
    ckpt = checkpoint(out / "checkpoint.pth")
    ckpt["facts"]["world_size"] = 4  # as if it had been written by a 4-rank run
    torch.save(ckpt, out / "checkpoint.pth")
    r = run("vader.py", *args, "--output-dir", out)
    assert r.returncode == 2 and "world size 4 -> 1" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_harmless_changes_resume_and_are_logged(tmp_path, trained):
    out, args = trained("vader.py", tmp_path / "out"), SINGLE["vader.py"]
    r = run("vader.py", *args, "--max-steps", "2", "--log-every", "7", "--output-dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "changed flags: --log-every 5 -> 7, --max-steps 1 -> 2" in r.stdout
    events = [json.loads(line) for line in open(out / "log.jsonl")]
    resume = [e for e in events if e.get("event") == "resume"]
    assert resume and resume[0]["changed"][:2] == ["--log-every 5 -> 7", "--max-steps 1 -> 2"]
    assert resume[0]["changed"][2].startswith("--output-dir ")  # the checkpoint was copied from another folder


def test_a_checkpoint_of_the_other_method_is_refused(tmp_path, trained):
    out = trained("vader.py", tmp_path / "out")
    r = run("clove.py", *SINGLE["clove.py"], "--output-dir", out)
    assert r.returncode == 2 and "not a clove.py checkpoint (method vader)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("script", ["vader.py", "clove.py"])
def test_bf16_autocast_and_channels_last_train_on_cpu(tmp_path, script):
    """The GPU's default path (bf16 autocast, channels-last) runs here too: finite losses, different from fp32's."""
    losses = {}
    for precision, channels_last in (("fp32", "off"), ("bf16", "on")):
        out = tmp_path / precision
        r = run(script, *SINGLE[script], "--max-steps", "2", "--precision", precision, "--channels-last",
                channels_last, "--output-dir", out)
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        losses[precision] = (result["first_loss"], result["final_loss"])
        assert all(map(torch.isfinite, map(torch.tensor, losses[precision])))
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16
    assert abs(losses["bf16"][0] - losses["fp32"][0]) < 0.05 * abs(losses["fp32"][0]) + 0.05


def test_cpu_autocast_computes_convolutions_in_bf16():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with common.autocast(torch.device("cpu"), "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with common.autocast(torch.device("cpu"), "auto"):  # auto is fp32 on a CPU
        assert conv(x).dtype == torch.float32
    assert common.memory_format(torch.device("cpu"), "on") == torch.channels_last
    assert common.memory_format(torch.device("cpu"), "auto") == torch.contiguous_format


def test_fp16_on_a_cpu_is_a_one_line_error(tmp_path):
    r = run("vader.py", *SINGLE["vader.py"], "--precision", "fp16", "--output-dir", tmp_path)
    assert r.returncode == 2 and "--precision fp16" in r.stderr and "Traceback" not in r.stderr


def test_uint8_batches_normalised_on_the_device_equal_the_float_pipeline():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8, generator=g)  # N x views x 3 x H x W
    expected = torch.stack([torch.stack([TF.normalize(v.float() / 255, common.IMAGENET_MEAN, common.IMAGENET_STD)
                                         for v in n]) for n in pixels])
    assert torch.allclose(common.normalize(pixels, torch.device("cpu")), expected, atol=1e-5)
    img = Image.fromarray(pixels[0, 0].permute(1, 2, 0).numpy())
    assert common.to_uint8(img).dtype == torch.uint8 and torch.equal(common.to_uint8(img), pixels[0, 0])
    # what a worker hands over: 1 byte a value instead of 4
    assert common.to_uint8(img).element_size() * 4 == common.to_tensor(img).element_size()
