"""The users' scale on a CPU: multi-node resume, resume compatibility, the GPU's precision and memory-format paths,
and the uint8 data path. The rehearsal launches two `torchrun --nnodes=2` launchers on 127.0.0.1, each in its own
working directory, as two nodes with node-local disks would be."""
import argparse
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


def torchrun(cwd, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "vader.py"), *PREEMPT, *args, "--output-dir", "out"]
    return subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_the_rerun_is_exact(tmp_path):
    """SIGUSR1 (a scheduler's notice) to rank 1 alone, mid-run: both ranks finish that optimiser step, rank 0 writes
    the checkpoint, the job exits with PREEMPTED; the same command then resumes and ends with the weights of an
    uninterrupted run, bit for bit (12 steps of 2 x 2 images)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    out, err = torchrun(whole).communicate(timeout=600)
    assert "preempted" not in out, err[-2000:]
    reference = checkpoint(whole / "out" / "checkpoint.pth")
    assert reference["step"] == 12

    job, log = torchrun(split), split / "out" / "log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None and not (
            log.exists() and sum('"loss"' in line for line in open(log)) >= 3):
        time.sleep(0.05)
    victims = processes(split, rank=1)
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGUSR1)
    out, err = job.communicate(timeout=600)
    assert "preempted: stopped by a signal after step" in out, (out[-2000:], err[-3000:])
    stopped = checkpoint(split / "out" / "checkpoint.pth")
    assert 3 <= stopped["step"] < 12
    events = [json.loads(line) for line in open(log)]
    assert [e["step"] for e in events if e.get("event") == "preempted"] == [stopped["step"]]
    assert max(e["step"] for e in events if "loss" in e) == stopped["step"]  # no rank went a step further

    out, err = torchrun(split).communicate(timeout=600)
    assert f"resumed from out/checkpoint.pth at step {stopped['step']}" in out, err[-3000:]
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


def test_srun_without_torchrun_forms_the_same_job_as_torchrun(tmp_path):
    """Two tasks started as srun starts them (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS, the node list),
    without torchrun's variables: they find each other and train exactly as `torchrun --nproc_per_node=2` does."""
    steps = ["--max-steps", "2"]
    out, err = torchrun(tmp_path, *steps).communicate(timeout=600)
    reference = checkpoint(tmp_path / "out" / "checkpoint.pth")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    port, tasks = free_port(), []
    for rank in (0, 1):
        env = dict(base, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2",
                   SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        tasks.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "vader.py"), *PREEMPT, *steps,
                                       "--output-dir", tmp_path / "srun"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for task in tasks:
        out, err = task.communicate(timeout=600)
        assert task.returncode == 0, err[-3000:]
    start = json.loads(open(tmp_path / "srun" / "log.jsonl").readline())
    assert start["event"] == "start" and start["world_size"] == 2
    assert_same_state(checkpoint(tmp_path / "srun" / "checkpoint.pth"), reference, ("model", "momentum_encoder"))


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


@pytest.mark.parametrize("nodelist, host", [("gpu[003-005,9],cpu1", "gpu003"), ("node1,node2", "node1"),
                                            ("a-b[12,14]", "a-b12"), ("localhost", "localhost")])
def test_the_master_is_the_first_host_of_slurms_node_list(nodelist, host):
    assert common.first_host(nodelist) == host


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
