r"""Multiple anchors of a domain (MADA Sec. 3.2; upstream cluster_anchors_source.py /
cluster_anchors_target.py): faiss k-means of the flattened objective vectors [N, C*256] into K = 10
clusters, 20 iterations, seeded. The centroids reshaped to [K, C, 256] are the anchors A_k.

    A = kmeans({vec(V_n)}, K = 10, niter = 20)    (faiss; MADA: all vectors; MADAv2: a seeded K*256 sample)

--absent zero (default, upstream) keeps faiss's centroids, absent classes' zero rows included; --absent mask
(ablation) re-estimates each anchor row as the mean over the cluster's members in which that class is
present, so images lacking a class do not drag the class's anchor row toward zero.
--max-points-per-centroid: unset = every vector is clustered (MADA utils/clustering.py:169 sets 10,000,000);
256 = faiss.Kmeans's default sample, which MADAv2 (step1_cluster_anchors_source.py:26) runs with.
Writes OUT/anchors.npz (anchors [K, C, 256] float32, present [K, C], assign [N]) and OUT/final.json.

Toy (no arguments: the warm-up model's source vectors -> source anchors):
    python mada/cluster_anchors.py
Target anchors (MADAv2: of the warm-up model; MADA stage 2: of the stage-1 model):
    python mada/cluster_anchors.py --features runs/mada/features/target_warmup
    python mada/cluster_anchors.py --features runs/mada/features/target_stage1
GTA5 -> Cityscapes: the same commands on the folders written by save_features.py (24,966 source vectors);
MADAv2 (faiss's sample of 2,560 vectors):
    python mada/cluster_anchors.py --features runs/mada/features/source_warmup --max-points-per-centroid 256
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np

from common import runtime as rt
from mada import core


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default="runs/mada/features/source_warmup",
                   help="folder written by save_features.py (vectors.npy, counts.npy, meta.json)")
    p.add_argument("--k", type=int, default=10, help="number of anchors (paper: 10)")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations (paper: 20)")
    p.add_argument("--max-points-per-centroid", type=int, default=None,
                   help="cluster a seeded sample of K x this many vectors; unset: all of them (MADA); MADAv2: 256 "
                   "(faiss.Kmeans's default, 2,560 vectors)")
    p.add_argument("--absent", default="zero", choices=core.ABSENT_CHOICES,
                   help="zero: faiss's centroids, absent rows zero (upstream); mask: anchor rows averaged over the "
                   "members with the class present (ablation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/mada/anchors/FEATURES_NAME)")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"runs/mada/anchors/{Path(args.features).resolve().name}"
    return args


def main(args):
    rt.seed_everything(args.seed)
    vec, counts, meta = core.load_features(args.features)
    out = rt.prepare_run_dir(args.out, args)
    log = rt.RunLogger(out)
    t0 = time.time()
    # -- method: k-means of the flattened objective vectors into K anchors --
    anchors, present, assign, obj = core.kmeans_anchors(
        vec, counts, k=args.k, niter=args.niter, seed=args.seed, min_pixels=meta["min_pixels"],
        max_points_per_centroid=args.max_points_per_centroid, absent=args.absent)
    # -- end of method --
    core.atomic_save_npz(out / "anchors.npz", anchors=anchors, present=present, assign=assign)
    sizes = np.bincount(assign, minlength=args.k).tolist()
    final = {"features": str(args.features), "k": args.k, "niter": args.niter, "absent": args.absent,
             "vectors": int(len(vec)), "cluster_sizes": sizes, "kmeans_objective": obj,
             "seconds": round(time.time() - t0, 2)}
    rt.save_json(out / "final.json", final)
    log.log({"event": "done", "seconds": final["seconds"], "kmeans_objective": obj})
    print(f"[done] {args.k} anchors of {len(vec)} vectors (cluster sizes {sizes}) -> {out / 'anchors.npz'}")


if __name__ == "__main__":
    rt.run_main(main, parse_args)
