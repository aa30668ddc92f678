"""The toy benchmark (the project's main job): runs each method's pipeline on the embedded toy domains and writes
a results table (method, target labels used, held-out toy test mIoU as mean +- std over seeds, wall time, peak
memory) as Markdown, JSON and a bar chart PNG.

    python benchmark/run.py                         # one seed (0) of every row: the plan prints the time estimate
    python benchmark/run.py --seeds 0 1 2           # three seeds, as the published table
    python benchmark/run.py --only "Source only" "Oracle (target labels)"
    python benchmark/run.py --methods ssada madan   # the rows of these method folders
    python benchmark/run.py --list --methods mada   # what would run (rows, steps, recorded time per seed)
    python benchmark/run.py --report                # the table of what has finished in benchmark/out; runs nothing
    python benchmark/run.py --report --publish      # ... written to the committed benchmark/results.* instead
    python benchmark/run.py --jobs 1                # one step at a time, all cores each (default --jobs 2)
    python benchmark/run.py --extra                 # also the extra rows (fp32 parity, ablations, 2 controls)
    python benchmark/run.py --toy-version 2         # the table before issue 17 (benchmark/results_v2.*)
    python benchmark/run.py --budget long --seeds 0 1 2   # the long-budget preset (issue 28): D2ADA vs random at 2x
    python benchmark/run.py --budget-scale 4 --eval-split val --only "ADVENT MinEnt" "Source only, continued (control)"
                                                    # 4x the toy training length, on val (issue 28; the grid of
                                                    # training lengths is benchmark/budget_curves.py)
    OMP_NUM_THREADS=2 python benchmark/run.py --jobs 8   # 8 pipeline-seeds at once (a bigger machine)

Toy domains: v3 by default (common/README.md "Toy domains v3": a per-image / per-instance appearance shift that
target BN statistics cannot absorb, a hard city, label shift), every step run with SEGDA_TOY_VERSION=3 and the
DeepLab/BiSeNet backbones initialised from the toy backbone pre-trained once on texture mosaics
(common/toy_backbone.py, ~25 min on 2 cores the first time, then cached). A row's result counts only for the toy
version it was run on (bench.json records it). Mechanism diagnostics of every finished row (target entropy,
rare-class IoU, discriminator accuracy, what the active selectors picked) go to <row>/diagnostics.json and to a
second table under the results.

What is written where: every step's run folder under benchmark/out/seed<N>/ (--out), each row's log (the scripts'
output) in benchmark/out/seed<N>/<row>/log.txt and its time and memory in bench.json there; the table at the end in
benchmark/out/results.md/.json/.png. The committed benchmark/results.md/.json/.png change only with --publish (the
rows found in benchmark/out replace the published rows of the same name; the others stay). Nothing finished:
nothing is written.

On screen: the plan (rows, seeds, steps, an estimate from the recorded per-row wall times of
benchmark/results.json), a line as each step starts and ends, live lines (one per running step: iteration / total,
elapsed, ETA, latest validation mIoU, read from the step's own log.jsonl; and the overall "step k of n" with an
ETA) redrawn in place on a terminal or printed every --progress-every seconds otherwise, and the table at the end.
Ctrl-C (or SIGTERM) stops the running steps, keeps every finished step and exits 130 (143); the same command then
continues: finished steps are skipped, and an interrupted training step resumes from its last checkpoint.

Each pipeline is a list of commands run in order in one folder per seed; its last command writes a
JSON file whose "mIoU" is the number reported (evaluated on the held-out toy `test` split, never on
the val split any script selects on). Finished steps are skipped on a re-run (their `done` file exists),
so an interrupted benchmark continues where it stopped. Adding a row = adding an entry to PIPELINES.
With --jobs N, pipeline-seeds run N at a time; a pipeline waits for every earlier pipeline of the same seed
that touches the same {base}/<folder> (so shared steps run once, in order). Each row records the machine.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the diagnostics import benchmark/ and common/ (run as a script, only benchmark/ is)
    sys.path.insert(0, str(ROOT))
PY = sys.executable
MACHINE = None  # set in main()
STEP_ENV = None  # the steps' environment, set in main() (toy version, threads); None = this process's
STEP_WORKERS = None  # --workers given to every step that loads images (set in main()); None = the scripts' default
# Steps that read no images through a DataLoader (saved features, anchors, selection; translate.py loops over the
# files itself): they take no --workers.
NO_LOADER = ("mada/cluster_anchors.py", "mada/select_active.py", "madan/translate.py")
# The committed table (.md/.json/.png): written only with --publish; runs write OUT/results.* otherwise.
PUBLISHED = ROOT / "benchmark" / "results"

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
    # ---- precision parity (fast-by-default issue): the same two rows trained in fp32 eager ----
    dict(name="Source only (fp32 eager, parity)", method="advent_maxsquare", labels="none", extra=True, steps=[
        ("{py} advent_maxsquare/train_source.py --amp off --seed {seed} --out {base}/source_fp32",
         "{base}/source_fp32/final.json"),
        ("{py} advent_maxsquare/test.py --amp off --checkpoint {base}/source_fp32/model.pth --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="Oracle (fp32 eager, parity)", method="advent_maxsquare", labels="100% (all target train)", extra=True,
         steps=[
        ("{py} advent_maxsquare/train_source.py --amp off --source toy_cityscapes --seed {seed} "
         "--out {base}/oracle_fp32", "{base}/oracle_fp32/final.json"),
        ("{py} advent_maxsquare/test.py --amp off --checkpoint {base}/oracle_fp32/model.pth --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- advent_maxsquare: adaptation (issue: AdaptSegNet, ADVENT, MaxSquare) ----
    # Each starts from this seed's source-only model ({base}/source, built by "Source only" above).
    # AdaBN (no training): the source model with its BN statistics re-estimated on target train images. Every
    # adaptation script forwards target batches in train mode, so it gets this effect too.
    dict(name="Source only + AdaBN (target BN statistics)", method="advent_maxsquare", labels="none",
         control="Source only", steps=[
        ("{py} advent_maxsquare/test.py --adabn --checkpoint {base}/source/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # The control every adaptation row must beat: the same script and schedule as the adaptation rows (200
    # iterations from the source model, target batches forwarded in train mode so BN sees them) with the target
    # loss weighted 0: same budget, same BN effect, no adaptation loss.
    dict(name="Source only, continued (control)", method="advent_maxsquare", labels="none",
         control="Source only", steps=[
        ("{py} advent_maxsquare/train_maxsquare.py --lambda-target 0 --seed {seed} "
         "--init-from {base}/source/model.pth --out {base}/source_continued", "{base}/source_continued/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/source_continued/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="AdaptSegNet (output-space adversarial)", method="advent_maxsquare", labels="none",
         control="Source only, continued (control)", steps=[
        ("{py} advent_maxsquare/train_adaptseg.py --seed {seed} --init-from {base}/source/model.pth "
         "--out {base}/adaptseg", "{base}/adaptseg/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/adaptseg/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="ADVENT MinEnt", method="advent_maxsquare", labels="none",
         control="Source only, continued (control)", steps=[
        ("{py} advent_maxsquare/train_advent.py --mode minent --seed {seed} --init-from {base}/source/model.pth "
         "--out {base}/minent", "{base}/minent/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/minent/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="ADVENT AdvEnt", method="advent_maxsquare", labels="none",
         control="Source only, continued (control)", steps=[
        ("{py} advent_maxsquare/train_advent.py --mode advent --seed {seed} --init-from {base}/source/model.pth "
         "--out {base}/advent", "{base}/advent/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/advent/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="ADVENT AdvEnt+MinEnt (logit ensemble)", method="advent_maxsquare", labels="none",
         control="Source only, continued (control)", steps=[
        ("{py} advent_maxsquare/test.py --checkpoint {base}/advent/model.pth --ensemble {base}/minent/model.pth "
         "--split test --out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MaxSquare (MS)", method="advent_maxsquare", labels="none",
         control="Source only, continued (control)", steps=[
        ("{py} advent_maxsquare/train_maxsquare.py --target-loss maxsquare --seed {seed} "
         "--init-from {base}/source/model.pth --out {base}/maxsquare", "{base}/maxsquare/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/maxsquare/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MaxSquare (MS+IW)", method="advent_maxsquare", labels="none",
         control="Source only, continued (control)", steps=[
        ("{py} advent_maxsquare/train_maxsquare.py --target-loss iw_maxsquare --seed {seed} "
         "--init-from {base}/source/model.pth --out {base}/iw_maxsquare", "{base}/iw_maxsquare/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/iw_maxsquare/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- mada ----
    # MADA/MADAv2 need their own DeepLabV3+ warm-up (the DeepLabV2 {base}/source has no 256-d decoder
    # feature). The shared steps live in {base}/mada and are skipped once done (pipelines run in order).
    dict(name="MADA warm-up (source only, DeepLabV3+)", method="mada", labels="none", steps=[
        ("{py} mada/warmup.py --seed {seed} --out {base}/mada/warmup", "{base}/mada/warmup/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/warmup/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # The oracle of the MADA rows: the same network and total budget (warm-up 150 + stage 1 40 iterations)
    # trained on all 400 labelled target train images.
    dict(name="MADA oracle (DeepLabV3+, target labels)", method="mada", labels="100% (all target train)", steps=[
        ("{py} mada/warmup.py --source toy_cityscapes --iters 190 --eval-every 190 --seed {seed} "
         "--out {base}/mada/oracle", "{base}/mada/oracle/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/oracle/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADA stage 1 (5% images, CE)", method="mada", labels="5% of target images (20)",
         control="Random 5% images + MADA stage 1",
         selection=("mada", "{base}/mada/select_mada"), steps=[
        ("{py} mada/warmup.py --seed {seed} --out {base}/mada/warmup", "{base}/mada/warmup/final.json"),
        ("{py} mada/save_features.py --domain source --checkpoint {base}/mada/warmup/model.pth "
         "--out {base}/mada/features/source_warmup", "{base}/mada/features/source_warmup/final.json"),
        ("{py} mada/save_features.py --domain target --checkpoint {base}/mada/warmup/model.pth "
         "--out {base}/mada/features/target_warmup", "{base}/mada/features/target_warmup/final.json"),
        ("{py} mada/cluster_anchors.py --seed {seed} --features {base}/mada/features/source_warmup "
         "--out {base}/mada/anchors/source_warmup", "{base}/mada/anchors/source_warmup/final.json"),
        ("{py} mada/select_active.py --criterion mada --features {base}/mada/features/target_warmup "
         "--source-anchors {base}/mada/anchors/source_warmup --out {base}/mada/select_mada",
         "{base}/mada/select_mada/final.json"),
        ("{py} mada/train_stage1.py --seed {seed} --init-from {base}/mada/warmup/model.pth "
         "--selection {base}/mada/select_mada --out {base}/mada/stage1_mada", "{base}/mada/stage1_mada/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage1_mada/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADA stage 2 (5% images)", method="mada", labels="5% of target images (20)",
         control="MADA stage 2, target losses weighted 0 (control)", steps=[
        ("{py} mada/save_features.py --domain target --checkpoint {base}/mada/stage1_mada/model.pth "
         "--out {base}/mada/features/target_stage1_mada", "{base}/mada/features/target_stage1_mada/final.json"),
        ("{py} mada/cluster_anchors.py --seed {seed} --features {base}/mada/features/target_stage1_mada "
         "--out {base}/mada/anchors/target_stage1_mada", "{base}/mada/anchors/target_stage1_mada/final.json"),
        ("{py} mada/train_stage2.py --seed {seed} --init-from {base}/mada/stage1_mada/model.pth "
         "--anchors {base}/mada/anchors/target_stage1_mada --selection {base}/mada/select_mada "
         "--out {base}/mada/stage2_mada", "{base}/mada/stage2_mada/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage2_mada/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # Control of stage 2: the same script from the same stage-1 model, with its target terms (pseudo-label CE and
    # the anchor loss) weighted 0: active + source CE for the same iterations, target batches still forwarded
    # (BN statistics). Stage 2 minus this row is what the pseudo labels and anchors add. Extra (with the TUFL
    # control below): the 43 default rows already take ~39 min a seed on 2 cores; both are in the published table.
    dict(name="MADA stage 2, target losses weighted 0 (control)", method="mada", labels="5% of target images (20)",
         extra=True, steps=[
        ("{py} mada/save_features.py --domain target --checkpoint {base}/mada/stage1_mada/model.pth "
         "--out {base}/mada/features/target_stage1_mada", "{base}/mada/features/target_stage1_mada/final.json"),
        ("{py} mada/cluster_anchors.py --seed {seed} --features {base}/mada/features/target_stage1_mada "
         "--out {base}/mada/anchors/target_stage1_mada", "{base}/mada/anchors/target_stage1_mada/final.json"),
        ("{py} mada/train_stage2.py --seed {seed} --lambda-pseudo 0 --lambda-anchor 0 "
         "--init-from {base}/mada/stage1_mada/model.pth --anchors {base}/mada/anchors/target_stage1_mada "
         "--selection {base}/mada/select_mada --out {base}/mada/stage2_mada_w0", "{base}/mada/stage2_mada_w0/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage2_mada_w0/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # Ablation (issue 14): absent classes masked out of the anchor distance instead of upstream's zero rows.
    dict(name="MADA stage 1, absent classes masked (ablation)", method="mada", labels="5% of target images (20)",
         extra=True, steps=[
        ("{py} mada/cluster_anchors.py --seed {seed} --absent mask --features {base}/mada/features/source_warmup "
         "--out {base}/mada/anchors/source_warmup_mask", "{base}/mada/anchors/source_warmup_mask/final.json"),
        ("{py} mada/select_active.py --criterion mada --absent mask --features {base}/mada/features/target_warmup "
         "--source-anchors {base}/mada/anchors/source_warmup_mask --out {base}/mada/select_mada_mask",
         "{base}/mada/select_mada_mask/final.json"),
        ("{py} mada/train_stage1.py --seed {seed} --init-from {base}/mada/warmup/model.pth "
         "--selection {base}/mada/select_mada_mask --out {base}/mada/stage1_mada_mask",
         "{base}/mada/stage1_mada_mask/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage1_mada_mask/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADA stage 2, absent classes masked (ablation)", method="mada", labels="5% of target images (20)",
         extra=True, steps=[
        ("{py} mada/save_features.py --domain target --checkpoint {base}/mada/stage1_mada_mask/model.pth "
         "--out {base}/mada/features/target_stage1_mada_mask", "{base}/mada/features/target_stage1_mada_mask/final.json"),
        ("{py} mada/cluster_anchors.py --seed {seed} --absent mask --features {base}/mada/features/target_stage1_mada_mask "
         "--out {base}/mada/anchors/target_stage1_mada_mask", "{base}/mada/anchors/target_stage1_mada_mask/final.json"),
        ("{py} mada/train_stage2.py --seed {seed} --absent mask --init-from {base}/mada/stage1_mada_mask/model.pth "
         "--anchors {base}/mada/anchors/target_stage1_mada_mask --selection {base}/mada/select_mada_mask "
         "--out {base}/mada/stage2_mada_mask", "{base}/mada/stage2_mada_mask/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage2_mada_mask/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADAv2 step 1 (5% images, CE)", method="mada", labels="5% of target images (20)",
         control="Random 5% images + MADA stage 1",
         selection=("mada", "{base}/mada/select_madav2"), steps=[
        ("{py} mada/cluster_anchors.py --seed {seed} --features {base}/mada/features/target_warmup "
         "--out {base}/mada/anchors/target_warmup", "{base}/mada/anchors/target_warmup/final.json"),
        ("{py} mada/select_active.py --criterion madav2 --features {base}/mada/features/target_warmup "
         "--source-anchors {base}/mada/anchors/source_warmup --target-anchors {base}/mada/anchors/target_warmup "
         "--out {base}/mada/select_madav2", "{base}/mada/select_madav2/final.json"),
        ("{py} mada/train_stage1.py --seed {seed} --init-from {base}/mada/warmup/model.pth "
         "--selection {base}/mada/select_madav2 --out {base}/mada/stage1_madav2",
         "{base}/mada/stage1_madav2/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage1_madav2/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADAv2 step 2 (5% images, semi-sup.)", method="mada", labels="5% of target images (20)", steps=[
        ("{py} mada/save_features.py --domain target --checkpoint {base}/mada/stage1_madav2/model.pth "
         "--out {base}/mada/features/target_stage1_madav2", "{base}/mada/features/target_stage1_madav2/final.json"),
        ("{py} mada/cluster_anchors.py --seed {seed} --features {base}/mada/features/target_stage1_madav2 "
         "--out {base}/mada/anchors/target_stage1_madav2", "{base}/mada/anchors/target_stage1_madav2/final.json"),
        ("{py} mada/train_stage2_semi.py --seed {seed} --init-from {base}/mada/stage1_madav2/model.pth "
         "--anchors {base}/mada/anchors/target_stage1_madav2 --selection {base}/mada/select_madav2 "
         "--out {base}/mada/stage2_semi_madav2", "{base}/mada/stage2_semi_madav2/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage2_semi_madav2/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="Random 5% images + MADA stage 1", method="mada", labels="5% of target images (20, random)",
         selection=("mada", "{base}/mada/select_random"), steps=[
        ("{py} mada/select_active.py --criterion random --seed {seed} --features {base}/mada/features/target_warmup "
         "--out {base}/mada/select_random", "{base}/mada/select_random/final.json"),
        ("{py} mada/train_stage1.py --seed {seed} --init-from {base}/mada/warmup/model.pth "
         "--selection {base}/mada/select_random --out {base}/mada/stage1_random",
         "{base}/mada/stage1_random/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage1_random/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- d2ada ----
    dict(name="D2ADA warm-up (UDA, AdaptSegNet)", method="d2ada", labels="none",
         control="D2ADA source only (sup. warm-up, DeepLabV3+)", steps=[
        ("{py} d2ada/superpixels.py --summary {base}/d2ada_superpixels.json", "{base}/d2ada_superpixels.json"),
        ("{py} d2ada/warmup.py --seed {seed} --out {base}/d2ada_warmup", "{base}/d2ada_warmup/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_warmup/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # D2ADA's own gap references: the same DeepLabV3+ trained on the source alone (sup_warmup, the warm-up's 300
    # iterations), and on all 400 labelled target train images for the whole budget (warm-up 300 + 5 rounds x 60).
    dict(name="D2ADA source only (sup. warm-up, DeepLabV3+)", method="d2ada", labels="none", steps=[
        ("{py} d2ada/warmup.py --warmup sup_warmup --seed {seed} --out {base}/d2ada_sup_warmup",
         "{base}/d2ada_sup_warmup/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_sup_warmup/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="D2ADA oracle (DeepLabV3+, target labels)", method="d2ada", labels="100% (all target train)", steps=[
        ("{py} d2ada/warmup.py --warmup sup_warmup --source toy_cityscapes --iters 600 --seed {seed} "
         "--out {base}/d2ada_oracle", "{base}/d2ada_oracle/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_oracle/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="D2ADA (5 rounds, 5% target pixels)", method="d2ada", labels="5% of target pixels (regions)",
         control="D2ADA baseline: random regions (5%)",
         selection=("d2ada", "{base}/d2ada_ada"), steps=[
        ("{py} d2ada/train_ada.py --seed {seed} --init-from {base}/d2ada_warmup/model.pth --out {base}/d2ada_ada",
         "{base}/d2ada_ada/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_ada/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    *[dict(name=f"D2ADA after round {r} ({r}% target pixels)", method="d2ada", labels=f"{r}% of target pixels",
           steps=[("{py} d2ada/test.py --checkpoint {base}/d2ada_ada/checkpoint%02d.pth --split test --out {run}/eval" % r,
                   "{run}/eval/final.json")], result="{run}/eval/final.json") for r in (1, 2, 3, 4)],
    dict(name="D2ADA baseline: random regions (5%)", method="d2ada", labels="5% of target pixels (regions)",
         selection=("d2ada", "{base}/d2ada_random"), steps=[
        ("{py} d2ada/train_ada.py --selection random --seed {seed} --init-from {base}/d2ada_warmup/model.pth "
         "--out {base}/d2ada_random", "{base}/d2ada_random/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_random/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="D2ADA baseline: uncertainty only (5%)", method="d2ada", labels="5% of target pixels (regions)",
         control="D2ADA baseline: random regions (5%)", extra=True,
         selection=("d2ada", "{base}/d2ada_uncertainty"), steps=[
        ("{py} d2ada/train_ada.py --selection uncertainty --seed {seed} --init-from {base}/d2ada_warmup/model.pth "
         "--out {base}/d2ada_uncertainty", "{base}/d2ada_uncertainty/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_uncertainty/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # Ablation (ours, issue 14): the class-conditional densities fitted on a 32-d PCA of the region features.
    dict(name="D2ADA ablation (ours): density on a 32-d PCA (5%)", method="d2ada",
         labels="5% of target pixels (regions)", extra=True, steps=[
        ("{py} d2ada/train_ada.py --density-pca 32 --seed {seed} --init-from {base}/d2ada_warmup/model.pth "
         "--out {base}/d2ada_pca32", "{base}/d2ada_pca32/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_pca32/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- madan ----
    # MADAN (16 classes: toy_synthia + toy_gta5 -> toy_cityscapes). Steps shared between these pipelines live
    # in {base}/madan/ and are skipped once done (their final.json exists), so each runs once per seed.
    dict(name="MADAN: single source toy_synthia (no adapt.)", method="madan", labels="none", steps=[
        ("{py} madan/train_classifiers.py --seed {seed} --out {base}/madan/classifiers",
         "{base}/madan/classifiers/toy_gta5/final.json"),
        ("{py} madan/test.py --checkpoint {base}/madan/classifiers/toy_synthia/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADAN: single source toy_gta5 (no adapt.)", method="madan", labels="none", steps=[
        ("{py} madan/train_classifiers.py --seed {seed} --out {base}/madan/classifiers",
         "{base}/madan/classifiers/toy_gta5/final.json"),
        ("{py} madan/test.py --checkpoint {base}/madan/classifiers/toy_gta5/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADAN: both sources combined (no adapt.)", method="madan", labels="none", steps=[
        ("{py} madan/train_segmenter.py --seed {seed} --out {base}/madan/combined", "{base}/madan/combined/final.json"),
        ("{py} madan/test.py --checkpoint {base}/madan/combined/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # The control of the feature-level rows (ADDA, MDAN forward target batches in train mode): the combined model
    # with its BN statistics re-estimated on the target (AdaBN), no training.
    dict(name="MADAN: combined + AdaBN (target BN statistics)", method="madan", labels="none", steps=[
        ("{py} madan/train_segmenter.py --seed {seed} --out {base}/madan/combined", "{base}/madan/combined/final.json"),
        ("{py} madan/test.py --adabn --checkpoint {base}/madan/combined/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADAN: pixel level (DSC+SAD+CCD)", method="madan", labels="none",
         control="MADAN: both sources combined (no adapt.)", steps=[
        ("{py} madan/train_classifiers.py --seed {seed} --out {base}/madan/classifiers",
         "{base}/madan/classifiers/toy_gta5/final.json"),
        ("{py} madan/train_translation.py --seed {seed} --out {base}/madan/translation --classifiers "
         "{base}/madan/classifiers/toy_synthia/model.pth,{base}/madan/classifiers/toy_gta5/model.pth",
         "{base}/madan/translation/final.json"),
        ("{py} madan/translate.py --checkpoint {base}/madan/translation/model.pth --out {base}/madan/translated",
         "{base}/madan/translated/translate.json"),
        ("{py} madan/train_segmenter.py --seed {seed} --out {base}/madan/segmenter --source-root "
         "{base}/madan/translated/toy_synthia,{base}/madan/translated/toy_gta5", "{base}/madan/segmenter/final.json"),
        ("{py} madan/test.py --checkpoint {base}/madan/segmenter/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADAN: pixel + feature level (ADDA)", method="madan", labels="none",
         control="MADAN: combined + AdaBN (target BN statistics)", steps=[
        ("{py} madan/train_classifiers.py --seed {seed} --out {base}/madan/classifiers",
         "{base}/madan/classifiers/toy_gta5/final.json"),
        ("{py} madan/train_translation.py --seed {seed} --out {base}/madan/translation --classifiers "
         "{base}/madan/classifiers/toy_synthia/model.pth,{base}/madan/classifiers/toy_gta5/model.pth",
         "{base}/madan/translation/final.json"),
        ("{py} madan/translate.py --checkpoint {base}/madan/translation/model.pth --out {base}/madan/translated",
         "{base}/madan/translated/translate.json"),
        ("{py} madan/train_segmenter.py --seed {seed} --out {base}/madan/segmenter --source-root "
         "{base}/madan/translated/toy_synthia,{base}/madan/translated/toy_gta5", "{base}/madan/segmenter/final.json"),
        ("{py} madan/train_adda.py --seed {seed} --out {base}/madan/adda --init-from {base}/madan/segmenter/model.pth "
         "--source-root {base}/madan/translated/toy_synthia,{base}/madan/translated/toy_gta5",
         "{base}/madan/adda/final.json"),
        ("{py} madan/test.py --checkpoint {base}/madan/adda/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MDAN (2 sources)", method="madan", labels="none",
         control="MADAN: combined + AdaBN (target BN statistics)", steps=[
        ("{py} madan/train_segmenter.py --seed {seed} --out {base}/madan/combined", "{base}/madan/combined/final.json"),
        ("{py} madan/train_mdan.py --seed {seed} --out {base}/madan/mdan --init-from {base}/madan/combined/model.pth",
         "{base}/madan/mdan/final.json"),
        ("{py} madan/test.py --checkpoint {base}/madan/mdan/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADAN: oracle (target labels, 16 cl.)", method="madan", labels="100% (all target train)", steps=[
        ("{py} madan/train_segmenter.py --seed {seed} --source toy_cityscapes --num-classes 16 "
         "--out {base}/madan/oracle16", "{base}/madan/oracle16/final.json"),
        ("{py} madan/test.py --checkpoint {base}/madan/oracle16/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- ssada ----
    # SS-ADA rows: BiSeNetV1-R18 from scratch, toy GTA5-style source -> toy Cityscapes-style target.
    dict(name="SS-ADA: source only (BiSeNet)", method="ssada", labels="none", steps=[
        ("{py} ssada/train_ssada.py --source-only --seed {seed} --out {base}/ssada_source",
         "{base}/ssada_source/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_source/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: Entropy-IoU 5%", method="ssada", labels="5% of target images",
         control="SS-ADA: random 5%",
         selection=("ssada", "{base}/ssada_entropy_iou_5"), steps=[
        ("{py} ssada/train_ssada.py --strategy entropy_iou --total-ratio 0.05 --seed {seed} --out {base}/ssada_entropy_iou_5",
         "{base}/ssada_entropy_iou_5/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_entropy_iou_5/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: Entropy-IoU 10%", method="ssada", labels="10% of target images",
         control="SS-ADA: random 10%",
         selection=("ssada", "{base}/ssada_entropy_iou_10"), steps=[
        ("{py} ssada/train_ssada.py --strategy entropy_iou --total-ratio 0.1 --seed {seed} --out {base}/ssada_entropy_iou_10",
         "{base}/ssada_entropy_iou_10/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_entropy_iou_10/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: Entropy-IoU 25%", method="ssada", labels="25% of target images",
         control="SS-ADA: random 25%", extra=True,
         selection=("ssada", "{base}/ssada_entropy_iou_25"), steps=[
        ("{py} ssada/train_ssada.py --strategy entropy_iou --total-ratio 0.25 --seed {seed} --out {base}/ssada_entropy_iou_25",
         "{base}/ssada_entropy_iou_25/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_entropy_iou_25/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: random 5%", method="ssada", labels="5% of target images",
         selection=("ssada", "{base}/ssada_random_5"), steps=[
        ("{py} ssada/train_ssada.py --strategy random --total-ratio 0.05 --seed {seed} --out {base}/ssada_random_5",
         "{base}/ssada_random_5/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_random_5/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: random 10%", method="ssada", labels="10% of target images",
         selection=("ssada", "{base}/ssada_random_10"), steps=[
        ("{py} ssada/train_ssada.py --strategy random --total-ratio 0.1 --seed {seed} --out {base}/ssada_random_10",
         "{base}/ssada_random_10/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_random_10/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: random 25%", method="ssada", labels="25% of target images", extra=True,
         selection=("ssada", "{base}/ssada_random_25"), steps=[
        ("{py} ssada/train_ssada.py --strategy random --total-ratio 0.25 --seed {seed} --out {base}/ssada_random_25",
         "{base}/ssada_random_25/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_random_25/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: oracle 100% (BiSeNet)", method="ssada", labels="100% (all target train)", steps=[
        ("{py} ssada/train_ssada.py --init-ratio 1 --total-ratio 1 --seed {seed} --out {base}/ssada_oracle",
         "{base}/ssada_oracle/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_oracle/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # TUFL rows: toy Cityscapes-style source (13 classes) -> toy CrossCity-style target (Test split).
    # The source-only row evaluates the phase-1 model of the same TUFL run.
    dict(name="TUFL: source only (toy CS->CrossCity)", method="ssada", ref="tufl", labels="none", steps=[
        ("{py} ssada/train_tufl.py --seed {seed} --out {base}/tufl", "{base}/tufl/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/tufl/source_model.pth --target toy_crosscity --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="TUFL: focal, fixed tau (toy CS->CrossCity)", method="ssada", ref="tufl", labels="none",
         control="TUFL: focal weighted 0 (control)", steps=[
        ("{py} ssada/train_tufl.py --seed {seed} --out {base}/tufl", "{base}/tufl/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/tufl/model.pth --target toy_crosscity --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # Control of the focal loss: the same run (same phase 1, same phase-2 batches, target views still forwarded)
    # with lambda_u = 0, i.e. phase 2 is continued supervised source training.
    dict(name="TUFL: focal weighted 0 (control)", method="ssada", ref="tufl", labels="none", extra=True, steps=[
        ("{py} ssada/train_tufl.py --unsup-coeff 0 --seed {seed} --out {base}/tufl_w0", "{base}/tufl_w0/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/tufl_w0/model.pth --target toy_crosscity --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="TUFL: focal, adaptive tau (toy CS->CrossCity)", method="ssada", ref="tufl", labels="none",
         control="TUFL: focal, fixed tau (toy CS->CrossCity)", steps=[
        ("{py} ssada/train_tufl.py --thresholds adaptive --seed {seed} --out {base}/tufl_adaptive",
         "{base}/tufl_adaptive/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/tufl_adaptive/model.pth --target toy_crosscity --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
]


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def fmt_of(p, seed, out):
    """The values substituted into a pipeline's commands for one seed."""
    base = out / f"seed{seed}"
    return dict(py=PY, seed=seed, run=base / slug(p["name"]), base=base)


def shown(cmd):
    """A command as a person would type it: `python` and paths relative to the repository."""
    return cmd.replace(PY, "python").replace(str(ROOT) + os.sep, "")


def human(seconds):
    """Seconds as 1h02m / 4m05s / 12s."""
    if seconds is None or seconds != seconds:
        return "?"
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---- live progress: read from each running step's own log.jsonl --------------------------------------------
def schedule_length(cfg):
    """Total iterations of a run from its config.json, None where the config does not fix it. Most scripts
    stop at --stop-iter (= --iters unless given); the others need their own product."""
    def num(k):
        v = cfg.get(k)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    if num("source_iters") and num("iters"):  # ssada/train_tufl.py: source phase + adaptation phase
        total = num("source_iters") + num("iters")
    elif num("epochs") and num("epoch_iters"):  # ssada/train_ssada.py with a fixed epoch length (the toy preset)
        total = num("epochs") * num("epoch_iters")
    elif num("max_epoch") and num("epoch_iters"):  # madan/train_translation.py
        total = num("max_epoch") * num("epoch_iters")
    else:
        total = num("iters")
    stop = num("stop_iter")
    return min(stop, total) if stop and total else stop or total


class LogTail:
    """Follows the newest log.jsonl in a step's --out folder (or one level below it: madan/train_classifiers.py
    runs one sub-run per source) written since the step started, reading only the lines added since the last
    poll. Keeps the latest iteration, the run's total, the iteration rate and the latest validation mIoU. A
    record carrying "stop_iter" gives the total; otherwise the run's config.json does (schedule_length)."""

    def __init__(self, folder, since):
        self.folder, self.since = Path(folder), since
        self.path, self.offset, self.cfg_total, self.rounds, self.by_round = None, 0, None, None, False
        self.it = self.total = self.val = self.sub = None
        self.first = self.last = None  # (time, iteration) of the first and latest training record

    def poll(self):
        cands = [self.folder / "log.jsonl", *self.folder.glob("*/log.jsonl")]
        cands = [(p.stat().st_mtime, p) for p in cands if p.is_file() and p.stat().st_mtime >= self.since - 1]
        if not cands:
            return self
        path = max(cands)[1]
        if path != self.path:  # a new (sub-)run: start over
            self.__init__(self.folder, self.since)
            self.path = path
            self.sub = path.parent.name if path.parent != self.folder else None
        try:
            with open(path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return self
        if self.cfg_total is None and (path.parent / "config.json").exists():
            try:
                cfg = json.loads((path.parent / "config.json").read_text())
                self.cfg_total = schedule_length(cfg)
                self.rounds = cfg.get("rounds") if isinstance(cfg.get("rounds"), int) else None
            except ValueError:
                pass
        chunk = chunk[:chunk.rfind(b"\n") + 1]  # complete lines only (a line may be half-written)
        self.offset += len(chunk)
        for line in chunk.splitlines():
            try:
                self.record(json.loads(line))
            except ValueError:
                continue
        return self

    def record(self, r):
        if isinstance(r.get("stop_iter"), int):
            self.total = r["stop_iter"]
        if isinstance(r.get("val_mIoU"), (int, float)):
            self.val = r["val_mIoU"]
        if str(r.get("event", "")).startswith("resumed"):  # the rate is measured from here on
            self.first = None
        if isinstance(r.get("iter"), int) and "event" not in r:
            it = r["iter"]
            if isinstance(r.get("round"), int) and self.rounds and self.cfg_total:  # d2ada/train_ada.py: per round
                it += (r["round"] - 1) * self.cfg_total
                self.by_round = True
            self.it = it
            t = r.get("time", time.time())
            self.first = self.first or (t, it)
            self.last = (t, it)

    def progress(self):
        """(iteration, total, seconds left or None, latest validation mIoU or None)."""
        total = self.total or (self.cfg_total * self.rounds if self.by_round else self.cfg_total)
        eta = None
        if total and self.first and self.last and self.last[1] > self.first[1]:
            rate = (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])
            eta = max(0.0, (total - self.last[1]) * rate - (time.time() - self.last[0]))
        return self.it, total, eta, self.val


class Progress:
    """What the benchmark prints while it runs. Event lines (a step starts, ends, fails) are always printed.
    Live lines (one per running step: iteration / total, elapsed, ETA, latest val mIoU; then the overall
    "step k of n" with an ETA) are redrawn in place every second on a terminal, and printed as plain lines
    every `interval` seconds otherwise (CI, pipes, a file)."""

    def __init__(self, total_steps=0, estimates=None, jobs=1, stream=None, tty=None, interval=30.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = 1.0 if self.tty else interval
        self.total, self.estimates, self.jobs = total_steps, estimates or {}, jobs
        self.lock = threading.Lock()
        self.started = self.finished = 0
        self.t0 = time.time()
        self.running = {}  # (pipeline name, seed) -> dict(k, step, tail, t_step, t_pipe)
        self.ran = {}  # (pipeline name, seed) -> seconds, pipelines run whole in this session (ETA calibration)
        self.procs = set()  # running child processes (Ctrl-C is forwarded to them)
        self.stopping = False
        self.drawn, self.last_print = 0, 0.0

    # called from the pipeline threads
    def step_started(self, key, cmd, step_no, n_steps):
        with self.lock:
            self.started += 1
            now = time.time()
            out = re.search(r"--out\s+(\S+)", cmd)
            entry = self.running.setdefault(key, {"t_pipe": now})
            entry.update(k=self.started, step=f"step {step_no}/{n_steps} of the row", t_step=now,
                         script=Path(shlex.split(cmd)[1]).name if len(shlex.split(cmd)) > 1 else cmd,
                         tail=LogTail(out.group(1), now) if out else None)
            k = self.started
        self.message(f"[bench] step {k} of {self.total}: {key[0]} (seed {key[1]}) {entry['step']}: {shown(cmd)}")

    def step_finished(self, key, seconds, ok=True, log=None):
        with self.lock:
            e = self.running.get(key, {})
            self.finished += ok
            val = e["tail"].poll().val if e.get("tail") else None
        extra = f", last val mIoU {val:.1f}" if val is not None else ""
        if not ok and not self.stopping and log is not None and Path(log).exists():  # a failed step's last words
            # (not a stopped one's: those end in the KeyboardInterrupt / SIGTERM the stop sent it)
            last = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()][-2:]
            extra += f"; log {rel(log)} ends:" + "".join(f"\n    {ln[:300]}" for ln in last)
        self.message(f"[bench] {'done' if ok else 'stopped' if self.stopping else 'FAILED'} step {e.get('k', '?')} "
                     f"of {self.total} in {human(seconds)}: {key[0]} (seed {key[1]}){extra}")

    def pipeline_finished(self, key, timed=False):
        """timed: every step of the pipeline-seed ran now, so its time compares with the recorded one."""
        with self.lock:
            e = self.running.pop(key, None)
            if e and timed:
                self.ran[key] = time.time() - e["t_pipe"]

    # called from the main thread
    def eta(self, waiting):
        """Seconds left overall: the recorded per-row times of the pipeline-seeds not finished, scaled by how fast
        this session's finished pipelines ran against their records, divided among the jobs."""
        est = self.estimates
        done = [(s, est[k[0]]) for k, s in self.ran.items() if est.get(k[0])]
        scale = sum(s for s, _ in done) / sum(e for _, e in done) if done else 1.0
        left = sum(est.get(k[0], 0.0) * scale for k in waiting)
        now = time.time()
        for key, e in self.running.items():
            step_eta = e["tail"].progress()[2] if e.get("tail") else None
            left += max(est.get(key[0], 0.0) * scale - (now - e["t_pipe"]), step_eta or 0.0)
        return left / max(1, min(self.jobs, len(waiting) + len(self.running)))

    def lines(self, waiting=()):
        now, out = time.time(), []
        for key, e in sorted(self.running.items(), key=lambda kv: kv[1].get("k", 0)):
            if "k" not in e:
                continue
            it, total, eta, val = e["tail"].poll().progress() if e.get("tail") else (None, None, None, None)
            sub = f"/{e['tail'].sub}" if e.get("tail") and e["tail"].sub else ""
            parts = [f"[{e['k']}/{self.total}] {key[0]} s{key[1]} {e['script']}{sub}"]
            if it is not None:
                parts.append(f"it {it}/{total} {100 * it / total:.0f}%" if total else f"it {it}")
            parts.append(f"{human(now - e['t_step'])} elapsed")
            if eta is not None:
                parts.append(f"ETA {human(eta)}")
            if val is not None:
                parts.append(f"val mIoU {val:.1f}")
            out.append(" | ".join(parts))
        out.append(f"[bench] step {self.started} of {self.total} | {self.finished} done | "
                   f"{human(now - self.t0)} elapsed | ETA ~{human(self.eta(waiting))} overall")
        return out

    def refresh(self, waiting=(), force=False):
        with self.lock:
            now = time.time()
            if not force and now - self.last_print < self.interval:
                return
            self.last_print = now
            lines = self.lines(waiting)
            if self.tty:
                width = max(20, shutil.get_terminal_size().columns - 1)
                self._clear()
                self.stream.write("".join("\x1b[2K" + ln[:width] + "\n" for ln in lines))
                self.drawn = len(lines)
            else:
                self.stream.write("".join(ln + "\n" for ln in lines))
            self.stream.flush()

    def _clear(self):
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
        self.drawn = 0

    def close(self):
        with self.lock:
            self._clear()
            self.stream.flush()

    def message(self, text):
        with self.lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM while the benchmark runs; args[0] is the signal number."""


# ---- running -------------------------------------------------------------------------------------------------
def run_step(cmd, log_path, progress=None):
    """Run one command, its output appended to log_path; returns (seconds, peak RSS in MiB of the process tree's
    largest process). The child runs in its own process group: a Ctrl-C reaches the benchmark, which forwards
    it once to each running step."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {cmd}\n")
        log.flush()
        proc = subprocess.Popen(shlex.split(cmd), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, process_group=0,
                                env=STEP_ENV)
        if progress is not None:
            progress.procs.add(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if progress is not None:
                progress.procs.discard(proc.pid)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"step failed (exit {proc.returncode}): {shown(cmd)}\n  see {log_path}")
    return time.time() - t0, usage.ru_maxrss / 1024


def machine():
    """A short description of where the steps run (recorded per row: timings are only comparable within one)."""
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} + {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return f"{os.cpu_count()} CPU cores"


def run_pipeline(p, seed, out, progress=None):
    progress = progress or Progress(stream=open(os.devnull, "w"))
    fmt = fmt_of(p, seed, out)
    run = fmt["run"]
    run.mkdir(parents=True, exist_ok=True)
    stats_file = run / "bench.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"seconds": 0.0, "peak_mib": 0.0}
    stats["toy_version"] = int((STEP_ENV or os.environ).get("SEGDA_TOY_VERSION", 2))
    key = (p["name"], seed)
    whole, ok = not any(Path(done.format(**fmt)).exists() for _, done in p["steps"]), False
    try:
        for i, (cmd, done) in enumerate(p["steps"]):
            if Path(done.format(**fmt)).exists():
                continue
            if progress.stopping:
                raise RuntimeError("not started: the benchmark was interrupted")
            cmd = resumable(with_workers(cmd.format(**fmt)))
            progress.step_started(key, cmd, i + 1, len(p["steps"]))
            t0 = time.time()
            try:
                sec, mib = run_step(cmd, run / "log.txt", progress)
            except RuntimeError:
                progress.step_finished(key, time.time() - t0, ok=False, log=run / "log.txt")
                raise
            progress.step_finished(key, sec)
            stats["seconds"] += sec
            stats["peak_mib"] = max(stats["peak_mib"], mib)
            stats["machine"] = MACHINE
            stats["threads"] = (STEP_ENV or os.environ).get("OMP_NUM_THREADS")
            stats["workers"] = STEP_WORKERS
            stats_file.write_text(json.dumps(stats))
        ok = True
    finally:
        progress.pipeline_finished(key, timed=ok and whole)
    res = json.loads(Path(p["result"].format(**fmt)).read_text())
    return {"mIoU": res["mIoU"], **stats}


def with_workers(cmd, workers=None):
    """The step's command with `--workers N` (--workers of this benchmark) unless it sets its own or loads no
    images (NO_LOADER)."""
    workers = STEP_WORKERS if workers is None else workers
    if workers is None or "--workers" in cmd.split() or any(s in cmd for s in NO_LOADER):
        return cmd
    return f"{cmd} --workers {workers}"


def resumable(cmd):
    """An interrupted training step continues from its last checkpoint: `--resume` is added when the step's --out
    folder holds a checkpoint.pth (the step is not done, so that run was stopped or failed). Without it the script
    would start over and move the partial run aside."""
    out = re.search(r"--out\s+(\S+)", cmd)
    if out and (Path(out.group(1)) / "checkpoint.pth").exists() and "--resume" not in cmd.split():
        return cmd + " --resume"
    return cmd


def signal_steps(progress, sig):
    for pid in list(progress.procs):  # each step is its own process group (its data-loading workers included)
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass


def folders(p):
    """The {base}/<folder> names a pipeline's commands touch (its dependencies on earlier pipelines)."""
    return {m for cmd, done in p["steps"] for m in re.findall(r"\{base\}/([^/\s,]+)", cmd + " " + done)}


def written(p):
    """The {base}/<folder> names a pipeline's steps write (the first folder of each step's --out and done file)."""
    return {m for cmd, done in p["steps"] for m in re.findall(r"\{base\}/([^/\s,]+)",
                                                                " ".join(re.findall(r"--out\s+(\S+)", cmd)) + " " + done)}


def depends(later, earlier):
    """A pipeline waits for an earlier one when one of them writes a folder the other touches (two rows that only
    read the same source model run side by side; rows sharing a written step run in order, the step once)."""
    return bool(written(earlier) & folders(later) or written(later) & folders(earlier))


# ---- budget curves (issue 28): the same rows with their training stretched -------------------------------------
# The training steps whose length --budget-scale multiplies (d2ada/train_ada.py: the iterations of every round). Their
# --iters, --eval-every and --save-every become K x the script's TOY preset (read from the script, so the two cannot
# drift apart); the poly schedule runs over the new --iters, i.e. the same schedule stretched. Every folder a scaled
# step writes, and every folder written by a step that reads one of them, gets the suffix _x<K>, so that all scales
# share the unscaled steps (source model, warm-ups, features, selections of the warm-up model) in one OUT.
SCALED = ("advent_maxsquare/train_maxsquare.py", "advent_maxsquare/train_adaptseg.py",
          "advent_maxsquare/train_advent.py", "mada/train_stage1.py", "d2ada/train_ada.py")


# The long-budget preset (issue 28, `--budget long`): the rows of the families whose budget curve separated from its
# control on val by the rule stated before (benchmark/budget_curves.py), at the shortest such length; its 3-seed test
# table is published beside the default one (benchmark/results_x<K>.*), the default table does not change.
LONG = dict(scale=2, rows=("D2ADA warm-up (UDA, AdaptSegNet)", "D2ADA (5 rounds, 5% target pixels)",
                           "D2ADA baseline: random regions (5%)"))


def toy_preset(script):
    """The literal values of a script's TOY preset dict (its toy defaults), read from its source."""
    import ast
    for node in ast.parse((ROOT / script).read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TOY" for t in node.targets):
            out = {}
            for kw in node.value.keywords:
                try:
                    out[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:  # a name such as SOURCE_CKPT
                    pass
            return out
    raise ValueError(f"{script} has no TOY preset dict")


def scale_tag(k):
    return f"x{k:g}"


def budget_variant(pipelines, k, split="test"):
    """The pipelines with every SCALED training step run K times longer and evaluated on `split`: a changed row is
    renamed '<name> [x<K>]' (and '[..., val]' off the test split), its control likewise, so that every scale and
    split of a row keeps its own {run} folder and pairs with its own control. K = 1 on test: the rows unchanged."""
    if k <= 0:
        raise ValueError(f"--budget-scale must be positive, got {k}")
    renamed, out = {}, []  # folder under {base} (the --out of a step) -> its _x<K> name

    def rename(text):
        for old, new in renamed.items():
            text = re.sub(r"\{base\}/" + re.escape(old) + r"(?=[/\s,]|$)", "{base}/" + new, text)
        return text

    changed = set()
    for p in pipelines:
        steps, scaled_row = [], False
        for cmd, done in p["steps"]:
            script = cmd.split()[1]
            m = re.search(r"--out\s+\{base\}/(\S+)", cmd)
            reads_scaled = rename(cmd) != cmd
            if k != 1 and m and (script in SCALED or reads_scaled):
                renamed.setdefault(m.group(1), f"{m.group(1)}_{scale_tag(k)}")
            cmd, done = rename(cmd), rename(done)
            if k != 1 and script in SCALED:
                toy = toy_preset(script)
                cmd += f" --iters {max(1, round(k * toy['iters']))}"
                for key in ("eval_every", "save_every"):
                    if key in toy:
                        cmd += f" --{key.replace('_', '-')} {max(1, round(k * toy[key]))}"
            scaled_row |= cmd != p["steps"][len(steps)][0]
            if split != "test":
                cmd = cmd.replace("--split test", f"--split {split}")
            steps.append((cmd, done))
        tags = ([scale_tag(k)] if scaled_row else []) + ([split] if split != "test" else [])
        q = dict(p, steps=steps, result=rename(p["result"]))
        if p.get("selection"):
            q["selection"] = (p["selection"][0], rename(p["selection"][1]))
        if tags:
            q["name"] = f"{p['name']} [{', '.join(tags)}]"
            changed.add(p["name"])
        out.append(q)
    tag_of = {p["name"]: q["name"] for p, q in zip(pipelines, out)}
    for q in out:
        if q.get("control"):
            q["control"] = tag_of.get(q["control"], q["control"])
    return out


def run_parallel(chosen, seeds, out, jobs, progress=None):
    """Run pipeline-seeds `jobs` at a time; a pipeline-seed starts once every earlier chosen pipeline of its seed
    that shares a {base} folder with it has finished. With one job they run seed by seed in table order (a whole
    seed of the table is finished first); with more, seed by seed too, and within a seed the ready ones with the most
    (transitive) dependents start first (the long chains); a later seed's steps fill cores the current seed leaves idle. A failure skips its dependents and is reported at the end. Ctrl-C / SIGTERM
    (Interrupted from the signal handler) is forwarded to the running steps, which are awaited; then it is
    re-raised."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    progress = progress or Progress(stream=open(os.devnull, "w"))
    keys = [(i, s) for i in range(len(chosen)) for s in seeds]
    deps = {(i, s): {(j, s) for j in range(i) if depends(chosen[i], chosen[j])} for i, s in keys}
    dependents = {k: set() for k in keys}
    for k in reversed(sorted(keys)):  # later pipelines first, so a dependent's own set is complete
        for d in deps[k]:
            dependents[d] |= {k} | dependents[k]
    todo = sorted(keys, key=(lambda k: (k[1], k[0])) if jobs == 1 else (lambda k: (k[1], -len(dependents[k]), k[0])))
    done, failed, running = set(), {}, {}
    ex = ThreadPoolExecutor(jobs)
    try:
        while todo or running:
            for k in list(todo):
                if deps[k] & set(failed):
                    failed[k] = "skipped: depends on a failed pipeline"
                    todo.remove(k)
                elif deps[k] <= done and len(running) < jobs:
                    running[ex.submit(run_pipeline, chosen[k[0]], k[1], out, progress)] = k
                    todo.remove(k)
            if not running:
                break
            finished, _ = wait(running, timeout=progress.interval, return_when=FIRST_COMPLETED)
            for f in finished:
                k = running.pop(f)
                if f.exception() is None:
                    done.add(k)
                else:
                    failed[k] = str(f.exception())
            progress.refresh([(chosen[i]["name"], s) for i, s in todo])
    except (KeyboardInterrupt, Interrupted) as e:
        sig = e.args[0] if isinstance(e, Interrupted) else signal.SIGINT
        progress.stopping = True
        if progress.procs:
            progress.message(f"[bench] stopping: {signal.Signals(sig).name} sent to the running step(s), waiting for "
                             f"them to exit (Ctrl-C again kills them)")
        signal_steps(progress, sig)  # each step gets the signal once and stops on its own
        while True:
            try:
                ex.shutdown(wait=True)
                break
            except (KeyboardInterrupt, Interrupted):
                signal_steps(progress, signal.SIGKILL)
        raise Interrupted(sig) from None
    ex.shutdown(wait=True)
    progress.close()
    for (i, s), why in sorted(failed.items()):
        progress.message(f"[bench] FAILED {chosen[i]['name']} seed {s}: {why}")
    return not failed


# ---- the plan ------------------------------------------------------------------------------------------------
def recorded_times(out, version=3):
    """Per-row wall time of one seed (seconds) and the machine it was measured on: from the published table of this
    toy version, then from this output folder's own table (runs on this machine) where it has the row."""
    times = {}
    published = PUBLISHED if version == 3 else PUBLISHED.with_name("results_v2")
    for path in (published.with_suffix(".json"), out / "results.json"):
        try:
            rows = json.loads(path.read_text()) if path.exists() else []
        except ValueError:
            continue
        for r in rows:
            if isinstance(r.get("seconds"), (int, float)) and r["seconds"] == r["seconds"]:
                times[r["name"]] = (float(r["seconds"]), r.get("machine", "unknown machine"))
    return times


def plan(chosen, seeds, out):
    """What is left to run: pipeline-seeds not finished, and the number of distinct steps not done."""
    waiting, steps = [], set()
    for s in seeds:
        for p in chosen:
            fmt = fmt_of(p, s, out)
            if Path(p["result"].format(**fmt)).exists():
                continue
            waiting.append((p["name"], s))
            steps |= {str(Path(done.format(**fmt))) for _, done in p["steps"] if not Path(done.format(**fmt)).exists()}
    return waiting, len(steps)


def print_plan(chosen, seeds, out, jobs, dest, times):
    waiting, n_steps = plan(chosen, seeds, out)
    print(f"[bench] plan: {len(chosen)} rows x {len(seeds)} seed(s) {seeds} = {len(chosen) * len(seeds)} "
          f"pipeline-seeds; {len(chosen) * len(seeds) - len(waiting)} already finished in {rel(out)} (skipped), "
          f"{len(waiting)} to run: {n_steps} steps, {jobs} at a time (--list names the rows)")
    by_method = {}
    for p in chosen:
        m = by_method.setdefault(p["method"], [0, 0, 0.0, 0])
        m[0] += 1
        m[1] += len(p["steps"])
        m[2] += times[p["name"]][0] if p["name"] in times else 0.0
        m[3] += p["name"] not in times
    for name, (rows, steps, sec, unknown) in by_method.items():
        note = f" ({unknown} without a recorded time)" if unknown else ""
        print(f"[bench]   {name:18s} {rows:3d} rows {steps:4d} steps  ~{human(sec)} per seed{note}")
    left = sum(times[n][0] for n, _ in waiting if n in times)
    machines = {}
    for n, _ in waiting:
        if n in times:
            machines.setdefault(times[n][1], set()).add(n)
    other = {m: len(v) for m, v in machines.items() if m != MACHINE}
    note = "".join(f"; {c} of these rows were timed on {m}, not on this machine ({MACHINE}): their share is "
                   f"only indicative" for m, c in other.items())
    unknown = sorted({n for n, _ in waiting if n not in times})
    sources = ", ".join(rel(f) for f in (PUBLISHED.with_suffix(".json"), out / "results.json") if f.exists())
    print(f"[bench] estimate: ~{human(left)} on one job, from the recorded per-row wall times ({sources}){note}"
          + (f"; {len(unknown)} row(s) have no recorded time" if unknown else "")
          + (f"; with --jobs {jobs} about {human(left / jobs)} if the cores keep up" if jobs > 1 else ""))
    print(f"[bench] each row's log: {rel(out)}/seed<N>/<row>/log.txt; the table at the end: {rel(dest)}.md/.json/.png"
          + ("" if dest == PUBLISHED else f" (the published {rel(PUBLISHED)}.md changes only with --publish)"))
    print("[bench] Ctrl-C stops cleanly; the same command continues (finished steps are skipped, an interrupted "
          "training step resumes from its checkpoint)", flush=True)
    return waiting, n_steps


def rel(path):
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ---- the table -----------------------------------------------------------------------------------------------
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


# Reference rows for the "gap closed" column: (source-only row, oracle row) of the same network and label space.
REFS = {"advent_maxsquare": ("Source only", "Oracle (target labels)"),
        "mada": ("MADA warm-up (source only, DeepLabV3+)", "MADA oracle (DeepLabV3+, target labels)"),
        "d2ada": ("D2ADA source only (sup. warm-up, DeepLabV3+)", "D2ADA oracle (DeepLabV3+, target labels)"),
        "madan": ("MADAN: both sources combined (no adapt.)", "MADAN: oracle (target labels, 16 cl.)"),
        "ssada": ("SS-ADA: source only (BiSeNet)", "SS-ADA: oracle 100% (BiSeNet)"),
        # TUFL is another task (toy Cityscapes -> CrossCity, 13 classes) with no target-labelled oracle: no gap column
        "tufl": ("TUFL: source only (toy CS->CrossCity)", None)}


# The classes of toy v3's label shift (common/toy.py, DOMAINS_V3: several times more frequent in the targets than
# in the GTA5-style source, riders and bikes near-absent there): "rare-class IoU" is their mean IoU.
RARE = ("person", "rider", "truck", "bus", "motorcycle", "bicycle")


def diagnostics(p, fmt, res, version=2):
    """The mechanism diagnostics of one finished pipeline-seed (written to its diagnostics.json):
    target_entropy: mean normalised prediction entropy on the evaluated split (common/evaluate.py);
    rare_iou: mean IoU of RARE (those of them in the label space); dom_acc: the discriminator's accuracy over the
    last quarter of training (last gate window for ADDA), read from the training run's final.json, for the
    adversarial rows; and for the active rows (p["selection"]) benchmark/selection_histogram.py's
    selection_stats: the selected pixels' class-share distance from the target's, their share of RARE classes
    and the share drawn from toy v3's hard city, each beside the target split's own value."""
    last = res.get("last", {})
    per = last.get("per_class", {})
    rare = [per[c] for c in RARE if per.get(c) is not None]
    d = {"target_entropy": last.get("confidence", {}).get("mean_entropy"),
         "rare_iou": round(sum(rare) / len(rare), 2) if rare else None}
    ckpt = re.search(r"--checkpoint\s+(\S+)", p["steps"][-1][0])
    if ckpt and "--ensemble" not in p["steps"][-1][0]:
        train_final = Path(ckpt.group(1).format(**fmt)).parent / "final.json"
        if train_final.exists():
            diag = json.loads(train_final.read_text()).get("diagnostics") or {}
            acc = diag.get("dom_acc_last_quarter", diag.get("dom_acc_last_window"))
            if acc is not None:
                d["dom_acc"] = acc
    if p.get("selection"):
        from benchmark.selection_histogram import selection_stats
        from common.labels import class_names
        from common.toy import toy_root
        kind, folder = p["selection"]
        names = class_names(19)
        stats = selection_stats(folder.format(**fmt), kind, toy_root(version=version) / "toy_cityscapes",
                                rare=[names.index(c) for c in RARE])
        if stats:
            d.update(stats)
    return d


def collect(p, seed, out, version=None):
    """The finished result of one pipeline-seed on disk, or None (also when it was run on another toy version than
    `version`). Its diagnostics are computed once and kept in the row's diagnostics.json."""
    fmt = fmt_of(p, seed, out)
    res = Path(p["result"].format(**fmt))
    if not res.exists():
        return None
    stats_file = fmt["run"] / "bench.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"seconds": float("nan"), "peak_mib": 0}
    stats.setdefault("machine", "2 CPU cores")  # rows measured before machines were recorded: the project's machine
    stats.setdefault("toy_version", 2)  # rows measured before toy v3
    if version is not None and stats["toy_version"] != version:
        return None
    result = json.loads(res.read_text())
    diag_file = fmt["run"] / "diagnostics.json"
    if diag_file.exists() and diag_file.stat().st_mtime >= res.stat().st_mtime:
        diag = json.loads(diag_file.read_text())
    else:
        diag = diagnostics(p, fmt, result, stats["toy_version"])
        diag_file.write_text(json.dumps(diag, indent=1))
    return {"mIoU": result["mIoU"], **stats, "diagnostics": diag}


def seeds_on_disk(out):
    return sorted(int(d.name[4:]) for d in Path(out).glob("seed*") if d.name[4:].isdigit())


def table(out, seeds, version=None, pipelines=None):
    """One row per pipeline with at least one finished seed among `seeds` in OUT (run on toy `version`)."""
    rows, by_seed = [], {}
    for p in pipelines or PIPELINES:
        per_seed = {s: r for s in seeds if (r := collect(p, s, out, version)) is not None}
        if not per_seed:
            continue
        by_seed[p["name"]] = {s: r["mIoU"] for s, r in per_seed.items()}
        m = [r["mIoU"] for r in per_seed.values()]
        secs = [r["seconds"] for r in per_seed.values() if r["seconds"] == r["seconds"]]
        rows.append({"name": p["name"], "method": p["method"], "labels": p["labels"], "n": len(m),
                     "seeds": sorted(per_seed), "mean": statistics.mean(m),
                     "std": statistics.stdev(m) if len(m) > 1 else 0.0,
                     "seconds": statistics.mean(secs) if secs else float("nan"),
                     "peak_mib": max(r["peak_mib"] for r in per_seed.values()), "per_seed": m,
                     "machine": " / ".join(sorted({r["machine"] for r in per_seed.values()})),
                     "toy_version": per_seed[min(per_seed)]["toy_version"],
                     "diagnostics": mean_diagnostics([r["diagnostics"] for r in per_seed.values()]),
                     "ref": p.get("ref", p["method"])})
        rows[-1]["_control"] = p.get("control")
    for r in rows:  # the row minus its control, seed by seed (same seed = same source model / warm-up / draw)
        name = r.pop("_control")
        ctrl = by_seed.get(name, {})
        both = [s for s in r["seeds"] if s in ctrl]
        if both:
            diff = [by_seed[r["name"]][s] - ctrl[s] for s in both]
            r["vs_control"] = {"control": name, "seeds": both, "per_seed": diff, "mean": statistics.mean(diff)}
    return rows


def mean_diagnostics(ds):
    """Per-key mean over seeds of the diagnostics dicts (keys with a value in at least one seed)."""
    keys = {k for d in ds for k, v in d.items() if v is not None}
    return {k: round(statistics.mean(d[k] for d in ds if d.get(k) is not None), 4) for k in sorted(keys)}


def diagnostics_table(rows):
    """Markdown: the mechanism diagnostics of the rows that have them (means over seeds)."""
    cols = [("target_entropy", "target entropy", 1), ("rare_iou", "rare-class IoU", 0),
            ("dom_acc", "D accuracy (end)", 1), ("class_tv", "selected: class TV", 1),
            ("rare_share", "selected: rare-class pixels", 1), ("hard_share", "selected: from hard city", 1)]
    lines = ["| row | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        d = r.get("diagnostics") or {}
        if not d:
            continue
        cell = []
        for k, _, pct in cols:
            v = d.get(k)
            if v is None:
                cell.append("")
            elif k in ("rare_share", "hard_share") and d.get(k + "_target") is not None:
                cell.append(f"{100 * v:.0f}% (target {100 * d[k + '_target']:.0f}%)")
            else:
                cell.append(f"{100 * v:.0f}%" if pct else f"{v:.1f}")
        lines.append(f"| {r['name']} | " + " | ".join(cell) + " |")
    return "\n".join(lines)


def report(out, seeds, dest, version=None, pipelines=None, split="test"):
    """Aggregate the finished results in OUT (of the seeds given: every seed<N> there after a run, and for --report
    unless --seeds is given) into DEST.md/.json/.png.
    Publishing (DEST = the committed benchmark/results) replaces the published rows this run has and keeps the
    others. Nothing finished: says so and writes nothing. Returns whether a table was written."""
    pipelines = pipelines or PIPELINES
    rows = table(out, seeds, version, pipelines)
    if not rows:
        print(f"[bench] no finished row in {rel(out)} for seed(s) {seeds}: nothing written "
              f"(the published table is {rel(PUBLISHED)}.md)", flush=True)
        return False
    publishing = dest.parent == PUBLISHED.parent  # benchmark/results (v3) or benchmark/results_v2
    if publishing and dest.with_suffix(".json").exists():
        new = {r["name"] for r in rows}
        old = {r["name"]: r for r in json.loads(dest.with_suffix(".json").read_text())
               if r.get("toy_version", 2) == rows[0].get("toy_version", 2)}
        kept = [n for n in old if n not in new and any(p["name"] == n for p in pipelines)]
        dropped = [n for n in old if not any(p["name"] == n for p in pipelines)]
        order = {p["name"]: i for i, p in enumerate(pipelines)}
        rows = sorted(rows + [old[n] for n in kept], key=lambda r: order[r["name"]])
        if kept:
            print(f"[bench] publishing {len(new)} row(s); {len(kept)} published row(s) this run did not produce are "
                  f"kept as they were: {', '.join(kept)}")
        if dropped:
            print(f"[bench] dropped from the published table (no longer benchmark rows): {', '.join(dropped)}")
        fewer = [f"{r['name']} ({old[r['name']]['n']} -> {r['n']})" for r in rows
                 if r["name"] in new and r["name"] in old and r["n"] < old[r["name"]].get("n", 0)]
        if fewer:
            print(f"[bench] note: {len(fewer)} published row(s) now have fewer seeds than before: {', '.join(fewer)}")
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        src, orc = (by_name.get(n) for n in REFS.get(r["ref"], ("", "")))
        r["gap_closed"] = ((r["mean"] - src["mean"]) / (orc["mean"] - src["mean"])
                           if src and orc and orc["mean"] != src["mean"] else None)
    lines = [f"| method | folder | target labels used | toy {split} mIoU | per seed | gap closed | minus its control, paired "
             "| wall time / seed | peak RSS | machine |", "|---|---|---|---|---|---|---|---|---|---|"]
    controls = {}
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        vc = r.get("vs_control")
        if vc:
            n = controls.setdefault(vc["control"], len(controls) + 1)
            vs = (f"{vc['mean']:+.1f} ({', '.join(f'{d:+.1f}' for d in vc['per_seed'])}) vs [c{n}]")
        else:
            vs = ""
        per = ", ".join(f"{v:.1f}" for v in r["per_seed"])
        peak = "n/a" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f} MiB"
        lines.append(f"| {r['name']} | `{r['method']}` | {r['labels']} | {r['mean']:.1f} +- {r['std']:.1f} "
                     f"(n={r['n']}) | {per} | {gap} | {vs} | {r['seconds'] / 60:.1f} min | {peak} | {r['machine']} |")
    versions = sorted({r.get("toy_version", 2) for r in rows})
    md = "\n".join(lines) + (
        f"\n\nToy domains v{'/'.join(map(str, versions))}. "
        f"Seeds: {seeds}; n = seeds finished. mIoU on the "
        + ("held-out toy test split" if split == "test" else f"toy {split} split (not the held-out test split)")
        + ". Gap closed = "
        "(row - source-only) / (oracle - source-only), with the source-only and oracle rows of the same network "
        "and label space (DeepLabV2-R18 for advent_maxsquare; DeepLabV3+-R18 for mada and d2ada; the MADAN and "
        "SS-ADA rows use their own). Wall time: steps of that pipeline actually run for it (steps shared with an earlier "
        f"row count once, there); wall times compare only between rows of the same machine (rows run with --jobs "
        "shared that machine with other rows).\n")
    if controls:
        md += ("\nMinus its control, paired: the row's mIoU minus its control's at the same seed (same source model, "
               "warm-up or initial draw), mean and per seed; controls: "
               + "; ".join(f"[c{n}] {name}" for name, n in controls.items()) + ".\n")
    if any(r.get("diagnostics") for r in rows):
        md += ("\nMechanism diagnostics (means over the seeds; `diagnostics.json` in each row's folder): target "
               "entropy = mean normalised prediction entropy on the evaluated split; rare-class IoU = mean IoU of "
               f"{', '.join(RARE)} (toy v3's label-shift classes); D accuracy = the discriminator's accuracy on "
               "source vs target output maps over the last quarter of training (50% = it cannot tell them apart); "
               "selected: the labelled pixels an active selector chose (total-variation distance of their class "
               "shares from the target train split's; their share of the rare classes; the share from the hard "
               "city), beside the target split's own value.\n\n" + diagnostics_table(rows) + "\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", md), (".json", json.dumps(rows, indent=2))):
        tmp = dest.with_name(dest.name + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, dest.with_name(dest.name + suffix))
    bar_chart(rows, str(dest) + ".png")
    print(md)
    print(f"[bench] table written: {rel(dest)}.md, .json, .png"
          + (" (published)" if publishing else f"; the published {rel(PUBLISHED)}.md is unchanged "
             "(--publish updates it)"), flush=True)
    return True


# ---- command line --------------------------------------------------------------------------------------------
def _on_sigterm(signum, frame):
    raise Interrupted(signum)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds to run (default: 0, one seed of every row; `--seeds 0 1 2` for the published three). "
                    "The table covers every seed finished in OUT; with --report, --seeds picks the seeds it covers")
    ap.add_argument("--only", nargs="+", default=None, help="run only the rows of these names (see --list)")
    ap.add_argument("--methods", nargs="+", default=None, help="run only the rows of these method folders")
    ap.add_argument("--out", default="benchmark/out", help="working folder: OUT/seed<N>/... holds every step's run "
                    "folder and each row's log.txt and bench.json (time, memory); the table of a run goes to "
                    "OUT/results.md, OUT/results.json and OUT/results.png")
    ap.add_argument("--publish", action="store_true", help="write the table to the committed benchmark/results.md, "
                    ".json and .png instead of OUT/results.*: the rows found in OUT replace the published rows of "
                    "the same name, the other published rows are kept")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="pipeline-seeds run at once "
                    "(default 2, 1 on a 1-core machine; see the docstring); each step "
                    "gets OMP_NUM_THREADS = CPU cores // jobs unless OMP_NUM_THREADS is set (on 2 cores, --jobs 2 "
                    "runs two 1-thread steps: about twice the throughput of one 2-thread step for these small nets)")
    ap.add_argument("--workers", type=int, default=0, help="data-loading worker processes of every step (its "
                    "--workers; default 0: images are loaded in the step's own process). With one 1-thread step per "
                    "core, worker processes only take CPU time from the other step (two train_source.py runs side by "
                    "side: 37 s with 0 workers, 41 s with 2) and the numbers are the same (every image draws its augmentation from its own seed). -1: the "
                    "scripts' own default (2)")
    ap.add_argument("--toy-version", type=int, default=3, choices=(2, 3), help="the toy domains the rows run on "
                    "(SEGDA_TOY_VERSION for every step; default 3, the published table; 2 = the table before issue "
                    "17, published as benchmark/results_v2.*). A row's result counts only for its own version")
    ap.add_argument("--extra", action="store_true", help="also run the extra rows (precision parity, ablations, two loss-weighted-0 controls: "
                    "marked extra in PIPELINES), which the default table leaves out to keep a seed under 40 "
                    "minutes on 2 cores; --only runs a named extra row without it")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="run every training step of SCALED (the "
                    "advent_maxsquare adaptation scripts, mada/train_stage1.py, d2ada/train_ada.py per round) K times "
                    "its toy preset's length (--iters, --eval-every, --save-every; the poly schedule stretched over "
                    "it); changed rows are named '<row> [xK]' and write their own _xK folders beside the shared "
                    "unscaled steps (issue 28, benchmark/budget_curves.py)")
    ap.add_argument("--budget", default="default", choices=("default", "long"), help="long: the long-budget "
                    "preset (LONG: D2ADA and its random-regions control at 2x training per round, issue 28), i.e. "
                    "--budget-scale 2 --only those rows; published as benchmark/results_x2.*")
    ap.add_argument("--eval-split", default="test", choices=("test", "val"), help="the split every row's last "
                    "step evaluates (default test, the published table's; val for the budget curves, which must not "
                    "look at the test split: rows are named '<row> [val]' and cannot be published)")
    ap.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines when the "
                    "output is not a terminal (on a terminal the progress lines are redrawn every second)")
    ap.add_argument("--list", action="store_true", help="print the chosen rows (with --methods/--only), their steps, "
                    "recorded time per seed and the seeds finished in OUT; run and write nothing")
    ap.add_argument("--report", action="store_true", help="run nothing; aggregate the finished results in OUT into "
                    "OUT/results.* (benchmark/results.* with --publish); writes nothing if nothing has finished")
    args = ap.parse_args(argv)
    if args.budget == "long":
        if args.budget_scale != 1 or args.only:
            ap.error("--budget long sets --budget-scale and --only itself (LONG in benchmark/run.py)")
        args.budget_scale, args.only = LONG["scale"], list(LONG["rows"])
    if args.budget_scale <= 0:
        ap.error("--budget-scale must be positive")
    if args.publish and args.eval_split != "test":
        ap.error("--publish writes the held-out test table: a --eval-split val run is never published")
    variant = budget_variant(PIPELINES, args.budget_scale, args.eval_split)
    if args.only:
        unknown = set(args.only) - {p["name"] for p in PIPELINES}
        if unknown:
            ap.error(f"unknown row name(s) {sorted(unknown)}; see --list")
    if args.methods:
        unknown = set(args.methods) - {p["method"] for p in PIPELINES}
        if unknown:
            ap.error(f"unknown method folder(s) {sorted(unknown)}; choose from "
                     f"{sorted({p['method'] for p in PIPELINES})}")
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    chosen = [q for p, q in zip(PIPELINES, variant) if (args.only is None or p["name"] in args.only)
              and (args.methods is None or p["method"] in args.methods)
              and (args.extra or args.only is not None or not p.get("extra"))]
    configure(args.toy_version, args.jobs, args.workers)
    out = (ROOT / args.out).resolve()
    published = PUBLISHED if args.toy_version == 3 else PUBLISHED.with_name("results_v2")
    if args.budget_scale != 1:  # a longer preset's table is published beside the default one, never into it
        published = published.with_name(f"{published.name}_{scale_tag(args.budget_scale)}")
    dest = published if args.publish else out / "results"
    times = recorded_times(out, args.toy_version)
    if args.list:
        found = seeds_on_disk(out)
        for p in chosen:
            t = f"~{human(times[p['name']][0])}/seed ({times[p['name']][1]})" if p["name"] in times else "no recorded time"
            fin = [s for s in found if collect(p, s, out, args.toy_version) is not None]
            print(f"{p['name']:48s} [{p['method']}] {len(p['steps'])} steps, {t}"
                  + (f", finished in {rel(out)}: seeds {fin}" if fin else ""))
        print(f"{len(chosen)} of {len(PIPELINES)} rows")
        return 0
    if args.report:
        return 0 if report(out, args.seeds or seeds_on_disk(out), dest, args.toy_version, variant,
                           args.eval_split) else 1
    seeds = args.seeds or [0]
    code = execute(chosen, seeds, out, args.jobs, dest, times, args.progress_every)
    if code is not None:
        return code
    report(out, seeds_on_disk(out), dest, args.toy_version, variant, args.eval_split)
    return 0 if STATE["ok"] else 1


STATE = {"ok": True}


def configure(toy_version=3, jobs=2, workers=0):
    """The steps' environment: SEGDA_TOY_VERSION, OMP_NUM_THREADS = cores // jobs (unless set), --workers."""
    global STEP_ENV, STEP_WORKERS, MACHINE
    STEP_WORKERS = None if workers < 0 else workers
    STEP_ENV = {**os.environ, "SEGDA_TOY_VERSION": str(toy_version)}  # every step reads this version
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        STEP_ENV["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    MACHINE = machine()


def execute(chosen, seeds, out, jobs, dest, times, progress_every=30.0, again="python benchmark/run.py --report"):
    """Print the plan and run it (configure() first). Returns None when it ran to the end (STATE['ok'] says whether
    every pipeline-seed finished), or the exit code of an interruption (130 / 143)."""
    waiting, n_steps = print_plan(chosen, seeds, out, jobs, dest, times)
    progress = Progress(n_steps, {n: t for n, (t, _) in times.items()}, jobs, interval=progress_every)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # like Ctrl-C (the steps run in their own process groups)
        signal.signal(sig, _on_sigterm)
    t_all = time.time()
    try:
        STATE["ok"] = run_parallel(chosen, seeds, out, jobs, progress)
    except Interrupted as e:
        progress.message(f"[bench] interrupted after {human(time.time() - t_all)}: {progress.finished} step(s) "
                         f"finished and kept in {rel(out)}; the interrupted step(s) left their partial run folders "
                         f"and logs there. Continue with the same command (finished steps are skipped, an interrupted "
                         f"training step resumes from its checkpoint); `{again}` makes the table of what has "
                         f"finished.")
        return 128 + int(e.args[0])
    print(f"[bench] ran {len(chosen)} row(s) x {len(seeds)} seed(s) in {human(time.time() - t_all)}", flush=True)
    return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before any step started (the steps' own Ctrl-C is handled in run_parallel)
        print("\n[bench] interrupted before any step started: nothing was run or written")
        sys.exit(130)
