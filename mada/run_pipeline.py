"""The whole MADA / MADAv2 toy pipeline, end to end, as a user would type it (each step is one of the
scripts of this folder, run in a subprocess; read the printed commands to see the chain):

    warmup -> features (source, target) -> anchors (source, target) -> select
           -> stage 1 -> target features of stage 1 -> target anchors -> stage 2 (MADA) / semi (MADAv2)
           -> test on the held-out toy test split

    python mada/run_pipeline.py                        # both chains (MADA and MADAv2), toy, seed 0
    python mada/run_pipeline.py --variants mada        # MADA only
    python mada/run_pipeline.py --quick                # a seconds-long smoke run (tiny budgets)

Finished steps are skipped when run again (their final.json exists) and an interrupted training step
resumes from its checkpoint, so an interrupted pipeline continues where it stopped. Timings and test mIoUs go to OUT/pipeline.json.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python mada/run_pipeline.py` finds common/

from common import runtime as rt  # noqa: E402

PY = sys.executable
FINAL_SCRIPT = {"mada": "train_stage2.py", "madav2": "train_stage2_semi.py", "random": None}


def steps(o, variants, seed, quick):
    """(name, command list, file that exists when done)."""
    t = ["--iters", "2", "--batch-size", "2", "--eval-every", "2", "--workers", "0"] if quick else []
    f = ["--max-images", "24", "--workers", "0"] if quick else []
    k = ["--k", "3"] if quick else []
    b = ["--budget", "0.1", "--sheet", "4"] if quick else []
    s = ["--seed", str(seed)]
    out = [("warmup", ["warmup.py", "--out", f"{o}/warmup", *s, *t], f"{o}/warmup/final.json"),
           ("features source", ["save_features.py", "--domain", "source", "--checkpoint", f"{o}/warmup/model.pth",
                                "--out", f"{o}/features/source_warmup", *f], f"{o}/features/source_warmup/final.json"),
           ("features target", ["save_features.py", "--domain", "target", "--checkpoint", f"{o}/warmup/model.pth",
                                "--out", f"{o}/features/target_warmup", *f], f"{o}/features/target_warmup/final.json"),
           ("anchors source", ["cluster_anchors.py", "--features", f"{o}/features/source_warmup",
                               "--out", f"{o}/anchors/source_warmup", *s, *k], f"{o}/anchors/source_warmup/final.json")]
    if "madav2" in variants:
        out.append(("anchors target", ["cluster_anchors.py", "--features", f"{o}/features/target_warmup",
                                       "--out", f"{o}/anchors/target_warmup", *s, *k],
                    f"{o}/anchors/target_warmup/final.json"))
    for v in variants:
        sel, st1 = f"{o}/select_{v}", f"{o}/stage1_{v}"
        out += [(f"select {v}", ["select_active.py", "--criterion", v, "--features", f"{o}/features/target_warmup",
                                 "--source-anchors", f"{o}/anchors/source_warmup", "--target-anchors",
                                 f"{o}/anchors/target_warmup", "--out", sel, *s, *b], f"{sel}/final.json"),
                (f"stage1 {v}", ["train_stage1.py", "--init-from", f"{o}/warmup/model.pth", "--selection", sel,
                                 "--out", st1, *s, *t], f"{st1}/final.json")]
        last = st1
        if FINAL_SCRIPT[v]:
            fe, an, last = f"{o}/features/target_stage1_{v}", f"{o}/anchors/target_stage1_{v}", f"{o}/stage2_{v}"
            out += [(f"features stage1 {v}", ["save_features.py", "--domain", "target", "--checkpoint",
                                              f"{st1}/model.pth", "--out", fe, *f], f"{fe}/final.json"),
                    (f"anchors stage1 {v}", ["cluster_anchors.py", "--features", fe, "--out", an, *s, *k],
                     f"{an}/final.json"),
                    (f"stage2 {v}", [FINAL_SCRIPT[v], "--init-from", f"{st1}/model.pth", "--anchors", an,
                                     "--selection", sel, "--out", last, *s, *t], f"{last}/final.json")]
        out.append((f"test {v}", ["test.py", "--checkpoint", f"{last}/model.pth", "--split", "test",
                                  "--out", f"{last}/eval_test"] + (["--workers", "0"] if quick else []),
                    f"{last}/eval_test/final.json"))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["mada", "madav2"], choices=["mada", "madav2", "random"],
                    help="selection criteria to run the chain for (random: stage 1 only, a baseline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/mada/pipeline", help="folder of every step's run")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the chain in seconds")
    return ap.parse_args(argv)


def main(args):
    o = str(Path(args.out))
    record, t_all = {"steps": {}, "test_mIoU": {}}, time.time()
    for name, cmd, done in steps(o, args.variants, args.seed, args.quick):
        if Path(done).exists():
            print(f"[pipeline] {name}: done already ({done})", flush=True)
            continue
        full = [PY, str(ROOT / "mada" / cmd[0]), *cmd[1:]]
        run_dir = Path(cmd[cmd.index("--out") + 1]) if "--out" in cmd else None
        if cmd[0].startswith(("warmup", "train_")) and run_dir and (run_dir / "checkpoint.pth").exists():
            full.append("--resume")  # an interrupted training step continues from its last checkpoint
        print(f"[pipeline] {name}: {' '.join(full[1:])}", flush=True)
        t0 = time.time()
        subprocess.run(full, cwd=ROOT, check=True)
        record["steps"][name] = round(time.time() - t0, 1)
    for v in args.variants:
        last = f"{o}/stage2_{v}" if FINAL_SCRIPT[v] else f"{o}/stage1_{v}"
        record["test_mIoU"][v] = json.loads(Path(f"{last}/eval_test/final.json").read_text())["mIoU"]
    record["total_s"] = round(time.time() - t_all, 1)
    Path(o).mkdir(parents=True, exist_ok=True)
    Path(f"{o}/pipeline.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    rt.run_main(main, parse_args, on_stop="run the same command again: finished steps are skipped and an "
                "interrupted training step resumes from its checkpoint")
