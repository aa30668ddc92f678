"""Selection at Cityscapes scale on synthetic objective vectors: wall time and peak memory of the anchors
(faiss k-means of 24,966 GTA5-sized source vectors and of 2,975 target vectors) and of the MADA and
MADAv2 selections (148 / 149 of 2,975), run through the real scripts (cluster_anchors.py,
select_active.py) on on-disk feature folders in save_features.py's format.

    python mada/bench_selection.py                     # 24,966 source + 2,975 target vectors of 19 x 256
    python mada/bench_selection.py --source-n 2000 --target-n 500    # smaller

The synthetic vectors: each image holds a random subset of the 19 classes (long-tailed presence), its
present rows drawn around one of 10 per-class modes; absent rows are zero, as save_features.py writes
them. Reports, per step, the wall time of the subprocess and its peak resident memory (ru_maxrss),
its CPU time (user + sys: what an idle machine's wall time approaches), and the in-script time;
writes OUT/bench.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_features(folder, n, domain, seed, c=19, d=256, modes=10, chunk=2048):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.random((modes, c, d), dtype=np.float32)
    presence = np.clip(np.linspace(0.98, 0.05, c), 0, 1)      # road/building/... often, rare classes seldom
    vec = np.lib.format.open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, c, d))
    counts = np.zeros((n, c), np.int32)
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        m = rng.integers(0, modes, b)
        v = centers[m] + 0.1 * rng.standard_normal((b, c, d), dtype=np.float32)
        cnt = np.where(rng.random((b, c)) < presence, rng.integers(10, 5000, (b, c)), rng.integers(0, 10, (b, c)))
        v[cnt < 10] = 0
        vec[s:s + b], counts[s:s + b] = v, cnt
    vec.flush()
    del vec
    np.save(folder / "counts.npy", counts)
    names = [f"synthetic/{domain}_{i:06d}.png" for i in range(n)]
    meta = {"domain": domain, "dataset": "synthetic", "root": str(folder), "checkpoint": None, "num_classes": c,
            "min_pixels": 10, "shape": [n, c, d], "names": names}
    (folder / "meta.json").write_text(json.dumps(meta))


def run(args_list):
    """Run a script; returns (wall seconds, peak RSS MiB, CPU seconds user+sys) of that child."""
    t0 = time.time()
    p = subprocess.Popen([sys.executable, *map(str, args_list)], cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, args_list))}")
    return time.time() - t0, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source-n", type=int, default=24966)
    ap.add_argument("--target-n", type=int, default=2975)
    ap.add_argument("--out", default="runs/mada/bench_selection")
    args = ap.parse_args()
    o = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    t0 = time.time()
    write_features(o / "fs", args.source_n, "source", 0)
    write_features(o / "ft", args.target_n, "target", 1)
    print(f"[bench] synthetic features written in {time.time() - t0:.1f}s -> {o}", flush=True)
    m = ROOT / "mada"
    steps = {
        "anchors source": [m / "cluster_anchors.py", "--features", o / "fs", "--out", o / "as"],
        "anchors target": [m / "cluster_anchors.py", "--features", o / "ft", "--out", o / "at"],
        "select mada": [m / "select_active.py", "--criterion", "mada", "--features", o / "ft",
                        "--source-anchors", o / "as", "--sheet", "0", "--out", o / "sel_mada"],
        "select madav2": [m / "select_active.py", "--criterion", "madav2", "--features", o / "ft",
                          "--source-anchors", o / "as", "--target-anchors", o / "at", "--sheet", "0",
                          "--out", o / "sel_madav2"],
    }
    res = {}
    for name, cmd in steps.items():
        sec, mib, cpu = run(cmd)
        inner = json.loads((Path(cmd[cmd.index("--out") + 1]) / "final.json").read_text())
        res[name] = {"wall_s": round(sec, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(mib), "in_script_s":
                     inner.get("seconds", inner.get("select_seconds"))}
        print(f"[bench] {name}: {sec:.1f}s wall, {cpu:.1f}s CPU, peak RSS {mib:.0f} MiB, in-script {res[name]['in_script_s']}s",
              flush=True)
    mada = ["anchors source", "select mada"]
    v2 = ["anchors source", "anchors target", "select madav2"]
    summary = {"source_n": args.source_n, "target_n": args.target_n, "steps": res,
               "mada_total_wall_s": round(sum(res[k]["wall_s"] for k in mada), 2),
               "madav2_total_wall_s": round(sum(res[k]["wall_s"] for k in v2), 2),
               "madav2_total_cpu_s": round(sum(res[k]["cpu_s"] for k in v2), 2),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in res.values()), "cpus": os.cpu_count()}
    (o / "bench.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=2))


if __name__ == "__main__":
    main()
