r"""MADAN's per-source semantic classifiers F_i (Sec. 3.2, "Dynamic Semantic Consistency"): one segmenter
trained on each labelled source alone, used frozen by train_translation.py's DSC loss. "Dynamic": after
a translation round, retrain them on the translated sources (point --source-root at translate.py's
output) and continue the translation with the new classifiers (run_pipeline.py --rounds 2 does this).
Each classifier is also the single-source, no-adaptation baseline of that source (validated on the
target). The training step is train_segmenter.py's with one source; this script runs it per source.

    L_i = CE(F_i(x_i), y_i)                              for each source i, separately

Toy domains (no arguments; toy SYNTHIA-style and toy GTA5-style, 16 classes):
    python madan/train_classifiers.py                   # -> runs/madan/classifiers/{toy_synthia,toy_gta5}/model.pth
Round 2 of the dynamic loop (classifiers on the translated sources):
    python madan/train_classifiers.py --source-root runs/madan/translated/toy_synthia,runs/madan/translated/toy_gta5 \
        --out runs/madan/classifiers_r2
SYNTHIA and GTA5, FCN8s-VGG16 (upstream used DRN-26 / FCN8s source models):
    python madan/train_classifiers.py --source synthia,gta5 --source-root /data/RAND_CITYSCAPES,/data/GTA5 \
        --target cityscapes --target-root /data/cityscapes --init /weights/vgg16-397923af.pth
Several processes:
    torchrun --nproc_per_node=2 madan/train_classifiers.py
Stopped (Ctrl-C): the same command with --resume keeps the finished sources and continues the stopped one.
"""
import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

from common import runtime as rt
from madan import train_segmenter
from madan.util import split_list


def parse_args(argv=None):
    args = train_segmenter.parse_args(argv, __doc__)
    if "--out" not in (argv if argv is not None else sys.argv[1:]):
        args.out = str(Path(args.out).parent / "classifiers")
    return args


def main(args):
    names, roots = split_list(args.source), split_list(args.source_root)
    for i, name in enumerate(names):
        one = copy.copy(args)
        # -- method: one classifier per source, trained on that source alone --
        one.source, one.source_root = name, (roots[i] if roots else None)
        one.out = str(Path(args.out) / name)
        # -- end of method --
        # --resume: a finished source is kept, one stopped mid-way continues, one not started yet starts from 0
        if args.resume and (Path(one.out) / "final.json").exists():
            print(f"[classifiers] source {i + 1}/{len(names)}: {name} finished already ({one.out})", flush=True)
            continue
        one.resume = args.resume and (Path(one.out) / "checkpoint.pth").exists()
        print(f"[classifiers] source {i + 1}/{len(names)}: {name} -> {one.out}", flush=True)
        train_segmenter.main(one)


if __name__ == "__main__":
    rt.run_main(main, parse_args)
