"""Benchmark of ONE D2ADA selection round at Cityscapes scale on synthetic region features: 2,975
target images x 40 regions, a source sample of 100,000 regions, 256-d features, 19 classes; the full
density (38 Gaussian mixtures) + uncertainty selection of selection.select_round with the paper's
budget (29 image-equivalents of 1024x2048 pixels, lambda = 1 at the first round; --lam 0.5 splits it).
Prints and writes wall time and peak memory (RSS). No model and no data needed.

    python d2ada/bench_selection.py                       # Cityscapes scale, 2 classes at a time
    python d2ada/bench_selection.py --workers 2 --threads 1 --out runs/d2ada/bench_selection.json
    python d2ada/bench_selection.py --images 100 --source-regions 5000     # a quick look
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np

from d2ada import selection as S


def synthetic(n, dim, num_classes, rng, centers, shift=0.0):
    """Region features drawn from a per-class mixture of 3 Gaussians (+ a domain shift), softmax means
    peaked on the class, entropies and pixel counts like 40 SLIC regions of a 1024x2048 image."""
    cls = rng.choice(num_classes, n, p=np.linspace(2, 0.2, num_classes) / np.linspace(2, 0.2, num_classes).sum())
    sub = rng.integers(0, 3, n)
    feat = (centers[cls, sub] + shift + rng.standard_normal((n, dim))).astype(np.float32)
    prob = rng.dirichlet(np.full(num_classes, 0.3), n).astype(np.float32)
    prob[np.arange(n), cls] += 1.0
    prob /= prob.sum(1, keepdims=True)
    ent = (-prob * np.log2(prob + 1e-12)).mean(1)
    pixels = rng.integers(20000, 80000, n)
    return {"feat": feat, "prob": prob, "entropy": ent, "pixels": pixels}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2975, help="target images (Cityscapes train: 2975)")
    ap.add_argument("--regions-per-image", type=int, default=40)
    ap.add_argument("--source-regions", type=int, default=100000, help="source region sample")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--num-classes", type=int, default=19)
    ap.add_argument("--budget-images", type=float, default=29, help="round budget in image-equivalents")
    ap.add_argument("--image-pixels", type=int, default=1024 * 2048)
    ap.add_argument("--lam", type=float, default=1.0, help="density share (1 = the first round)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per mixture fit")
    ap.add_argument("--workers", type=int, default=2, help="classes fitted at once (bounded thread pool)")
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.num_classes, 3, args.dim)) * 3
    t0 = time.time()
    trg = synthetic(args.images * args.regions_per_image, args.dim, args.num_classes, rng, centers, shift=0.3)
    src = synthetic(args.source_regions, args.dim, args.num_classes, rng, centers)
    pool = rng.random(len(trg["pixels"])) > 0.01
    t_data = time.time() - t0
    t0 = time.time()
    picks, info = S.select_round(trg, src, pool, args.budget_images * args.image_pixels, args.lam,
                                 threads=args.threads, workers=args.workers, max_iter=args.max_iter)
    wall = time.time() - t0
    used = sum(int(trg["pixels"][r]) for r, _, _ in picks)
    res = {"target_regions": len(trg["pixels"]), "source_regions": args.source_regions, "dim": args.dim,
           "classes": args.num_classes, "threads": args.threads, "workers": args.workers, "selected_regions": len(picks),
           "selected_image_equivalents": round(used / args.image_pixels, 3), "selection_seconds": round(wall, 1),
           "data_seconds": round(t_data, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "lambda": info["lambda"], "density_seconds": info.get("density_seconds")}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
