"""The toy benchmark (the project's main job): runs each method's pipeline on the embedded toy domains,
for several seeds, and writes a results table (method, target labels used, held-out toy test mIoU as
mean +- std over seeds, wall time, peak memory) as Markdown and as a bar chart PNG.

    python benchmark/run.py                         # every pipeline, seeds 0 1 2 (long: see README)
    python benchmark/run.py --seeds 0               # one seed
    python benchmark/run.py --only "Source only" "Oracle (target labels)"
    python benchmark/run.py --list                  # what would run

Each pipeline is a list of commands run in order in one folder per seed; its last command writes a
JSON file whose "mIoU" is the number reported (evaluated on the held-out toy `test` split, never on
the val split any script selects on). Finished steps are skipped on a re-run (their `done` file exists),
so an interrupted benchmark continues where it stopped. Adding a method = adding entries to PIPELINES.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# name, target labels used, steps: (command, file that exists when the step is done), result JSON.
# In commands, {run} is this pipeline-seed's folder, {seed} the seed, {py} the Python interpreter.
# Steps of one pipeline may use the outputs of an earlier pipeline of the same seed ({base} = the
# seed's folder): pipelines run in list order.
PIPELINES = [
    # ---- advent_maxsquare (foundation) ----
    dict(name="Source only", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/train_source.py --seed {seed} --out {base}/source", "{base}/source/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/source/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="Oracle (target labels)", method="advent_maxsquare", labels="100% (all target train)", steps=[
        ("{py} advent_maxsquare/train_source.py --source toy_cityscapes --seed {seed} --out {base}/oracle",
         "{base}/oracle/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/oracle/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- advent_maxsquare: adaptation (issue: AdaptSegNet, ADVENT, MaxSquare) ----
    # Each starts from this seed's source-only model ({base}/source, built by "Source only" above).
    dict(name="AdaptSegNet (output-space adversarial)", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/train_adaptseg.py --seed {seed} --init-from {base}/source/model.pth "
         "--out {base}/adaptseg", "{base}/adaptseg/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/adaptseg/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="ADVENT MinEnt", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/train_advent.py --mode minent --seed {seed} --init-from {base}/source/model.pth "
         "--out {base}/minent", "{base}/minent/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/minent/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="ADVENT AdvEnt", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/train_advent.py --mode advent --seed {seed} --init-from {base}/source/model.pth "
         "--out {base}/advent", "{base}/advent/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/advent/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="ADVENT AdvEnt+MinEnt (logit ensemble)", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/test.py --checkpoint {base}/advent/model.pth --ensemble {base}/minent/model.pth "
         "--split test --out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MaxSquare (MS)", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/train_maxsquare.py --target-loss maxsquare --seed {seed} "
         "--init-from {base}/source/model.pth --out {base}/maxsquare", "{base}/maxsquare/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/maxsquare/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MaxSquare (MS+IW)", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/train_maxsquare.py --target-loss iw_maxsquare --seed {seed} "
         "--init-from {base}/source/model.pth --out {base}/iw_maxsquare", "{base}/iw_maxsquare/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/iw_maxsquare/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- mada ----
    # ---- d2ada ----
    # ---- madan ----
    # ---- ssada ----
]


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def run_step(cmd, log_path):
    """Run one command; returns (seconds, peak RSS in MiB of the process tree's largest process)."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {cmd}\n")
        log.flush()
        proc = subprocess.Popen(shlex.split(cmd), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"step failed (exit {proc.returncode}): {cmd}\n  see {log_path}")
    return time.time() - t0, usage.ru_maxrss / 1024


def run_pipeline(p, seed, out):
    base = out / f"seed{seed}"
    run = base / slug(p["name"])
    run.mkdir(parents=True, exist_ok=True)
    fmt = dict(py=PY, seed=seed, run=run, base=base)
    stats_file = run / "bench.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"seconds": 0.0, "peak_mib": 0.0}
    for cmd, done in p["steps"]:
        if Path(done.format(**fmt)).exists():
            continue
        print(f"[bench] {p['name']} seed {seed}: {cmd.format(**fmt)}", flush=True)
        sec, mib = run_step(cmd.format(**fmt), run / "log.txt")
        stats["seconds"] += sec
        stats["peak_mib"] = max(stats["peak_mib"], mib)
        stats_file.write_text(json.dumps(stats))
    res = json.loads(Path(p["result"].format(**fmt)).read_text())
    return {"mIoU": res["mIoU"], **stats}


def bar_chart(rows, path):
    """A horizontal bar chart of mean mIoU (+- std) per pipeline, drawn with Pillow."""
    from PIL import Image, ImageDraw
    w, bar_h, left = 900, 26, 330
    img = Image.new("RGB", (w, 40 + bar_h * len(rows) + 20), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "Toy benchmark: held-out toy target test mIoU (mean +- std over seeds)", fill="black")
    top = max([r["mean"] + r["std"] for r in rows] + [1.0])
    scale = (w - left - 80) / top
    for i, r in enumerate(rows):
        y = 40 + i * bar_h
        d.text((10, y + 6), r["name"][:48], fill="black")
        d.rectangle([left, y + 4, left + r["mean"] * scale, y + bar_h - 4], fill=(70, 130, 180))
        d.line([left + (r["mean"] - r["std"]) * scale, y + bar_h / 2, left + (r["mean"] + r["std"]) * scale,
                y + bar_h / 2], fill="black", width=2)
        d.text((left + r["mean"] * scale + 8, y + 6), f"{r['mean']:.1f}", fill="black")
    img.save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", default=None, help="pipeline names to run")
    ap.add_argument("--out", default="benchmark/out", help="working folder (runs, logs)")
    ap.add_argument("--results", default="benchmark/results", help="results prefix: .md and .png are written")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    chosen = [p for p in PIPELINES if args.only is None or p["name"] in args.only]
    if args.list or not chosen:
        for p in PIPELINES:
            print(f"{p['name']:40s} [{p['method']}] {len(p['steps'])} steps")
        return
    out = (ROOT / args.out).resolve()
    rows, t_all = [], time.time()
    for p in chosen:
        per_seed = [run_pipeline(p, s, out) for s in args.seeds]
        m = [r["mIoU"] for r in per_seed]
        rows.append({"name": p["name"], "method": p["method"], "labels": p["labels"], "n": len(m),
                     "mean": statistics.mean(m), "std": statistics.stdev(m) if len(m) > 1 else 0.0,
                     "seconds": statistics.mean(r["seconds"] for r in per_seed),
                     "peak_mib": max(r["peak_mib"] for r in per_seed), "per_seed": m})
    lines = ["| method | folder | target labels used | toy test mIoU | seeds | wall time / seed | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | `{r['method']}` | {r['labels']} | {r['mean']:.1f} +- {r['std']:.1f} | "
                     f"{r['n']} | {r['seconds'] / 60:.1f} min | {r['peak_mib']:.0f} MiB |")
    md = "\n".join(lines) + (f"\n\nSeeds {args.seeds}; wall time of steps actually run (cached steps count 0); "
                              f"total {time.time() - t_all:.0f} s; machine: {os.cpu_count()} CPU cores.\n")
    res = ROOT / args.results
    res.parent.mkdir(parents=True, exist_ok=True)
    Path(str(res) + ".md").write_text(md)
    Path(str(res) + ".json").write_text(json.dumps(rows, indent=2))
    bar_chart(rows, str(res) + ".png")
    print(md)


if __name__ == "__main__":
    main()
