"""Region division for D2ADA (paper Sec. 4.1, "we use SLIC to divide each image into about 40
superpixels"; official data_preprocessing/superpixel_gen.py, which used fast_slic): SLIC from
scikit-image, compactness 10, at the image's full resolution; ids 0..K-1 with no gaps, written as uint8
PNGs under <data-root>/superpixel/ mirroring the image tree. Resumable: images whose superpixel file
exists are skipped (files are written atomically). Needed for the target's training images (the
regions that get labelled) and for the source (the source regions of the density estimate).

Toy domains (no arguments: the toy GTA5-style source and the toy Cityscapes-style target train split):
    python d2ada/superpixels.py
Real data (run for each dataset; SYNTHIA's root is RAND_CITYSCAPES):
    python d2ada/superpixels.py --dataset cityscapes --data-root /data/cityscapes --workers 8
    python d2ada/superpixels.py --dataset gta5 --data-root /data/GTA5 --workers 8
    python d2ada/superpixels.py --dataset synthia --data-root /data/RAND_CITYSCAPES --workers 8
"""
import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np
from tqdm import tqdm

from common import runtime as rt
from common.datasets import DOMAINS, build_dataset, read_image, resolve_domain
from d2ada.regions import slic_regions, superpixel_path, write_png_atomic

# 40 regions per full-resolution image (paper). The toy images (128x256 target, 120x216 source) have
# 1/64 of Cityscapes' pixels: 16 regions keep each region at ~6% of an image (Cityscapes: ~2.5%) and
# still larger than most toy objects' parts.
PAPER_SEGMENTS, TOY_SEGMENTS = 40, 16
TOY_DEFAULT = ("toy_gta5", "toy_cityscapes")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="toy", help="toy (= toy_gta5 + toy_cityscapes) | toy_gta5 | toy_synthia | "
                   "toy_cityscapes | toy_crosscity | gta5 | synthia | cityscapes | crosscity")
    p.add_argument("--data-root", default=None, help="dataset root (toy: the generated cache)")
    p.add_argument("--split", default=None, help="image split (default: the domain's training split)")
    p.add_argument("--n-segments", type=int, default=None, help=f"SLIC n_segments (default {PAPER_SEGMENTS}; "
                   f"toy {TOY_SEGMENTS})")
    p.add_argument("--compactness", type=float, default=10.0, help="SLIC compactness")
    p.add_argument("--workers", type=int, default=1, help="threads (SLIC and the PNG codecs release the GIL: 2 "
                   "threads took 1.7-2.0x less time than 1 on 2 cores, at 2048x1024 and at toy size)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (a quick look)")
    p.add_argument("--summary", default=None, help="also write a JSON summary here when done (a 'done' file)")
    return p.parse_args(argv)


def _one(job):
    img_path, out_path, n_segments, compactness = job
    ids = slic_regions(np.asarray(read_image(img_path)), n_segments, compactness)
    write_png_atomic(ids, out_path)
    return int(ids.max()) + 1


def run(name, root, split, n_segments, compactness, workers, limit=None):
    name, kind, root = resolve_domain(name, root, "target" if "cityscapes" in name or "crosscity" in name
                                      else "source")
    split = split or DOMAINS[name][1]
    nc = 13 if kind == "crosscity" else 16 if kind == "synthia" else 19
    files = build_dataset(kind, root, split, nc, with_labels=False).files[:limit]
    jobs = [(img, superpixel_path(root, img), n_segments, compactness) for img, _ in files]
    todo = [j for j in jobs if not j[1].exists()]
    print(f"[superpixels] {name} ({split}): {len(jobs)} images, {len(jobs) - len(todo)} done already, "
          f"n_segments={n_segments} -> {root / 'superpixel'}", flush=True)
    counts = []
    if workers > 1:
        ex = ThreadPoolExecutor(workers)
        try:
            counts = list(tqdm(ex.map(_one, todo), total=len(todo), desc=name))
        finally:  # on Ctrl-C: drop the queued images, do not wait for them (each file is written atomically)
            ex.shutdown(wait=False, cancel_futures=True)
    else:
        counts = [_one(j) for j in tqdm(todo, desc=name)]
    if counts:
        print(f"[superpixels] {name}: regions per image min {min(counts)} mean {np.mean(counts):.1f} "
              f"max {max(counts)}", flush=True)
    return len(jobs)


def main(args):
    names = TOY_DEFAULT if args.dataset == "toy" else (args.dataset,)
    if args.dataset == "toy" and args.data_root:
        raise SystemExit("--dataset toy covers two domains; give --data-root with one --dataset toy_* name")
    t0 = time.time()
    done = {}
    for name in names:
        n = args.n_segments or (TOY_SEGMENTS if name.startswith("toy") else PAPER_SEGMENTS)
        done[name] = run(name, args.data_root, args.split, n, args.compactness, args.workers, args.limit)
    print(f"[done] {time.time() - t0:.1f} s", flush=True)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps({"images": done, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    rt.run_main(main, parse_args, on_stop="run the same command again: the images done already are skipped")
