"""The whole MADAN pipeline on the toy domains, one command (each step is one of this folder's scripts,
run as a subprocess with its toy defaults; the commands are printed so that you can run them by hand):

  1. train_classifiers.py   per-source classifiers F_i (DSC) = the single-source baselines
  2. train_translation.py   multi-source CycleGAN + DSC + SAD + CCD           } repeated --rounds times; from
  3. translate.py           each source in the target style, real formats     } round 2 the classifiers are
                                                                              } retrained on the translated data
  4. train_segmenter.py     segmenter on the aggregated adapted sources       (MADAN, pixel level)
  5. train_adda.py          + feature-level ADDA                               (MADAN, pixel + feature level)
  6. train_segmenter.py     both sources combined, no adaptation               (baseline)
  7. train_mdan.py          MDAN from the combined model                       (baseline)
  8. test.py --split test   every model on the held-out toy target test split

    python madan/run_pipeline.py                      # -> runs/madan/{...}, summary.md, grid.png
    python madan/run_pipeline.py --rounds 2 --out runs/madan_r2
    python madan/run_pipeline.py --skip-baselines     # MADAN only (steps 1-5, 8)

Finished steps are skipped on a re-run (their final.json exists) and an interrupted training step resumes
from its checkpoint, so an interrupted pipeline continues where it stopped.
The translated images are shown in OUT/grid.png (source | translated | target).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python madan/run_pipeline.py` finds common/

from common import runtime as rt  # noqa: E402

SOURCES = ["toy_synthia", "toy_gta5"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/madan", help="folder of all the runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="translation rounds (dynamic DSC: classifiers retrained "
                   "on the translated sources between rounds)")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers of every step")
    p.add_argument("--skip-baselines", action="store_true", help="skip the 'combined' and MDAN baselines")
    p.add_argument("--extra", default="", help="extra flags for every training step (e.g. '--iters 4')")
    p.add_argument("--extra-translation", default="", help="extra flags for train_translation.py only "
                   "(e.g. '--epoch-iters 2 --max-epoch 2')")
    return p.parse_args(argv)


def step(cmd, done, log):
    """Run `python madan/<script> ...` unless `done` exists. Returns seconds spent."""
    if Path(done).exists():
        print(f"[pipeline] skip (done): {' '.join(cmd)}", flush=True)
        return 0.0
    run_dir = Path(cmd[cmd.index("--out") + 1])
    if Path(cmd[0]).name.startswith("train_") and (any(run_dir.glob("checkpoint.pth"))
                                                    or any(run_dir.glob("*/checkpoint.pth"))):
        cmd = [*cmd, "--resume"]  # an interrupted training step continues from its last checkpoint
    print(f"[pipeline] $ python {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ python {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"[pipeline] step failed ({r.returncode}): python {' '.join(cmd)}\n  see {log}")
    return time.time() - t0


def main(args):
    base = Path(args.out)
    base.mkdir(parents=True, exist_ok=True)
    log = base / "pipeline.log"
    common = ["--seed", str(args.seed), "--workers", str(args.workers)]
    extra = args.extra.split()
    times, t_all = {}, time.time()

    def run(name, cmd, done):
        times[name] = times.get(name, 0.0) + step(cmd, done, log)

    roots = lambda d: ",".join(str(d / s) for s in SOURCES)  # noqa: E731
    # 1-3: classifiers, translation, translated datasets (rounds)
    cls, prev, translated = base / "classifiers", None, None
    run("classifiers", ["madan/train_classifiers.py", *common, *extra, "--out", str(cls)],
        cls / SOURCES[-1] / "final.json")
    for r in range(1, args.rounds + 1):
        sfx = "" if r == 1 else f"_r{r}"
        if r > 1:  # dynamic semantic consistency: classifiers refreshed on the translated sources
            cls = base / f"classifiers{sfx}"
            run("classifiers", ["madan/train_classifiers.py", *common, *extra, "--source-root", roots(translated),
                                "--out", str(cls)], cls / SOURCES[-1] / "final.json")
        tr = base / f"translation{sfx}"
        cmd = ["madan/train_translation.py", *common, *extra, *args.extra_translation.split(), "--out", str(tr),
               "--classifiers", ",".join(str(cls / s / "model.pth") for s in SOURCES)]
        if prev:
            cmd += ["--init-from", str(prev / "model.pth")]
        run("translation", cmd, tr / "final.json")
        translated = base / f"translated{sfx}"
        run("translate", ["madan/translate.py", "--checkpoint", str(tr / "model.pth"), "--out", str(translated)],
            translated / "translate.json")
        prev = tr
    shutil.copyfile(translated / "grid.png", base / "grid.png")
    # 4-5: MADAN segmenter (pixel level), + ADDA (feature level)
    run("segmenter", ["madan/train_segmenter.py", *common, *extra, "--source-root", roots(translated),
                      "--out", str(base / "segmenter")], base / "segmenter" / "final.json")
    run("adda", ["madan/train_adda.py", *common, *extra, "--source-root", roots(translated), "--init-from",
                 str(base / "segmenter" / "model.pth"), "--out", str(base / "adda")], base / "adda" / "final.json")
    models = {f"single source: {s}": cls.parent / "classifiers" / s for s in SOURCES}
    if not args.skip_baselines:
        # 6-7: baselines
        run("combined", ["madan/train_segmenter.py", *common, *extra, "--out", str(base / "combined")],
            base / "combined" / "final.json")
        run("mdan", ["madan/train_mdan.py", *common, *extra, "--init-from", str(base / "combined" / "model.pth"),
                     "--out", str(base / "mdan")], base / "mdan" / "final.json")
        models["sources combined (no adaptation)"] = base / "combined"
        models["MDAN"] = base / "mdan"
    models["MADAN: pixel level (translated, aggregated)"] = base / "segmenter"
    models["MADAN: pixel + feature level (ADDA)"] = base / "adda"
    # 8: held-out test split
    rows = []
    for name, run_dir in models.items():
        ev = base / "eval" / run_dir.name if run_dir.parent == base else base / "eval" / f"single_{run_dir.name}"
        run("test", ["madan/test.py", "--checkpoint", str(run_dir / "model.pth"), "--split", "test",
                     "--workers", str(args.workers), "--out", str(ev)], ev / "final.json")
        res = json.loads((ev / "final.json").read_text())
        val = json.loads((run_dir / "final.json").read_text())["last"]["mIoU"]
        rows.append({"model": name, "run": str(run_dir), "val_mIoU": val, "test_mIoU": res["mIoU"],
                     "test_mIoU13": res["last"].get("mIoU13")})
    lines = ["| model | toy val mIoU (16) | toy test mIoU (16) | test mIoU* (13) |", "|---|---|---|---|"]
    for r in rows:
        m13 = f"{r['test_mIoU13']:.2f}" if r["test_mIoU13"] is not None else "-"
        lines.append(f"| {r['model']} | {r['val_mIoU']:.2f} | {r['test_mIoU']:.2f} | {m13} |")
    total = time.time() - t_all
    lines.append(f"\nSeed {args.seed}, {args.rounds} translation round(s); wall time of the steps run now: "
                 + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + f"; total {total / 60:.1f} min.")
    (base / "summary.md").write_text("\n".join(lines) + "\n")
    (base / "summary.json").write_text(json.dumps({"rows": rows, "seconds": times, "total_s": total}, indent=2))
    print("\n".join(lines))
    print(f"[pipeline] translated samples: {base / 'grid.png'}; summary: {base / 'summary.md'}")


if __name__ == "__main__":
    rt.run_main(main, parse_args, on_stop="run the same command again: finished steps are skipped and an "
                "interrupted training step resumes from its checkpoint")
