"""The README's VADeR tables on a CPU, from the embedded data (not collected by pytest).

    python tests/ablation_table.py table3 --out runs/table3 --jobs 2      # Table 3 and the reviewers' rows
    python tests/ablation_table.py table3 --rows paper                    # Table 3's three rows only
    python tests/ablation_table.py table3 --named queue                   # the rows whose name holds "queue"
    python tests/ablation_table.py shuffle-bn --out runs/shuffle-bn       # one GPU: --shuffle-bn-splits 1, 2, 4

table3 runs the paper's protocol in miniature. Stage 1 is MoCo v2 (`vader.py --objective global`, the demo preset:
ResNet-18, 64-px views, 320 steps of 32 images, MoCo v2's update). Stage 2 starts VADeR from it (`--init`) with the
paper's learning-rate structure scaled to the budget (STAGE2 below: 160 steps), for Table 3's rows over SEEDS and the
reviewers' rows with one seed. shuffle-bn pre-trains the demo itself with each --shuffle-bn-splits over SEEDS.
Every checkpoint, and the baselines (the MoCo start, a random ResNet-18), is then scored by the linear probe
(segmentation mIoU), DAVIS-style propagation on the embedded videos (J&F) and correspondence accuracy (top-1 and
within one cell). A run whose result file exists is not run again, so an interrupted table resumes. The last line
is the table as JSON; the markdown table and the seconds spent are printed before it.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
# stage 2: the paper's decoder lr (3e-3, Eq. 2 x 10) and an encoder lr a tenth of it, where the paper's is 1e-4 of
# it over 6M steps: scaled to 160 steps (5 epochs of the stage-1 run are 320), so that the encoder can adapt at all
STAGE2 = ["--lr-encoder", "0.0003", "--lr-decoder", "0.003", "--loss-weight", "10", "--max-steps", "160"]
TABLE3 = [  # (row, flags, seeds)
    ("diff. view (VADeR)", [], SEEDS),
    ("same view", ["--matching", "same-view"], SEEDS),
    ("unmatch", ["--matching", "unmatch"], SEEDS),
    ("in-image negatives, radius 0", ["--in-image-negatives"], SEEDS[:1]),
    ("in-image negatives, radius 24 px", ["--in-image-negatives", "--negative-radius", "24"], SEEDS[:1]),
    ("no momentum encoder (shared)", ["--key-encoder", "shared"], SEEDS[:1]),
    ("queue 1,024", ["--queue-size", "1024"], SEEDS[:1]),
    ("queue 32,768", ["--queue-size", "32768"], SEEDS[:1]),
    ("4 keys per image", ["--keys-per-image", "4"], SEEDS[:1]),
    ("momentum 0.99", ["--momentum", "0.99"], SEEDS[:1]),
]
SCORES = {  # the evaluations, on the embedded sets: flags and the result fields kept
    "probe": (["evaluate_linear.py", "--trials", "3"], lambda r: dict(miou=r["mean"]["miou"], miou_std=r["std"]["miou"])),
    "davis": (["davis_propagate.py"], lambda r: {"J&F": r["J&F-Mean"], "J": r["J-Mean"], "F": r["F-Mean"]}),
    "correspondence": (["evaluate_linear.py", "--dataset", "correspondence"],
                       lambda r: dict(top1=r["top1"], within_one=r["within_one"], top1_chance=r["chance"]["top1"])),
}


def run(cmd, log, env=None):
    """Run a script to its end, its output in `log`; returns (the last stdout line as JSON, seconds)."""
    start = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})))
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit status {r.returncode}, see {log}")
    return json.loads(r.stdout.strip().splitlines()[-1]), time.time() - start


def cached(path, make):
    """The JSON at `path`, made by make() -> (result, seconds) when it does not exist yet."""
    if not os.path.isfile(path):
        result, seconds = make()
        with open(path, "w") as f:
            json.dump(dict(result=result, seconds=seconds), f)
    with open(path) as f:
        return json.load(f)


def pretrain(out, name, flags):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    done = cached(os.path.join(folder, "pretrain.json"), lambda: run(
        ["vader.py", *flags, "--output-dir", folder], os.path.join(folder, "pretrain.log")))
    return os.path.join(folder, "checkpoint.pth"), done


def score(out, name, weights):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    scores, seconds = {}, 0.0
    for kind, (cmd, keep) in SCORES.items():
        done = cached(os.path.join(folder, f"{kind}.json"), lambda: run(
            [*cmd, "--weights", weights, "--output-dir", os.path.join(folder, kind)], os.path.join(folder, f"{kind}.log")))
        scores.update(keep(done["result"]))
        seconds += done["seconds"]
    return scores, seconds


def loss_against_chance(checkpoint):
    """(final loss: the mean of the last 5 logged steps, its chance level, final match top-1) from log.jsonl."""
    records = [json.loads(line) for line in open(os.path.join(os.path.dirname(checkpoint), "log.jsonl"))]
    start = [r for r in records if r.get("event") == "start"][0]
    steps = [r for r in records if "loss" in r][-5:]
    return (statistics.mean(r["loss"] for r in steps), start.get("chance_loss"),
            statistics.mean(r["match_top1"] for r in steps if "match_top1" in r) if "match_top1" in steps[0] else None)


def rows_of(table, which="all", named=()):
    if table == "shuffle-bn":
        rows = [(f"--shuffle-bn-splits {s}", ["--shuffle-bn-splits", str(s)], SEEDS) for s in (1, 2, 4)]
    else:
        rows = TABLE3[:3] if which == "paper" else TABLE3[3:] if which == "reviewers" else TABLE3
    return [r for r in rows if not named or any(n in r[0] for n in named)]


def over_seeds(row, flags, per_seed):
    """A table row from its seeds' scores: each score's mean and, with several seeds, its std over the seeds (a
    score's own `_std`, e.g. the probe's over its trials, is dropped: it says nothing of the seeds' spread)."""
    entry = dict(row=row, flags=" ".join(flags), seeds=len(per_seed))
    for key in [k for k in per_seed[0] if not k.endswith("_std")]:
        values = [s[key] for s in per_seed if s[key] is not None]
        entry[key] = statistics.mean(values) if values else None
        if len(values) > 1:
            entry[f"{key}_std"] = statistics.stdev(values)
    return entry


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=["table3", "shuffle-bn"])
    p.add_argument("--out", default=None, help="folder of the runs (default runs/<table>)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with OMP_NUM_THREADS=1)")
    p.add_argument("--pretrain-only", action="store_true", help="stop after the pre-training runs")
    p.add_argument("--rows", choices=["all", "paper", "reviewers"], default="all",
                   help="table3: Table 3's three rows, the reviewers' rows, or both")
    p.add_argument("--named", nargs="+", default=(), metavar="TEXT",
                   help="only the rows whose name contains one of these (e.g. --named queue momentum)")
    a = p.parse_args()
    out = a.out or os.path.join(ROOT, "runs", a.table)
    os.makedirs(out, exist_ok=True)
    t0, spent = time.time(), 0.0
    runs, baselines = [], [("random init (ResNet-18)", "random")]
    if a.table == "table3":
        start, done = pretrain(out, "moco-start", ["--objective", "global"])
        spent += done["seconds"]
        baselines.append(("MoCo v2 start (stage 1)", start))
        stage2 = ["--init", start, *STAGE2]
    else:
        stage2 = []
    for row, flags, seeds in rows_of(a.table, a.rows, a.named):
        for seed in seeds:
            runs.append((row, seed, f"{row.split(' (')[0].replace(' ', '-').replace(',', '').replace('.', '')}-seed{seed}",
                         [*stage2, *flags, "--seed", str(seed)]))
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        trained = list(pool.map(lambda r: pretrain(out, r[2], r[3]), runs))
        spent += sum(done["seconds"] for _, done in trained)
        if a.pretrain_only:
            return print(json.dumps(dict(table=a.table, pretrained=len(trained), run_minutes=round(spent / 60, 1))))
        weights = [(name, w) for name, w in baselines] + [(r[2], ckpt) for r, (ckpt, _) in zip(runs, trained)]
        scored = dict(zip([n for n, _ in weights], pool.map(
            lambda nw: score(out, nw[0].split(" (")[0].replace(" ", "-"), nw[1]), weights)))
    spent += sum(s for _, s in scored.values())
    table = []
    for name, w in baselines:
        table.append(dict(row=name, seeds=1, **scored[name][0]))
    for row, flags, seeds in rows_of(a.table, a.rows, a.named):
        members = [(r, ckpt) for r, (ckpt, _) in zip(runs, trained) if r[0] == row]
        per_seed = [dict(**scored[r[2]][0], **dict(zip(("loss", "chance_loss", "match_top1"),
                                                        loss_against_chance(ckpt)))) for r, ckpt in members]
        table.append(over_seeds(row, flags, per_seed))
    pct = lambda e, k: "-" if e.get(k) is None else (f"{100 * e[k]:.1f}" + (f" ± {100 * e[k + '_std']:.1f}"  # noqa
                                                                              if f"{k}_std" in e else ""))
    print("| row | seeds | seg. mIoU (%) | J&F (%) | corr. top-1 (%) | within one (%) | final loss (chance) |")
    print("|---|---|---|---|---|---|---|")
    for e in table:
        loss = "-" if e.get("loss") is None else f"{e['loss']:.2f} ({e['chance_loss']:.2f})"
        print(f"| {e['row']} | {e['seeds']} | {pct(e, 'miou')} | {pct(e, 'J&F')} | {pct(e, 'top1')} | "
              f"{pct(e, 'within_one')} | {loss} |")
    print(f"CPU work: {spent / 60:.0f} min of runs ({(time.time() - t0) / 60:.0f} min wall clock this time, "
          f"{a.jobs} at a time)")
    print(json.dumps(dict(table=a.table, rows=table, run_minutes=round(spent / 60, 1)), default=float))


if __name__ == "__main__":
    main()
