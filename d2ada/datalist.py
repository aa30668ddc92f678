r"""D2ADA datalists: what a labelled set holds (`summary`), and D2ADA's own superpixel maps put where this folder
reads superpixels (`import-superpixels`), so that a released datalist's region ids mean the regions they meant.

A datalist is D2ADA's datalist_0X.pkl (region mode; read through common.safe_pickle, nothing in it is run) or
datalist_0X.json (image mode), or ours (train_ada.py's datalist_XX.json); d2ada/releases.py says what its keys
mean. The summary counts source images, labelled and pool target images and regions; given the target dataset
(--target, --target-root, with superpixels), also the labelled pixel share and, per class, the labelled pixels,
the labelled regions (a region's class: the majority ground-truth class of its pixels) and the images holding
labelled pixels of the class.

Toy (a datalist of train_ada.py's toy run):
    python d2ada/datalist.py summary runs/d2ada/ada/datalist_01.json --target toy
D2ADA's released datalist, counts only / per class on Cityscapes:
    python d2ada/datalist.py summary datalist_05.pkl
    python d2ada/datalist.py summary datalist_05.pkl --target cityscapes --target-root /data/cityscapes
D2ADA's fast_slic superpixel maps (made by its data_preprocessing/superpixel_gen.py: <root>/superpixel/train/CITY/
*_superpixel.png, GTA5 <root>/superpixel/NNNNN.png) copied to this folder's layout (<root>/superpixel/<image path>):
    python d2ada/datalist.py import-superpixels --dataset cityscapes --data-root /data/cityscapes
    python d2ada/datalist.py import-superpixels --dataset gta5 --data-root /data/GTA5
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np
from PIL import Image

from common import labels as L, runtime as rt
from common.datasets import DOMAINS, build_dataset, resolve_domain, train_set
from d2ada import regions as R
from d2ada.releases import datalist_round, labeled_from_any_datalist, read_datalist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="print what a datalist holds")
    s.add_argument("datalist", help="datalist_0X.pkl / .json (D2ADA's) or datalist_XX.json (ours)")
    s.add_argument("--target", default=None, help="the target dataset (toy | cityscapes ...): per-class counts")
    s.add_argument("--target-root", default=None, help="dataset root of --target (toy: generated cache)")
    s.add_argument("--num-classes", type=int, default=None, choices=[19, 16, 13], help="label space (default 19)")
    s.add_argument("--json", default=None, help="also write the summary to this JSON file")
    s = sub.add_parser("import-superpixels", help="copy D2ADA's superpixel maps into this folder's layout")
    s.add_argument("--dataset", required=True, help="cityscapes | gta5 | synthia (or a toy_* name)")
    s.add_argument("--data-root", default=None, help="dataset root, holding D2ADA's superpixel/ maps")
    s.add_argument("--split", default=None, help="image split (default: the domain's training split)")
    s.add_argument("--replace", action="store_true", help="replace maps that exist in this folder's layout and "
                   "differ (default: stop and name the first)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------
def counts(d):
    """Counts a datalist holds by itself (no dataset needed)."""
    lab = d.get("trg_label_suppix") if isinstance(d.get("trg_label_suppix"), dict) else None
    pool = d.get("trg_pool_suppix") if isinstance(d.get("trg_pool_suppix"), dict) else None
    out = {"mode": "region" if lab is not None else "image", "source_images": len(d["src_label_im_idx"]),
           "labeled_images": len(d["trg_label_im_idx"]), "pool_images": len(d["trg_pool_im_idx"])}
    if lab is not None:
        per = [len(v) for v in lab.values()]
        out.update(labeled_regions=int(sum(per)), regions_per_labeled_image=
                   {"min": min(per, default=0), "mean": round(float(np.mean(per)), 2) if per else 0,
                    "max": max(per, default=0)})
    if pool is not None:
        out["pool_regions"] = int(sum(len(v) for v in pool.values()))
    return out


def per_class(labeled, target, num_classes):
    """Per class: labelled pixels, labelled regions (majority ground-truth class), images with labelled pixels."""
    px, regions, images = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64), np.zeros(num_classes, int)
    total = ignored = 0
    for i, ids in sorted(labeled.items()):
        img_path = target.files[i][0]
        lab = target.load_label(i)
        sp = R.read_superpixel(target.root, img_path, (lab.shape[1], lab.shape[0]))
        mask = np.isin(sp, sorted(ids))
        y = lab[mask].astype(np.int64)
        total += int(mask.sum())
        valid = y != 255
        ignored += int((~valid).sum())
        px += np.bincount(y[valid], minlength=num_classes)[:num_classes]
        images += np.bincount(y[valid], minlength=num_classes)[:num_classes] > 0
        for r in ids:
            yr = lab[sp == r].astype(np.int64)
            yr = yr[yr != 255]
            if yr.size:
                regions[np.bincount(yr, minlength=num_classes).argmax()] += 1
    return {"labeled_pixels": total, "ignored_pixels": ignored,
            "classes": {name: {"pixels": int(px[c]), "regions": int(regions[c]), "images": int(images[c])}
                        for c, name in enumerate(L.class_names(num_classes))}}


def summary(args):
    d = read_datalist(args.datalist)
    out = {"datalist": str(args.datalist), "round": datalist_round(args.datalist, d), **counts(d)}
    if args.target:
        name, kind, root = resolve_domain(args.target, args.target_root, "target")
        nc = args.num_classes or (13 if kind == "crosscity" else 19)
        target = train_set(name, root, nc, "imagenet", None)
        names = [target.name(i) for i in range(len(target))]
        inventory = R.region_inventory(target)
        labeled, matched = labeled_from_any_datalist(d, names, [], inventory, args.datalist)
        out["target"] = {"dataset": name, "images": len(target), "matched_labeled_images": matched["labeled_images"],
                         "labeled_regions": matched["labeled_regions"]}
        out["target"].update(per_class(labeled, target, nc))
        tot = float(sum(int(p.sum()) for p in inventory))
        out["target"]["labeled_percent"] = round(100.0 * out["target"]["labeled_pixels"] / max(tot, 1), 3)
    print(f"[datalist] {args.datalist}: {out['mode']} mode" + (f", round {out['round']}" if out["round"] is not None
                                                                else ""))
    print(f"  source images {out['source_images']}; target: labelled images {out['labeled_images']}, pool images "
          f"{out['pool_images']}" + (f"; labelled regions {out['labeled_regions']} (per labelled image "
                                     f"{out['regions_per_labeled_image']['min']}-"
                                     f"{out['regions_per_labeled_image']['max']}, mean "
                                     f"{out['regions_per_labeled_image']['mean']}), pool regions "
                                     f"{out.get('pool_regions', '-')}" if "labeled_regions" in out else ""))
    if "target" in out:
        t = out["target"]
        print(f"  on {t['dataset']} ({t['images']} training images): {t['labeled_pixels']} labelled pixels = "
              f"{t['labeled_percent']}% of the target pixels ({t['ignored_pixels']} of them ignore-labelled)")
        print(f"  {'class':<14} {'pixels':>12} {'regions':>8} {'images':>7}")
        for c, v in t["classes"].items():
            print(f"  {c:<14} {v['pixels']:>12} {v['regions']:>8} {v['images']:>7}")
    if args.json:
        rt.save_json(args.json, out)
    return out


# ------------------------------------------------------------------------------------------------
# import-superpixels
# ------------------------------------------------------------------------------------------------
def upstream_superpixel_path(root, image_path, kind):
    """Where D2ADA's superpixel_gen.py wrote an image's map: the image path with leftImg8bit -> superpixel
    (Cityscapes: folder and file name), images/ -> superpixel/ (GTA5), RGB/ -> superpixel/ (SYNTHIA)."""
    rel = Path(os.path.relpath(image_path, root)).as_posix()
    if kind == "cityscapes":
        return Path(root) / rel.replace("leftImg8bit", "superpixel")
    first = rel.split("/", 1)
    return Path(root) / "superpixel" / first[-1]


def import_superpixels(args):
    name, kind, root = resolve_domain(args.dataset, args.data_root, "target" if "cityscapes" in args.dataset
                                      else "source")
    split = args.split or DOMAINS[name][1]
    nc = 13 if kind == "crosscity" else 16 if kind == "synthia" else 19
    files = build_dataset(kind, root, split, nc, with_labels=False).files
    plan = []
    for img, _ in files:
        src, dst = upstream_superpixel_path(root, img, kind), R.superpixel_path(root, img)
        if not src.is_file():
            raise rt.InputError(f"D2ADA's superpixel map of {img} not found: expected {src} (made by D2ADA's "
                                f"data_preprocessing/superpixel_gen.py --dataset {kind} --datadir {root})")
        plan.append((img, src, dst))
    copied = same = 0
    for img, src, dst in plan:   # checked and copied one by one; each copy atomic
        with Image.open(src) as im, Image.open(img) as ref:
            if im.mode not in ("L", "P") or im.size != ref.size:
                raise rt.InputError(f"{src} is not a single-channel map of {img}'s size ({im.mode} {im.size} vs "
                                    f"{ref.size})")
        if dst.exists():
            if dst.read_bytes() == src.read_bytes():
                same += 1
                continue
            if not args.replace:
                raise rt.InputError(f"{dst} exists and differs from D2ADA's {src} ({copied} copied so far): pass "
                                    f"--replace to use D2ADA's maps instead")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp.png")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        copied += 1
    print(f"[done] {name} ({split}): {copied} maps copied, {same} identical already -> {root / R.SUPERPIXEL_DIR}")
    return copied


def main(args):
    return summary(args) if args.command == "summary" else import_superpixels(args)


if __name__ == "__main__":
    rt.run_main(main, parse_args)
