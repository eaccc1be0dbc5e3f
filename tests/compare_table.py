"""One same-protocol table for several checkpoints, on the embedded data (not collected by pytest).

    python tests/compare_table.py --weights random vader=runs/vader-demo/checkpoint.pth \
        clove=runs/clove-demo/checkpoint.pth dino=dino_resnet50_full.pth slotcon=slotcon_800ep.pth

Each --weights entry is NAME=PATH (or a path, named by its file, or 'random'), in any format --weights reads
(common.WEIGHT_FORMATS). Every one is scored by the same four evaluations: the linear probe (segmentation mIoU, mean
± std over its trials), Hummingbird retrieval (evaluate_linear.py --retrieval, mIoU), DAVIS-style propagation on the
embedded videos (J&F) and correspondence accuracy (top-1), each script at its demo preset. A run whose result file
exists is not run again, so an interrupted table resumes. The markdown table and the seconds spent are printed, then
the table as one JSON line.
"""
import argparse
import concurrent.futures
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablation_table import ROOT, cached, run  # noqa: E402  (the same runner and cache as the ablation tables)

TRIALS = 3
SCORES = {  # the evaluations, on the embedded sets: flags and the result fields kept
    "probe": (["evaluate_linear.py", "--trials", str(TRIALS)],
              lambda r: dict(format=r["weights_format"], miou=r["mean"]["miou"], miou_std=r["std"]["miou"])),
    "retrieval": (["evaluate_linear.py", "--retrieval"], lambda r: dict(retrieval_miou=r["miou"])),
    "davis": (["davis_propagate.py"], lambda r: {"J&F": r["J&F-Mean"]}),
    "correspondence": (["evaluate_linear.py", "--dataset", "correspondence"],
                       lambda r: dict(top1=r["top1"], top1_chance=r["chance"]["top1"])),
}


def named(entry):
    """(name, path) of a --weights entry: NAME=PATH, 'random', or a path named by its file."""
    if "=" in entry:
        return tuple(entry.split("=", 1))
    return (entry, entry) if entry == "random" else (os.path.splitext(os.path.basename(entry))[0], entry)


def evaluations(out, name, weights):
    """(name, [(evaluation, its folder, command)]) of one checkpoint."""
    folder = os.path.join(out, name)
    return [(kind, folder, [*cmd, "--weights", weights, "--output-dir", os.path.join(folder, kind)])
            for kind, (cmd, _) in SCORES.items()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", required=True, metavar="NAME=PATH", help="the checkpoints to compare")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"), help="folder of the runs and their cache")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with OMP_NUM_THREADS=1)")
    a = p.parse_args()
    entries = [named(e) for e in a.weights]
    for name, path in entries:
        if path != "random" and not os.path.isfile(path):
            raise SystemExit(f"--weights {name}={path}: no such file")
    t0 = time.time()
    jobs = [(name, kind, folder, cmd) for name, path in entries for kind, folder, cmd in evaluations(a.out, name, path)]
    for _, _, folder, _ in jobs:
        os.makedirs(folder, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        done = list(pool.map(lambda j: cached(os.path.join(j[2], f"{j[1]}.json"),
                                              lambda: run(j[3], os.path.join(j[2], f"{j[1]}.log"))), jobs))
    table, spent = {name: dict(weights=name) for name, _ in entries}, 0.0
    for (name, kind, _, _), result in zip(jobs, done):
        table[name].update(SCORES[kind][1](result["result"]))
        spent += result["seconds"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print(f"| weights | format | probe mIoU (%, ± std over {TRIALS} trials) | retrieval mIoU (%) | DAVIS J&F (%) | "
          "corr. top-1 (%) |")
    print("|---|---|---|---|---|---|")
    for e in table.values():
        print(f"| {e['weights']} | {e['format']} | {pct(e['miou'])} ± {pct(e['miou_std'])} | "
              f"{pct(e['retrieval_miou'])} | {pct(e['J&F'])} | {pct(e['top1'])} (chance {pct(e['top1_chance'])}) |")
    print(f"CPU work: {spent / 60:.0f} min of runs ({(time.time() - t0) / 60:.0f} min wall clock this time, "
          f"{a.jobs} at a time)")
    print(json.dumps(dict(rows=list(table.values()), run_minutes=round(spent / 60, 1)), default=float))


if __name__ == "__main__":
    main()
