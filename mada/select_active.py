r"""Active sample selection, one shot, image level (MADA Sec. 3.3, upstream select_active_samples.py;
MADAv2 step1_select_active_samples.py "dual distance, far"). Scores every target training image by the
distance of its objective vector V (from save_features.py --domain target) to the anchors and labels
the budget's farthest images:

    mada:    s(V) = min_k d(V, A^src_k)                         budget int(0.05 N)   (148 of 2975)
    madav2:  s(V) = min_k d(V, A^src_k) + min_k d(V, A^tgt_k)   budget round(0.05 N) (149 of 2975)
    random:  a seeded uniform draw of the same number (baseline)
    d(V, A) = mean of (V - A)^2 over all C x 256 entries, absent rows zero (--absent zero, upstream, default)
              or over the rows of V's present classes only (--absent mask, an ablation)

Writes OUT/selected.txt (image names relative to the target root), OUT/selection_list/ (upstream's own files:
stage1_cac_list_0.05.txt, CITY/NAME lines as MADA's, and stage1_cac_index_0.05.txt; MADAv2's name ends in
_dual_dis_far, as its step1_select_active_samples.py writes it), OUT/selected.json
(names, indices, scores, settings), OUT/scores.npy (every image's score) and OUT/contact_sheet.png (the
selected images beside the pseudo-labels of the model that made the features), OUT/selection.png (the
selected images above a random draw of the same size, with their class content) and
OUT/selection_classes.png (class shares of the selected pixels vs the target). Files are written
atomically; an earlier OUT is moved aside (never overwritten).

Toy (no arguments: MADA criterion, warm-up features and source anchors):
    python mada/select_active.py
MADAv2 (needs target anchors of the warm-up model):
    python mada/select_active.py --criterion madav2 --out runs/mada/select_madav2
Random baseline at the same budget:
    python mada/select_active.py --criterion random --out runs/mada/select_random
The anchors the official repositories ship (read through common.safe_pickle; no code in them is run):
    python mada/select_active.py --source-anchors MADA/anchors/cluster_centroids_full_10.pkl
    python mada/select_active.py --criterion madav2 --source-anchors MADAv2/anchors/cluster_centroids_sub_10.pkl \
        --target-anchors MADAv2/anchors/cluster_centroids_sub_10_target_warmup.pkl
Cityscapes (after save_features/cluster_anchors on GTA5 and Cityscapes): the same flags; the dataset is
read from the features' meta.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np
import torch
from PIL import Image

from common import labels as L
from common import runtime as rt
from common import pictures as P
from common.datasets import DOMAINS, read_image, train_set
from mada.releases import load_segmenter
from common.transforms import to_tensor
from mada import core


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--criterion", default="mada", choices=["mada", "madav2", "random"],
                   help="mada: nearest source anchor; madav2: + nearest target anchor; random: baseline")
    p.add_argument("--features", default="runs/mada/features/target_warmup",
                   help="target objective vectors (save_features.py --domain target)")
    p.add_argument("--source-anchors", default="runs/mada/anchors/source_warmup", help="anchors.npz or its folder, "
                   "or an official anchors file (MADA anchors/cluster_centroids_full_10.pkl, MADAv2 "
                   "anchors/cluster_centroids_sub_10.pkl)")
    p.add_argument("--target-anchors", default="runs/mada/anchors/target_warmup",
                   help="target (warm-up) anchors, for --criterion madav2: ours, or MADAv2's "
                   "anchors/cluster_centroids_sub_10_target_warmup.pkl")
    p.add_argument("--budget", type=float, default=0.05, help="fraction of the target training images")
    p.add_argument("--rounding", default=None, choices=["floor", "round"],
                   help="budget count: floor (MADA's int()) or round (MADAv2); default by criterion")
    p.add_argument("--absent", default="zero", choices=core.ABSENT_CHOICES,
                   help="zero: distances over all rows, absent ones zero (upstream); mask: over V's present "
                   "classes only (ablation)")
    p.add_argument("--sheet", type=int, default=48, help="images in the contact sheet (0: none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of --criterion random")
    p.add_argument("--out", default=None, help="output folder (default runs/mada/select_CRITERION)")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or f"runs/mada/select_{args.criterion}"
    args.rounding = args.rounding or ("round" if args.criterion == "madav2" else "floor")
    return args


def contact_sheet(names, meta, path, device, n_max=48, cols=4):
    """The selected images (at the evaluation size) beside the pseudo-labels of meta's checkpoint."""
    model, cfg, _ = load_segmenter(meta["checkpoint"], meta.get("checkpoint_format", "ours"))
    model = model.to(device).eval()
    h, w = DOMAINS[meta["dataset"]][4]
    root, tiles = Path(meta["root"]), []
    for name in names[:n_max]:
        img = read_image(root / name).resize((w, h), Image.BICUBIC)
        with torch.no_grad():
            out = model(to_tensor(img, cfg["norm"])[None].to(device))["out"]
            pred = torch.nn.functional.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
        lab = L.colorize(pred.argmax(1)[0].cpu().numpy(), cfg["num_classes"])
        tiles.append(np.concatenate([np.asarray(img), lab], 1))
    rows = [np.concatenate(tiles[i:i + cols] + [np.zeros_like(tiles[0])] * (cols - len(tiles[i:i + cols])), 1)
            for i in range(0, len(tiles), cols)]
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(np.concatenate(rows, 0)).save(tmp)
    tmp.replace(path)


def selection_pictures(args, meta, chosen, scores, out):
    """selection.png: the selected images (scores) above a random draw of the same size, each with its
    ground-truth class content; selection_classes.png: class shares of the selected pixels vs the target
    (common.pictures; the ground truth is read for these pictures only)."""
    try:
        data = train_set(meta["dataset"], meta["root"], meta["num_classes"], "imagenet", None)
    except FileNotFoundError as e:  # a target without train labels: no class content to show
        print(f"[pictures] skipped: {e}")
        return
    index = {data.name(i): i for i in range(len(data))}
    rand = np.random.default_rng([args.seed, 1]).choice(len(scores), len(chosen), replace=False)
    P.selection_pictures(data, [index[meta["names"][i]] for i in chosen], out / "selection.png",
                         f"MADA selection, criterion {args.criterion}, {len(chosen)} of {len(scores)} target images",
                         captions=[f"score {scores[i]:.4g}" for i in chosen],
                         compare=[index[meta["names"][i]] for i in sorted(rand)],
                         compare_title=f"a random draw of the same size ({len(chosen)} images, seed {args.seed})")


def main(args):
    vec, counts, meta = core.load_features(args.features)
    if meta["domain"] != "target":
        raise SystemExit(f"{args.features} holds {meta['domain']} vectors: selection scores target images "
                         f"(save_features.py --domain target)")
    c, dim = vec.shape[1:]
    src = core.load_anchors(args.source_anchors, c, dim)[0] if args.criterion != "random" else None
    tgt = core.load_anchors(args.target_anchors, c, dim)[0] if args.criterion == "madav2" else None
    for a in (src, tgt):
        if a is not None and a.shape[1:] != vec.shape[1:]:
            raise SystemExit(f"anchors {a.shape} do not match the vectors {vec.shape} of {args.features}")
    out = rt.prepare_run_dir(args.out, args)  # inputs checked first: a bad call moves nothing aside
    log = rt.RunLogger(out)
    n = len(vec)
    k = core.budget_count(n, args.budget, args.rounding)
    t0 = time.time()
    # -- method: score every target image by its distance to the anchors; label the farthest --
    if args.criterion == "random":
        scores = np.random.default_rng(args.seed).random(n)
    else:
        scores = core.selection_scores(vec, counts, src, tgt, args.criterion, meta["min_pixels"], args.absent)
    chosen = core.top_k(scores, k)
    # -- end of method --
    seconds = time.time() - t0
    names = [meta["names"][i] for i in chosen]
    np.save(out / "scores.tmp.npy", scores)
    (out / "scores.tmp.npy").replace(out / "scores.npy")
    sel = {"criterion": args.criterion, "budget": args.budget, "rounding": args.rounding, "n_target": n,
           "n_selected": k, "absent": args.absent, "seed": args.seed, "features": str(args.features),
           "source_anchors": str(args.source_anchors),
           "target_anchors": str(args.target_anchors) if args.criterion == "madav2" else None,
           "dataset": meta["dataset"], "root": meta["root"], "indices": chosen.tolist(), "names": names,
           "scores": [float(scores[i]) for i in chosen]}
    rt.atomic_write_text(out / "selected.txt", "\n".join(names) + "\n")
    rt.save_json(out / "selected.json", sel)
    official = core.write_official_selection(out, names, chosen, args.criterion, args.budget)  # upstream's format
    if args.sheet > 0:
        contact_sheet(names, meta, out / "contact_sheet.png", rt.setup_distributed(args.device)[2], args.sheet)
        selection_pictures(args, meta, chosen, scores, out)
    final = {"n_selected": k, "n_target": n, "criterion": args.criterion, "select_seconds": round(seconds, 3),
             "score_of_last_selected": float(scores[chosen].min()), "median_score": float(np.median(scores))}
    rt.save_json(out / "final.json", final)
    log.log({"event": "done", **final})
    print(f"[done] {k}/{n} target images selected ({args.criterion}) -> {out / 'selected.txt'}, {official[0]}")


if __name__ == "__main__":
    rt.run_main(main, parse_args)
