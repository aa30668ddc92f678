r"""Translate every labelled source to the target style with its trained generator G_i
(train_translation.py) and write it as a dataset in THAT SOURCE'S REAL ON-DISK FORMAT, so that the common
readers load it like the original: a GTA5-style source stays images/ + labels/ (+ lists/), a SYNTHIA-style
source stays RGB/ + GT/LABELS/ with its 16-bit label PNGs copied byte for byte. Labels are not touched:
each image is translated at FULL resolution when the generator was trained on real data (upstream's test
scripts pass --resize_or_crop None: no resize at all; test_templates_cycle.sh:9), at the toy training size on
the toy domains, and written at its label's size.
Upstream: cyclegan/test.py + scripts/CycleGAN/test_templates_cycle.sh (the "source as target" dataset).
Also writes OUT/grid.png: source | translated | target, a few rows per source.

    x_i^T = G_i(x_i)                                      (the adapted domain of source i)

Toy (no arguments; the toy translation run -> runs/madan/translated/{toy_synthia,toy_gta5}):
    python madan/translate.py
Real data (the checkpoint's sources, in order):
    python madan/translate.py --checkpoint runs/madan/translation/model.pth \
        --source synthia,gta5 --source-root /data/RAND_CITYSCAPES,/data/GTA5 --target cityscapes \
        --target-root /data/cityscapes --out /data/madan_translated
Then train on it:
    python madan/train_segmenter.py --source-root runs/madan/translated/toy_synthia,runs/madan/translated/toy_gta5
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np
import torch
from PIL import Image

from common import runtime as rt
from common.datasets import DOMAINS, build_dataset, read_image, resolve_domain
from common.transforms import to_tensor
from madan.models import ResnetGenerator
from madan.util import gan_to_uint8, norm_to_gan, save_grid, split_list


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/madan/translation/model.pth", help="train_translation.py model.pth")
    p.add_argument("--source", default=None, help="comma-separated sources (default: the checkpoint's, in order)")
    p.add_argument("--source-root", default=None, help="comma-separated dataset roots (toy: generated cache)")
    p.add_argument("--target", default=None, help="target domain, for the grid only (default: the checkpoint's)")
    p.add_argument("--target-root", default=None, help="dataset root of --target")
    p.add_argument("--size", default=None, help="working size H,W of the generator (default: full resolution "
                   "for a real-data checkpoint, as upstream's --resize_or_crop None; the training size for a toy one)")
    p.add_argument("--grid", type=int, default=4, help="rows per source in OUT/grid.png")
    p.add_argument("--limit", type=int, default=None, help="translate only the first N images (smoke tests)")
    p.add_argument("--amp", default="auto", choices=rt.AMP_CHOICES)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/madan/translated", help="one dataset folder per source is written here")
    return p.parse_args(argv)


def work_size(img, cfg, size_arg):
    if size_arg:
        h, w = (int(v) for v in size_arg.replace("x", ",").split(","))
        return h, w
    if cfg.get("load_size"):  # real-data preset: upstream translates at full resolution (--resize_or_crop None)
        return img.height, img.width
    return tuple(cfg["fine_size"])


@torch.no_grad()
def main(args):
    _, _, device = rt.setup_distributed(args.device)
    amp = rt.amp_dtype(args.amp, device)
    ck = rt.load_checkpoint(args.checkpoint)
    cfg = ck["config"]
    names = split_list(args.source) or cfg["sources"]
    roots = split_list(args.source_root)
    if len(names) != len(cfg["sources"]):
        raise SystemExit(f"{args.checkpoint} has {len(cfg['sources'])} generators ({cfg['sources']}), "
                         f"--source names {len(names)}")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target or cfg["target"], args.target_root, "target")
    tgt_files = build_dataset(tgt_kind, tgt_root, DOMAINS[tgt][1], with_labels=False,
                              cities=None).files if tgt_kind != "crosscity" else \
        build_dataset(tgt_kind, tgt_root, "Train", num_classes=13, with_labels=False).files
    out = Path(args.out)
    rows, t0, report = [], time.time(), {"checkpoint": str(args.checkpoint), "sources": {}}
    for i, name in enumerate(names):
        name, kind, root = resolve_domain(name, roots[i] if roots else None, "source")
        G = ResnetGenerator(cfg["ngf"], cfg["n_blocks"], cfg["dropout"])
        G.load_state_dict({k.split(".", 1)[1]: v for k, v in ck["G"].items() if k.startswith(f"G_{i}.")})
        G = G.to(device).eval()
        split = DOMAINS[name][1]
        files = build_dataset(kind, root, split).files[: args.limit]
        dest = out / name
        if dest.exists():  # never overwrite a dataset silently: move the old one aside
            aside = dest.with_name(dest.name + ".old-" + time.strftime("%Y%m%d-%H%M%S"))
            shutil.move(str(dest), str(aside))
            print(f"[translate] {dest} existed: moved to {aside}", flush=True)
        # -- method: x -> G_i(x) at the working size, back to the label's size; labels copied as they are --
        for k, (img_path, lbl_path) in enumerate(files):
            img = read_image(img_path)
            h, w = work_size(img, cfg, args.size)
            work = img if (w, h) == img.size else img.resize((w, h), Image.BICUBIC)
            x = norm_to_gan(to_tensor(work, "imagenet")[None].to(device), "imagenet")
            with rt.autocast(device, amp):
                y = G(x)
            fake = Image.fromarray(gan_to_uint8(y[0])).resize(img.size, Image.BICUBIC)
            rel_img, rel_lbl = Path(img_path).relative_to(root), Path(lbl_path).relative_to(root)
            (dest / rel_img).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel_lbl).parent.mkdir(parents=True, exist_ok=True)
            fake.save(dest / rel_img.with_suffix(".png"))
            shutil.copyfile(lbl_path, dest / rel_lbl)  # byte for byte: SYNTHIA's 16-bit labels stay 16-bit
            if k < args.grid:
                t_img = read_image(tgt_files[(i * args.grid + k) % len(tgt_files)][0])
                rows.append([np.asarray(img), np.asarray(fake), np.asarray(t_img)])
        # -- end of method --
        if (Path(root) / split).is_file():  # a list-file split (the toy domains' lists/train.txt): same names
            (dest / split).parent.mkdir(parents=True, exist_ok=True)
            (dest / split).write_text("".join(f"{Path(a).name}\n" for a, _ in files))
        rt.save_json(dest / "DONE.json", {"source": name, "kind": kind, "images": len(files),
                                          "checkpoint": str(args.checkpoint), "generator": f"G_{i}"})
        report["sources"][name] = {"root": str(dest), "images": len(files)}
        print(f"[translate] {name}: {len(files)} images -> {dest}", flush=True)
    save_grid(rows, out / "grid.png", titles=["source", "translated", "target"])
    report["grid"] = str(out / "grid.png")
    report["seconds"] = round(time.time() - t0, 1)
    rt.save_json(out / "translate.json", report)
    print(f"[translate] grid (source | translated | target) -> {out / 'grid.png'}")
    print(json.dumps(report["sources"]))


if __name__ == "__main__":
    rt.run_main(main, parse_args)
