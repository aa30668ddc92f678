"""The toy benchmark (the project's main job): runs each method's pipeline on the embedded toy domains,
for several seeds, and writes a results table (method, target labels used, held-out toy test mIoU as
mean +- std over seeds, wall time, peak memory) as Markdown and as a bar chart PNG.

    python benchmark/run.py                         # every pipeline, seeds 0 1 2 (long: see README)
    python benchmark/run.py --seeds 0               # one seed
    python benchmark/run.py --only "Source only" "Oracle (target labels)"
    python benchmark/run.py --methods ssada madan   # the pipelines of these method folders
    python benchmark/run.py --list                  # what would run
    OMP_NUM_THREADS=2 python benchmark/run.py --jobs 8   # 8 pipeline-seeds at once (a bigger machine)

Each pipeline is a list of commands run in order in one folder per seed; its last command writes a
JSON file whose "mIoU" is the number reported (evaluated on the held-out toy `test` split, never on
the val split any script selects on). Finished steps are skipped on a re-run (their `done` file exists),
so an interrupted benchmark continues where it stopped. Adding a method = adding entries to PIPELINES.
With --jobs N, pipeline-seeds run N at a time; a pipeline waits for every earlier pipeline of the same seed
that touches the same {base}/<folder> (so shared steps run once, in order). Each row records the machine.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MACHINE = None  # set in main()

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
    dict(name="Source only (fp32 eager, parity)", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/train_source.py --amp off --seed {seed} --out {base}/source_fp32",
         "{base}/source_fp32/final.json"),
        ("{py} advent_maxsquare/test.py --amp off --checkpoint {base}/source_fp32/model.pth --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="Oracle (fp32 eager, parity)", method="advent_maxsquare", labels="100% (all target train)", steps=[
        ("{py} advent_maxsquare/train_source.py --amp off --source toy_cityscapes --seed {seed} "
         "--out {base}/oracle_fp32", "{base}/oracle_fp32/final.json"),
        ("{py} advent_maxsquare/test.py --amp off --checkpoint {base}/oracle_fp32/model.pth --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- advent_maxsquare: adaptation (issue: AdaptSegNet, ADVENT, MaxSquare) ----
    # Each starts from this seed's source-only model ({base}/source, built by "Source only" above).
    # AdaBN (no training): the source model with its BN statistics re-estimated on target train images. Every
    # adaptation script forwards target batches in train mode, so it gets this effect too.
    dict(name="Source only + AdaBN (target BN statistics)", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/test.py --adabn --checkpoint {base}/source/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # The control every adaptation row must beat: the same script and schedule as the adaptation rows (300
    # iterations from the source model, target batches forwarded in train mode so BN sees them) with the target
    # loss weighted 0: same budget, same BN effect, no adaptation loss.
    dict(name="Source only, continued (control)", method="advent_maxsquare", labels="none", steps=[
        ("{py} advent_maxsquare/train_maxsquare.py --lambda-target 0 --seed {seed} "
         "--init-from {base}/source/model.pth --out {base}/source_continued", "{base}/source_continued/final.json"),
        ("{py} advent_maxsquare/test.py --checkpoint {base}/source_continued/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
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
    dict(name="MADA stage 1 (5% images, CE)", method="mada", labels="5% of target images (20)", steps=[
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
    dict(name="MADA stage 2 (5% images)", method="mada", labels="5% of target images (20)", steps=[
        ("{py} mada/save_features.py --domain target --checkpoint {base}/mada/stage1_mada/model.pth "
         "--out {base}/mada/features/target_stage1_mada", "{base}/mada/features/target_stage1_mada/final.json"),
        ("{py} mada/cluster_anchors.py --seed {seed} --features {base}/mada/features/target_stage1_mada "
         "--out {base}/mada/anchors/target_stage1_mada", "{base}/mada/anchors/target_stage1_mada/final.json"),
        ("{py} mada/train_stage2.py --seed {seed} --init-from {base}/mada/stage1_mada/model.pth "
         "--anchors {base}/mada/anchors/target_stage1_mada --selection {base}/mada/select_mada "
         "--out {base}/mada/stage2_mada", "{base}/mada/stage2_mada/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage2_mada/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="MADAv2 step 1 (5% images, CE)", method="mada", labels="5% of target images (20)", steps=[
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
    dict(name="Random 5% images + MADA stage 1", method="mada", labels="5% of target images (20, random)", steps=[
        ("{py} mada/select_active.py --criterion random --seed {seed} --features {base}/mada/features/target_warmup "
         "--out {base}/mada/select_random", "{base}/mada/select_random/final.json"),
        ("{py} mada/train_stage1.py --seed {seed} --init-from {base}/mada/warmup/model.pth "
         "--selection {base}/mada/select_random --out {base}/mada/stage1_random",
         "{base}/mada/stage1_random/final.json"),
        ("{py} mada/test.py --checkpoint {base}/mada/stage1_random/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    # ---- d2ada ----
    dict(name="D2ADA warm-up (UDA, AdaptSegNet)", method="d2ada", labels="none", steps=[
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
    dict(name="D2ADA (5 rounds, 5% target pixels)", method="d2ada", labels="5% of target pixels (regions)", steps=[
        ("{py} d2ada/train_ada.py --seed {seed} --init-from {base}/d2ada_warmup/model.pth --out {base}/d2ada_ada",
         "{base}/d2ada_ada/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_ada/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    *[dict(name=f"D2ADA after round {r} ({r}% target pixels)", method="d2ada", labels=f"{r}% of target pixels",
           steps=[("{py} d2ada/test.py --checkpoint {base}/d2ada_ada/checkpoint%02d.pth --split test --out {run}/eval" % r,
                   "{run}/eval/final.json")], result="{run}/eval/final.json") for r in (1, 2, 3, 4)],
    dict(name="D2ADA baseline: random regions (5%)", method="d2ada", labels="5% of target pixels (regions)", steps=[
        ("{py} d2ada/train_ada.py --selection random --seed {seed} --init-from {base}/d2ada_warmup/model.pth "
         "--out {base}/d2ada_random", "{base}/d2ada_random/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_random/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="D2ADA baseline: uncertainty only (5%)", method="d2ada", labels="5% of target pixels (regions)", steps=[
        ("{py} d2ada/train_ada.py --selection uncertainty --seed {seed} --init-from {base}/d2ada_warmup/model.pth "
         "--out {base}/d2ada_uncertainty", "{base}/d2ada_uncertainty/final.json"),
        ("{py} d2ada/test.py --checkpoint {base}/d2ada_uncertainty/model.pth --split test --out {run}/eval",
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
    dict(name="MADAN: pixel level (DSC+SAD+CCD)", method="madan", labels="none", steps=[
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
    dict(name="MADAN: pixel + feature level (ADDA)", method="madan", labels="none", steps=[
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
    dict(name="MDAN (2 sources)", method="madan", labels="none", steps=[
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
    dict(name="SS-ADA: Entropy-IoU 5%", method="ssada", labels="5% of target images", steps=[
        ("{py} ssada/train_ssada.py --strategy entropy_iou --total-ratio 0.05 --seed {seed} --out {base}/ssada_entropy_iou_5",
         "{base}/ssada_entropy_iou_5/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_entropy_iou_5/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: Entropy-IoU 10%", method="ssada", labels="10% of target images", steps=[
        ("{py} ssada/train_ssada.py --strategy entropy_iou --total-ratio 0.1 --seed {seed} --out {base}/ssada_entropy_iou_10",
         "{base}/ssada_entropy_iou_10/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_entropy_iou_10/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: Entropy-IoU 25%", method="ssada", labels="25% of target images", steps=[
        ("{py} ssada/train_ssada.py --strategy entropy_iou --total-ratio 0.25 --seed {seed} --out {base}/ssada_entropy_iou_25",
         "{base}/ssada_entropy_iou_25/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_entropy_iou_25/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: random 5%", method="ssada", labels="5% of target images", steps=[
        ("{py} ssada/train_ssada.py --strategy random --total-ratio 0.05 --seed {seed} --out {base}/ssada_random_5",
         "{base}/ssada_random_5/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_random_5/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: random 10%", method="ssada", labels="10% of target images", steps=[
        ("{py} ssada/train_ssada.py --strategy random --total-ratio 0.1 --seed {seed} --out {base}/ssada_random_10",
         "{base}/ssada_random_10/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/ssada_random_10/model.pth --split test --out {run}/eval",
         "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="SS-ADA: random 25%", method="ssada", labels="25% of target images", steps=[
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
    dict(name="TUFL: focal, fixed tau (toy CS->CrossCity)", method="ssada", ref="tufl", labels="none", steps=[
        ("{py} ssada/train_tufl.py --seed {seed} --out {base}/tufl", "{base}/tufl/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/tufl/model.pth --target toy_crosscity --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
    dict(name="TUFL: focal, adaptive tau (toy CS->CrossCity)", method="ssada", ref="tufl", labels="none", steps=[
        ("{py} ssada/train_tufl.py --thresholds adaptive --seed {seed} --out {base}/tufl_adaptive",
         "{base}/tufl_adaptive/final.json"),
        ("{py} ssada/test.py --checkpoint {base}/tufl_adaptive/model.pth --target toy_crosscity --split test "
         "--out {run}/eval", "{run}/eval/final.json")], result="{run}/eval/final.json"),
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


def machine():
    """A short description of where the steps run (recorded per row: timings are only comparable within one)."""
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} + {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return f"{os.cpu_count()} CPU cores"


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
        stats["machine"] = MACHINE
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


# Reference rows for the "gap closed" column: (source-only row, oracle row) of the same network and label space.
REFS = {"advent_maxsquare": ("Source only", "Oracle (target labels)"),
        "mada": ("MADA warm-up (source only, DeepLabV3+)", "MADA oracle (DeepLabV3+, target labels)"),
        "d2ada": ("D2ADA source only (sup. warm-up, DeepLabV3+)", "D2ADA oracle (DeepLabV3+, target labels)"),
        "madan": ("MADAN: both sources combined (no adapt.)", "MADAN: oracle (target labels, 16 cl.)"),
        "ssada": ("SS-ADA: source only (BiSeNet)", "SS-ADA: oracle 100% (BiSeNet)"),
        # TUFL is another task (toy Cityscapes -> CrossCity, 13 classes) with no target-labelled oracle: no gap column
        "tufl": ("TUFL: source only (toy CS->CrossCity)", None)}


def collect(p, seed, out):
    """The finished result of one pipeline-seed on disk, or None."""
    base = out / f"seed{seed}"
    run = base / slug(p["name"])
    res = Path(p["result"].format(py=PY, seed=seed, run=run, base=base))
    if not res.exists():
        return None
    stats_file = run / "bench.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"seconds": float("nan"), "peak_mib": 0}
    stats.setdefault("machine", "2 CPU cores")  # rows measured before machines were recorded: the project's machine
    return {"mIoU": json.loads(res.read_text())["mIoU"], **stats}


def folders(p):
    """The {base}/<folder> names a pipeline's commands touch (its dependencies on earlier pipelines)."""
    return {m for cmd, done in p["steps"] for m in re.findall(r"\{base\}/([^/\s,]+)", cmd + " " + done)}


def run_parallel(chosen, seeds, out, jobs):
    """Run pipeline-seeds `jobs` at a time; a pipeline-seed starts once every earlier chosen pipeline of its seed
    that shares a {base} folder with it has finished. Among the ready ones, those with the most (transitive)
    dependents start first (the long chains). A failure skips its dependents and is reported at the end."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    keys = [(i, s) for i in range(len(chosen)) for s in seeds]
    deps = {(i, s): {(j, s) for j in range(i) if folders(chosen[j]) & folders(chosen[i])} for i, s in keys}
    dependents = {k: set() for k in keys}
    for k in reversed(sorted(keys)):  # later pipelines first, so a dependent's own set is complete
        for d in deps[k]:
            dependents[d] |= {k} | dependents[k]
    todo = sorted(keys, key=lambda k: (-len(dependents[k]), k[0], k[1]))
    done, failed, running = set(), {}, {}
    with ThreadPoolExecutor(jobs) as ex:
        while todo or running:
            for k in list(todo):
                if deps[k] & set(failed):
                    failed[k] = "skipped: depends on a failed pipeline"
                    todo.remove(k)
                elif deps[k] <= done and len(running) < jobs:
                    running[ex.submit(run_pipeline, chosen[k[0]], k[1], out)] = k
                    todo.remove(k)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                k = running.pop(f)
                if f.exception() is None:
                    done.add(k)
                else:
                    failed[k] = str(f.exception())
    for (i, s), why in sorted(failed.items()):
        print(f"[bench] FAILED {chosen[i]['name']} seed {s}: {why}", flush=True)
    return not failed


def report(out, seeds, results):
    """Aggregate every pipeline's finished seeds on disk (not only those run now) into .md/.json/.png."""
    rows = []
    for p in PIPELINES:
        per_seed = {s: r for s in seeds if (r := collect(p, s, out)) is not None}
        if not per_seed:
            continue
        m = [r["mIoU"] for r in per_seed.values()]
        secs = [r["seconds"] for r in per_seed.values() if r["seconds"] == r["seconds"]]
        rows.append({"name": p["name"], "method": p["method"], "labels": p["labels"], "n": len(m),
                     "seeds": sorted(per_seed), "mean": statistics.mean(m),
                     "std": statistics.stdev(m) if len(m) > 1 else 0.0,
                     "seconds": statistics.mean(secs) if secs else float("nan"),
                     "peak_mib": max(r["peak_mib"] for r in per_seed.values()), "per_seed": m,
                     "machine": " / ".join(sorted({r["machine"] for r in per_seed.values()})),
                     "ref": p.get("ref", p["method"])})
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        src, orc = (by_name.get(n) for n in REFS.get(r["ref"], ("", "")))
        r["gap_closed"] = ((r["mean"] - src["mean"]) / (orc["mean"] - src["mean"])
                           if src and orc and orc["mean"] != src["mean"] else None)
    lines = ["| method | folder | target labels used | toy test mIoU | per seed | gap closed | "
             "wall time / seed | peak RSS | machine |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        per = ", ".join(f"{v:.1f}" for v in r["per_seed"])
        peak = "n/a" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f} MiB"
        lines.append(f"| {r['name']} | `{r['method']}` | {r['labels']} | {r['mean']:.1f} +- {r['std']:.1f} "
                     f"(n={r['n']}) | {per} | {gap} | {r['seconds'] / 60:.1f} min | {peak} | {r['machine']} |")
    md = "\n".join(lines) + (
        f"\n\nSeeds asked: {seeds}; n = seeds finished. mIoU on the held-out toy test split. Gap closed = "
        "(row - source-only) / (oracle - source-only), with the source-only and oracle rows of the same network "
        "and label space (DeepLabV2-R18 for advent_maxsquare; DeepLabV3+-R18 for mada and d2ada; the MADAN and "
        "SS-ADA rows use their own). Wall time: steps of that pipeline actually run for it (steps shared with an earlier "
        f"row count once, there); wall times compare only between rows of the same machine (rows run with --jobs "
        "shared that machine with other rows).\n")
    res = ROOT / results
    res.parent.mkdir(parents=True, exist_ok=True)
    Path(str(res) + ".md").write_text(md)
    Path(str(res) + ".json").write_text(json.dumps(rows, indent=2))
    if rows:
        bar_chart(rows, str(res) + ".png")
    print(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", default=None, help="pipeline names to run")
    ap.add_argument("--methods", nargs="+", default=None, help="run only the pipelines of these method folders")
    ap.add_argument("--out", default="benchmark/out", help="working folder (runs, logs)")
    ap.add_argument("--results", default="benchmark/results", help="results prefix: .md and .png are written")
    ap.add_argument("--jobs", type=int, default=1, help="pipeline-seeds run at once (see the docstring)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report", action="store_true", help="run nothing; aggregate the finished results on disk")
    args = ap.parse_args()
    if args.only:
        unknown = set(args.only) - {p["name"] for p in PIPELINES}
        if unknown:
            ap.error(f"unknown pipeline name(s) {sorted(unknown)}; see --list")
    chosen = [p for p in PIPELINES if (args.only is None or p["name"] in args.only)
              and (args.methods is None or p["method"] in args.methods)]
    if args.list:
        for p in PIPELINES:
            print(f"{p['name']:40s} [{p['method']}] {len(p['steps'])} steps")
        return
    out = (ROOT / args.out).resolve()
    global MACHINE
    MACHINE = machine()
    if not args.report:
        t_all = time.time()
        if args.jobs > 1:
            ok = run_parallel(chosen, args.seeds, out, args.jobs)
        else:
            ok = True
            for p in chosen:
                for s in args.seeds:
                    run_pipeline(p, s, out)
        print(f"[bench] ran {len(chosen)} pipeline(s) x {len(args.seeds)} seed(s) in {time.time() - t_all:.0f} s")
    report(out, args.seeds, args.results)
    if not args.report and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
