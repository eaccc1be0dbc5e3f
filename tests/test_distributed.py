"""The users' scale on a CPU: multi-node resume, resume compatibility, the GPU's precision and memory-format paths,
and the uint8 data path. The rehearsal launches two `torchrun --nnodes=2` launchers on 127.0.0.1, each in its own
working directory, as two nodes with node-local disks would be."""
import argparse
import json
import os
import random
import re
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


def free_slurm_job_id():
    """A SLURM job id whose rendezvous port (common.slurm_port, below the ephemeral ports that other tests' sockets
    take) is free now."""
    while True:
        job_id = str(random.SystemRandom().randrange(10**6))  # not the global RNG, which tests seed
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", common.slurm_port(job_id)))
                return job_id
            except OSError:
                continue


def free_port():
    """A free port below Linux's ephemeral range, where no other test's outgoing socket can take it meanwhile."""
    return common.slurm_port(free_slurm_job_id())


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


def test_bf16_autocast_and_channels_last_train_on_cpu(tmp_path, script="vader.py"):
    """The GPU's default path (bf16 autocast, channels-last) runs here too: finite losses, different from fp32's
    (clove.py's twin is in test_clove.py)."""
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


# ---- a GPU cluster's paths, on a CPU: warm-up, precision, RNG layout, resume, memory, preemption, srun ----
class Probe(torch.nn.Module):
    """Records what each forward sees: the input shapes and whether autocast ran the convolution in bf16."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.seen = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), []

    def forward(self, *batches):
        outputs = [self.conv(x) for x in batches]
        self.seen.append(([tuple(x.shape) for x in batches], outputs[0].dtype))
        return [self.bn(o) for o in outputs]


def test_ddp_warm_up_runs_a_tiny_batch_under_the_training_precision(tmp_path):
    """The warm-up that settles DDP's buckets must fit wherever a training step fits: a tiny batch, in the training's
    precision, buffers and gradients left as they were (clove.py passes two images' views, 4 global and 12 local, since BN needs
    more than one value per channel)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = Probe()
        buffers = [b.clone() for b in model.buffers()]
        common.wrap_ddp(model, common.Dist(world_size=2), [(2, 3, 16, 16), (6, 3, 8, 8)], precision="bf16")
        assert model.seen == [([(2, 3, 16, 16), (6, 3, 8, 8)], torch.bfloat16)]
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
        assert all(p.grad is None for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


def tiny_run(tmp_path, state, resume="auto"):
    args = argparse.Namespace(output_dir=str(tmp_path), image_size=32, resume=resume, log_every=1, save_every=0,
                              save_minutes=30)
    return common.TrainingRun("vader", args, common.Dist(), common.ViewDataset(None, None, length=4), state)


def test_resume_with_an_enabled_loss_scaler_from_a_checkpoint_without_one(tmp_path):
    """--precision may change on resume: a bf16/fp32 run's disabled scaler saves {}, which an enabled (fp16) one
    refused to load. The CPU's GradScaler takes the same path as the GPU's."""
    tiny_run(tmp_path, dict(scaler=torch.amp.GradScaler("cpu", enabled=False))).save(epoch=0, step=3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert tiny_run(tmp_path, dict(scaler=scaler)).resume() == 3
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16  # a fresh scale


def test_resume_lets_the_loaded_checkpoint_go(tmp_path, monkeypatch):
    import gc
    import weakref

    class Checkpoint(dict):  # a dict that a weak reference can watch
        pass

    net = torch.nn.Linear(2, 2)
    tiny_run(tmp_path, dict(model=net)).save(epoch=0, step=1)
    load, loaded = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(Checkpoint(load(*a, **k))) or loaded[-1])
    assert tiny_run(tmp_path, dict(model=net)).resume() == 1
    watch = weakref.ref(loaded.pop())
    gc.collect()
    assert watch() is None  # a 400 MB checkpoint must not stay in memory for the whole run


def test_rng_states_hold_this_gpus_state_only_and_restore_on_another_layout(monkeypatch):
    """Saved on 8 GPUs and resumed where a process sees one: only the current device's generator is saved and set
    (the CUDA calls are stood in for, so this runs on a CPU)."""
    gpu = {"state": torch.arange(8, dtype=torch.uint8), "set": None}

    def all_devices(*_):
        raise AssertionError("the state of every visible GPU ties the checkpoint to the machine's layout")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": gpu.update(set=state))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", all_devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", all_devices)
    states = common.rng_states()
    common.set_rng_states(states)
    assert torch.equal(gpu["set"], gpu["state"])
    common.set_rng_states(dict(states, cuda=[gpu["state"]] * 8))  # an older checkpoint's list: left alone


def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    enabled = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, **kw: enabled.append(kw["enabled"]))
    for capability, dtype in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert common.autocast_dtype(torch.device("cuda", 0), "auto") == dtype, capability
        common.grad_scaler(torch.device("cuda", 0), "auto")
    assert enabled == [True, True, False, False]  # fp16 scales the loss, bf16 needs no scaler
    assert common.autocast_dtype(torch.device("cpu"), "auto") is None


def test_deterministic_mode_sets_pytorchs_switches():
    code = ("import os, torch, common; common.init_distributed(deterministic=True); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, "
            "os.environ['CUBLAS_WORKSPACE_CONFIG'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["True", "True", ":4096:8"], r.stderr


def test_a_two_value_flag_typed_as_its_default_resumes(tmp_path):
    """--global-scale 0.2 1 parses to a list; its default is a tuple: the same setting, so resuming is allowed."""
    args = [*SINGLE["clove.py"], "--global-scale", "0.2", "1", "--output-dir", tmp_path]
    assert run("clove.py", *args, "--max-steps", "1").returncode == 0
    r = run("clove.py", *args, "--max-steps", "2", "--deterministic")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]


def test_the_loader_keeps_under_4_gib_in_flight_at_clove_s_paper_batch():
    """8 workers x prefetch x 512 images a rank (batch 2048 on 4 GPUs) of 2 x 224 + 6 x 96 px views and masks."""
    import clove
    views = clove.CLoVEViews(224, 6, 96)
    dataset = common.ViewDataset(None, views, length=1)
    sample = sum(t.numel() * t.element_size() for t in dataset[0][:4])  # bytes of one image's views and masks
    loader = common.make_loader(dataset, common.Dist(), 512, 8, 0)[1]
    in_flight = loader.num_workers * loader.prefetch_factor * 512 * sample
    assert sample > 450_000 and in_flight < 4 * 2**30, in_flight / 2**30


def processes(cwd, rank=None):
    """PIDs of the processes running in `cwd` (torchrun's workers, or srun-style tasks), of RANK `rank` if given."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") != str(cwd):
                continue
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if rank is None or f"RANK={rank}".encode() in environ:  # the exact entry: not LOCAL_RANK= or GROUP_RANK=
            pids.append(int(pid))
    return pids


PREEMPT = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "4", "--num-matches", "4", "--queue-size",
           "32", "--synthetic-images", "48", "--epochs", "1", "--save-every", "0", "--log-every", "1", "--workers", "0"]


def torchrun(cwd, *args, launcher=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launcher,
           os.path.join(ROOT, "vader.py"), *PREEMPT, *args, "--output-dir", "out"]
    return subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(job, log, count=1):
    """Until this job has logged `count` optimiser steps (log.jsonl lines written since it was launched)."""
    start, deadline = log.stat().st_size if log.exists() else 0, time.time() + 600
    while time.time() < deadline and job.poll() is None and not (
            log.exists() and log.read_text()[start:].count('"loss"') >= count):
        time.sleep(0.05)
    assert job.poll() is None, job.communicate()[1][-3000:]


def preempted_at(out, job_output, previous):
    """The step a preemption stopped at, after checking what it left: rank 0's checkpoint and PREEMPTED marker,
    one `preempted` event at that step, and no rank a step further (their losses are logged after the all-reduce)."""
    stopped = checkpoint(out / "checkpoint.pth")["step"]
    events = [json.loads(line) for line in open(out / "log.jsonl")]
    events = events[max(i for i, e in enumerate(events) if e.get("event") == "start"):]  # this run's
    assert previous < stopped < 12, (previous, stopped, job_output[1][-3000:])
    assert (out / "PREEMPTED").exists() and f"after step {stopped}" in (out / "PREEMPTED").read_text()
    assert [e["step"] for e in events if e.get("event") == "preempted"][-1] == stopped
    assert max(e["step"] for e in events if "loss" in e) == stopped
    return stopped


def test_a_preempted_torchrun_job_leaves_its_checkpoint_and_marker_and_the_rerun_is_exact(tmp_path):
    """torchrun --standalone --nproc_per_node=2, 12 steps of 2 x 2 images, preempted four ways, each re-run resuming
    where the last stopped; the last one ends with the weights of an uninterrupted run, bit for bit. torchrun exits
    1 whatever its workers return, so PREEMPTED (written by rank 0, removed by a re-run) is what a script tests.
    1. SIGUSR1 to rank 1 alone: every rank finishes the same step, then stops.
    2. SIGUSR1 to torchrun, as SLURM's --signal sends it to a step's task (with proctrack/cgroup, only to the task,
       not to the processes it starts): torchrun forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT by default, so
       SIGUSR1 kills it (-10, status 138) and its workers, in sessions of their own, train on unsupervised until
       slurmstepd kills whatever is left of the step, as here: no checkpoint, no marker.
    3. SIGTERM to torchrun: forwarded to each worker's process group; the checkpoint and the marker are written
       before torchrun's shutdown timeout (30 s) would send SIGKILL.
    4. Where torchrun has --signals-to-handle, SIGUSR1 to torchrun with SIGUSR1 in that list: as SIGTERM."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    out, err = torchrun(whole).communicate(timeout=600)
    assert "preempted" not in out, err[-2000:]
    reference = checkpoint(whole / "out" / "checkpoint.pth")
    assert reference["step"] == 12 and not (whole / "out" / "PREEMPTED").exists()
    log, stopped = split / "out" / "log.jsonl", 0

    job = torchrun(split)  # 1. a notice to one worker
    wait_for_steps(job, log, count=2)
    victims = processes(split, rank=1)
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGUSR1)
    output = job.communicate(timeout=600)
    assert job.returncode == 1 and "preempted: stopped by a signal after step" in output[0], output[1][-3000:]
    stopped = preempted_at(split / "out", output, stopped)

    job = torchrun(split)  # 2. SIGUSR1 to torchrun, without --signals-to-handle
    wait_for_steps(job, log)
    assert not (split / "out" / "PREEMPTED").exists()  # the re-run removed it
    os.kill(job.pid, signal.SIGUSR1)
    assert job.wait(timeout=60) == -signal.SIGUSR1
    time.sleep(1)
    assert len(processes(split)) >= 2  # its two workers (and nothing stops them): orphans
    kill([job], split)  # what slurmstepd does to a step's remaining processes once its task has exited
    assert checkpoint(split / "out" / "checkpoint.pth")["step"] == stopped
    assert not (split / "out" / "PREEMPTED").exists()

    job = torchrun(split)  # 3. SIGTERM to torchrun
    wait_for_steps(job, log)
    sent = time.time()
    os.kill(job.pid, signal.SIGTERM)
    output = job.communicate(timeout=600)
    assert time.time() - sent < 30 and "SIGKILL" not in output[1], output[1][-3000:]  # within the shutdown timeout
    assert job.returncode == 1
    stopped = preempted_at(split / "out", output, stopped)

    import torch.distributed.run
    if "--signals-to-handle" in torch.distributed.run.get_args_parser()._option_string_actions:
        job = torchrun(split, launcher=["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"])  # 4.
        wait_for_steps(job, log)
        os.kill(job.pid, signal.SIGUSR1)
        output = job.communicate(timeout=600)
        assert job.returncode == 1 and "SIGKILL" not in output[1], output[1][-3000:]
        stopped = preempted_at(split / "out", output, stopped)

    out, err = torchrun(split).communicate(timeout=600)
    assert f"resumed from out/checkpoint.pth at step {stopped}" in out, err[-3000:]
    assert not (split / "out" / "PREEMPTED").exists()
    assert_same_state(checkpoint(split / "out" / "checkpoint.pth"), reference, ("model", "momentum_encoder", "queue"))


def test_sigterm_stops_a_single_process_run_with_the_preempted_status(tmp_path):
    job = subprocess.Popen([sys.executable, os.path.join(ROOT, "clove.py"), *SINGLE["clove.py"], "--epochs", "4",
                            "--log-every", "1", "--output-dir", tmp_path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log, deadline = tmp_path / "log.jsonl", time.time() + 600
    while time.time() < deadline and job.poll() is None and not (log.exists() and '"loss"' in log.read_text()):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=600)
    assert job.returncode == common.PREEMPTED and "re-run the same command to resume" in out, err[-2000:]
    assert "Traceback" not in err
    assert checkpoint(tmp_path / "checkpoint.pth")["step"] >= 1


def srun_tasks(out, *args):
    """Two tasks started as srun starts them (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS, the node list,
    the job id from which they take their port), without torchrun's variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    job_id = free_slurm_job_id()
    return [subprocess.Popen([sys.executable, os.path.join(ROOT, "vader.py"), *PREEMPT, *args, "--output-dir", out],
                             env=dict(base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                                      SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="localhost",
                                      SLURM_JOB_ID=job_id, OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]


def test_srun_without_torchrun_forms_the_same_job_as_torchrun_and_exits_75_when_preempted(tmp_path):
    """srun-style tasks find each other and train exactly as `torchrun --nproc_per_node=2` does. Preempted as SLURM
    does it (--signal=USR1 to every task of the step), each exits 75, srun's status, even though `srun
    --kill-on-bad-exit=1` answers the first task's exit by sending SIGTERM to the others (emulated here)."""
    steps = ["--max-steps", "2"]
    out, err = torchrun(tmp_path, *steps).communicate(timeout=600)
    reference = checkpoint(tmp_path / "out" / "checkpoint.pth")
    for task in srun_tasks(tmp_path / "srun", *steps):
        out, err = task.communicate(timeout=600)
        assert task.returncode == 0, err[-3000:]
    start = json.loads(open(tmp_path / "srun" / "log.jsonl").readline())
    assert start["event"] == "start" and start["world_size"] == 2
    assert_same_state(checkpoint(tmp_path / "srun" / "checkpoint.pth"), reference, ("model", "momentum_encoder"))

    tasks = srun_tasks(tmp_path / "srun", "--max-steps", "12")  # resumes at step 2
    wait_for_steps(tasks[0], tmp_path / "srun" / "log.jsonl")
    for task in tasks:
        task.send_signal(signal.SIGUSR1)
    while all(task.poll() is None for task in tasks):
        time.sleep(0.01)
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signal.SIGTERM)
    outputs = [task.communicate(timeout=600) for task in tasks]
    assert [task.returncode for task in tasks] == [common.PREEMPTED] * 2, outputs[1][1][-3000:]
    assert (tmp_path / "srun" / "PREEMPTED").exists() and checkpoint(tmp_path / "srun" / "checkpoint.pth")["step"] > 2


def image_folder(root, count=6):
    """`count` small PNGs in two class folders, and a file that is not an image."""
    rng = torch.Generator().manual_seed(0)
    for i in range(count):
        path = root / f"class{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(torch.randint(0, 256, (80, 96, 3), generator=rng, dtype=torch.uint8).numpy()).save(path)
    (root / "class0" / "notes.txt").write_text("not an image")
    return root


TWO_RANKS = """
import argparse, json, os, signal, sys
import torch
import common
walked, walk = [], os.walk
os.walk = lambda top, *a, **k: walked.append(top) or walk(top, *a, **k)

def main():
    d = common.init_distributed()
    data = common.ViewDataset(sys.argv[1], None)
    print(json.dumps(dict(walked=len(walked), type=type(data.files).__name__, files=list(data.files))), flush=True)
    args = argparse.Namespace(output_dir=sys.argv[2], image_size=32, resume="auto", log_every=1, save_every=1)
    run = common.TrainingRun("vader", args, d, data, dict(model=torch.nn.Linear(2, 2)))
    step = run.resume()
    if d.rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # a notice to one rank, during start-up
    run.start(step, 10, "two ranks")
    print("started", flush=True)

common.run_main(main)
"""


def test_two_ranks_list_the_images_once_and_a_signal_to_one_of_them_before_step_1_stops_both(tmp_path):
    """2 gloo ranks on one data folder: only rank 0 walks the tree, every rank gets the same list (compact: an
    ImageList). SIGTERM to rank 1 after the run took over the signals, before step 1: both ranks stop at
    TrainingRun.start with the PREEMPTED status, rank 0 leaves the marker, and no checkpoint is written."""
    data, out, port = image_folder(tmp_path / "data"), tmp_path / "out", free_port()
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    ranks = [subprocess.Popen([sys.executable, str(tmp_path / "two_ranks.py"), str(data), str(out)], cwd=ROOT,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in ranks]
    assert [p.returncode for p in ranks] == [common.PREEMPTED] * 2, [e[-2000:] for _, e in outputs]
    seen = [json.loads(out.splitlines()[0]) for out, _ in outputs]
    expected = sorted(str(p) for p in data.rglob("*.png"))
    assert [s["walked"] for s in seen] == [1, 0]
    assert seen[0]["files"] == seen[1]["files"] == expected and seen[1]["type"] == "ImageList"
    assert not any("started" in out for out, _ in outputs)
    assert "before step 1" in (out / "PREEMPTED").read_text() and not (out / "checkpoint.pth").exists()
    assert [json.loads(line).get("event") for line in open(out / "log.jsonl")][-1] == "preempted"


SIGNAL_AT = """
import os, signal, sys
import common, vader
owner, name = {"os": os, "vader": vader, "common": common, "TrainingRun": common.TrainingRun}[sys.argv[1]], sys.argv[2]
original = getattr(owner, name)

def signalled(*args, **kwargs):  # SIGTERM to this process on the first call, then the original
    setattr(owner, name, original)
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

setattr(owner, name, signalled)
sys.argv = ["vader.py", *sys.argv[3:]]
common.run_main(vader.main)
"""


def test_a_signal_at_any_moment_before_step_1_ends_the_run_with_the_preempted_status(tmp_path):
    """One process (srun's tasks and plain python alike), SIGTERM at four moments: parsing the flags, listing the
    images, loading the checkpoint of a resumed run, and the first batch. Each run exits 75 with nothing written or
    a valid checkpoint; once the run has its output folder, with the marker too."""
    data, out = image_folder(tmp_path / "data"), tmp_path / "out"
    (tmp_path / "signal_at.py").write_text(SIGNAL_AT)
    flags = ["--data", str(data), "--arch", "resnet18", "--image-size", "64", "--batch-size", "2", "--num-matches", "4",
             "--queue-size", "32", "--lr-encoder", "0.03", "--lr-decoder", "0.03", "--loss-weight", "1",
             "--workers", "0", "--max-steps", "3", "--output-dir", str(out)]

    def run_signalled_at(owner, name, *extra):
        r = subprocess.run([sys.executable, str(tmp_path / "signal_at.py"), owner, name, *flags, *extra], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
        assert r.returncode == common.PREEMPTED and "Traceback" not in r.stderr, (owner, name, r.stderr[-2000:])
        assert "re-run the same command to resume" in r.stdout
        return r

    for owner, name in (("vader", "parse_args"), ("os", "walk")):  # before the run has an output folder
        run_signalled_at(owner, name)
        assert not out.exists()
    run_signalled_at("common", "apply_appearance")  # the first batch: step 1 finishes, then the stop
    first = checkpoint(out / "checkpoint.pth")
    assert first["step"] == 1 and "after step 1" in (out / "PREEMPTED").read_text()
    run_signalled_at("TrainingRun", "decide")  # while the resumed run reads its checkpoint
    assert checkpoint(out / "checkpoint.pth")["id"] == first["id"]  # untouched
    assert "before step 2" in (out / "PREEMPTED").read_text()


def test_evaluate_linear_under_srun_checks_the_batch_against_slurm_s_task_count_before_forming_a_group(tmp_path):
    """srun's variables only (4 tasks; this one is task 0) and a batch of 18: a one-line error naming the flag,
    at once. Read from WORLD_SIZE before SLURM's variables were mapped, the check saw 1 rank, and the task then
    waited for the 3 others to form the process group."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env = dict(base, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="9")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate_linear.py"), "--batch-size", "18",
                        "--output-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert "--batch-size 18" in r.stderr and "4 rank" in r.stderr


FAKE_SRUN = """#!/bin/bash
# srun as the tests measured it: `srun python` returns its tasks' status, 75 when preempted; `srun torchrun` returns
# torchrun's, 1 whether the workers were preempted or crashed. Rank 0 of a preempted run leaves the marker.
echo "$@" >> "$CALLS"
for a in "$@"; do [ "$a" = --kill-on-bad-exit=1 ] && bad_exit=1; [ -n "$next" ] && out=$a; next=; \
    [ "$a" = --output-dir ] && next=1; done
[ -n "$bad_exit" ] || { echo "srun without --kill-on-bad-exit=1" >&2; exit 3; }
case $OUTCOME in
    preempted) echo "stopped by a signal after step 7" > "$out/PREEMPTED"; status=75 ;;
    crashed) status=1 ;;
    finished) status=0 ;;
esac
case " $* " in *" torchrun "*) [ $status = 0 ] || status=1 ;; esac
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in show) echo node7; echo node8 ;; requeue) echo "requeue $2" >> "$CALLS" ;; esac
"""


def sbatch_scripts():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(#!/bin/bash\n.*?)```", text, re.S)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_the_readme_s_sbatch_script_requeues_exactly_when_the_run_was_preempted(tmp_path, launcher):
    """The README's sbatch script for `srun python` and for `srun torchrun`, run by bash with srun and scontrol
    standing in: each srun has --kill-on-bad-exit=1, and the job is requeued after a preemption, not after a
    crash or the end, nor for a marker that an earlier run left behind."""
    (script,) = [s for s in sbatch_scripts() if f"srun --kill-on-bad-exit=1 {launcher} " in s]
    (tmp_path / "bin").mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "job.sh").write_text(script.replace("/shared/runs/vader", str(out)))
    for outcome, stale, requeued in (("preempted", False, True), ("finished", True, False),
                                      ("crashed", True, False), ("preempted", True, True)):
        calls = tmp_path / f"calls-{outcome}-{stale}"
        if stale:
            (out / "PREEMPTED").write_text("an earlier run's")
        env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", CALLS=str(calls), OUTCOME=outcome,
                   SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[7-8]")
        r = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)
        lines = calls.read_text().splitlines()
        assert r.returncode == 0 and "srun without" not in r.stderr, r.stderr
        assert ("requeue 4242" in lines) == requeued, (outcome, stale, lines)
        if launcher == "torchrun":
            assert "--rdzv_endpoint=node7:19242" in lines[0]  # the first host, the job's own port
        (out / "PREEMPTED").unlink(missing_ok=True)


def test_a_process_that_sees_only_its_own_gpu_uses_it(monkeypatch):
    """srun --gpus-per-task=1 shows each task one GPU while SLURM_LOCALID counts to 3: cuda:3 does not exist there
    (the CUDA calls are stood in for, so this runs on a CPU)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("LOCAL_RANK", "3"), monkeypatch.setenv("WORLD_SIZE", "1")
    d = common.init_distributed()
    assert d.device == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)] and d.local_rank == 3


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu[003-005,9],cpu1", ["gpu003", "gpu004", "gpu005", "gpu9", "cpu1"]),
    ("a-b[12,14]", ["a-b12", "a-b14"]),
    ("dgx-[01,05]-ib", ["dgx-01-ib", "dgx-05-ib"]),  # a suffix after the brackets
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),  # two groups
    ("a[09-11]b,c[1]", ["a09b", "a10b", "a11b", "c1"]),
    ("n[8-10],n[098-100]", ["n8", "n9", "n10", "n098", "n099", "n100"]),  # padding: the lower bound's width
    ("x[1,3-4]y.ib z2", ["x1y.ib", "x3y.ib", "x4y.ib", "z2"]),
])
def test_a_slurm_node_list_expands_as_scontrol_show_hostnames_and_its_first_host_is_the_master(nodelist, hosts):
    assert common.hostnames(nodelist) == hosts
    assert common.first_host(nodelist) == hosts[0]
    if shutil.which("scontrol"):  # on a SLURM machine, SLURM's own expansion too
        assert subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                              text=True).stdout.split() == hosts


@pytest.mark.parametrize("nodelist", ["a[1-", "a[3-1]", "a[]", "a[x]", ""])
def test_a_node_list_slurm_would_refuse_is_a_one_line_error(nodelist):
    with pytest.raises(common.UserError, match="SLURM_JOB_NODELIST"):
        common.first_host(nodelist, "SLURM_JOB_NODELIST")


def test_under_srun_the_master_is_the_step_s_first_host_and_the_port_comes_from_the_job_id(monkeypatch):
    """Two jobs that share a node rendezvous on different ports: 15000 + SLURM_JOB_ID mod 10000, unless the job
    sets MASTER_PORT (or MASTER_ADDR)."""
    slurm = dict(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8",
                 SLURM_STEP_NODELIST="dgx-[05,07]-ib", SLURM_JOB_NODELIST="dgx-[01,05,07]-ib")
    places = {}
    for job, extra in (("41", {}), ("42", {}), ("1234567", {}), ("43", dict(MASTER_PORT="29400", MASTER_ADDR="h"))):
        monkeypatch.setattr(os, "environ", dict(slurm, SLURM_JOB_ID=job, **extra))
        places[job] = (common.job_place(), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    assert places["41"] == ((5, 1, 8), "dgx-05-ib", 15041)  # the step's nodes, not the job's
    assert places["42"][2] == 15042 and places["1234567"][2] == 15000 + 4567
    assert places["43"][1:] == ("h", 29400)
    monkeypatch.setattr(os, "environ", dict(slurm, RANK="0", WORLD_SIZE="2"))  # torchrun's variables win
    assert common.job_place() == (0, 0, 2) and "MASTER_PORT" not in os.environ


def private_dirty_kib():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])


def kib_copied_by_a_forked_reader(files):
    """KiB of memory a forked child (a loader worker) copies while it reads every path of `files` once."""
    import gc
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        gc.disable()  # a collection would touch every tracked object, list or not
        sum(len(files[i]) for i in range(1000))  # the allocator settles on the temporaries of one read
        before = private_dirty_kib()
        sum(len(files[i]) for i in range(len(files)))
        os.write(write, str(private_dirty_kib() - before).encode())
        os._exit(0)
    os.close(write)
    copied = int(os.read(read, 64))
    os.waitpid(pid, 0)
    return copied


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/<pid>/smaps_rollup")
def test_a_forked_loader_worker_reads_the_image_list_without_copying_it():
    """200k ImageNet-like paths: read from a list of str, a worker copies the pages of every str (their reference
    counts change); read from an ImageList, almost nothing."""
    paths = [f"/imagenet/train/n{i // 1300:08d}/n{i // 1300:08d}_{i}.JPEG" for i in range(200_000)]
    files = common.ImageList(paths)
    assert len(files) == len(paths) and [files[i] for i in (0, 1299, 199_999)] == [paths[i] for i in (0, 1299, 199_999)]
    assert kib_copied_by_a_forked_reader(paths) > 8 * 1024  # the measurement sees the list's copy-on-read
    assert kib_copied_by_a_forked_reader(files) < 1024


def test_curves_png_draws_the_loss_against_its_chance_level(tmp_path):
    records = [dict(event="start", step=0, chance_loss=5.0, match_chance=0.25)]
    records += [dict(step=s, loss=10.0 - s, lr=0.1, images_per_s=4.0, match_top1=0.25 + s / 40) for s in range(1, 11)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    log = common.JsonLog(tmp_path / "log.jsonl")  # a resumed run's log holds the records of the run it continues
    assert log.records == records
    picture = common.draw_curves(log.records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").exists() and picture.size == (720, 4 * 170)
    pixels = picture.load()

    def colour_near(x, y, colour, r=2):
        return any(pixels[x + dx, y + dy] == colour for dx in range(-r, r + 1) for dy in range(-r, r + 1))

    top, bottom, left, right = 18, 18 + 170 - 40, 60, 710  # the loss panel: 9 (step 1) top left, 0 (step 10)
    loss_at = lambda step: (round(left + (right - left) * (step - 1) / 9), round(top + (bottom - top) * (step - 1) / 9))  # noqa
    for step in (2, 5.5, 9):
        assert colour_near(*loss_at(step), (31, 119, 180)), step  # the loss line passes where it should
    y_chance = top + (bottom - top) * (9 - 5) / 9  # the dashed chance line at 5
    assert sum(colour_near(x, round(y_chance), (120, 120, 120), 1) for x in range(left + 2, right - 2, 8)) > 60
