r"""Class content of what each active selector picked, against the target's class frequencies, summed over seeds.

Reads the selection files that mada/select_active.py, d2ada/train_ada.py and ssada/train_ssada.py write in a
benchmark run folder, and the target's ground-truth labels (used only here, after the fact, to describe the
selection; no selector sees them). Prints one Markdown table per method family:

    python benchmark/selection_histogram.py                      # benchmark/out, every seed found
    python benchmark/selection_histogram.py --out /work/bench/out --seeds 0 1 2

Columns: the share of the selected labelled pixels per class (image selectors: all pixels of the selected
images; region selectors: the pixels of the selected regions), the same over the whole target train split,
and, for image selectors, the share of selected images that contain each of the target's rarest classes.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import labels as L  # noqa: E402
from common.toy import toy_root  # noqa: E402

NAMES = L.class_names(19)


def label_path(root, image_rel):
    """leftImg8bit/<split>/<city>/<name>_leftImg8bit.png -> gtFine/.../<name>_gtFine_labelIds.png"""
    rel = image_rel.replace("leftImg8bit/", "gtFine/", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    return Path(root) / rel


def train_ids(path, lut):
    return lut[np.asarray(Image.open(path))]


def class_hist(lab):
    return np.bincount(lab[lab < 19].ravel(), minlength=19).astype(np.float64)


def image_selectors(out, seeds):
    """{selector: [(root, [image_rel, ...]) per seed]} from mada's select_* folders and from SS-ADA's rounds
    (the images its acquisition picked in rounds 1.., not the initial random draw of round_00_init)."""
    found = {}
    for s in seeds:
        for d in sorted((Path(out) / f"seed{s}" / "mada").glob("select_*")):
            meta = json.loads((d / "selected.json").read_text())
            rel = (d / "selected.txt").read_text().split()
            found.setdefault(d.name[len("select_"):], []).append((meta["root"], rel))
        for d in sorted((Path(out) / f"seed{s}").glob("ssada_*")):
            picked = [r for f in sorted(d.glob("rounds/round_*/selected.txt")) if "init" not in f.parent.name
                      for r in f.read_text().split()]
            if picked:
                cfg = json.loads((d / "config.json").read_text())
                root = cfg.get("target_root") or str(toy_root() / "toy_cityscapes")
                found.setdefault(d.name, []).append((root, picked))
    return found


D2ADA_RUNS = {"d2ada_ada": "D2ADA", "d2ada_random": "random regions", "d2ada_uncertainty": "uncertainty only",
              "d2ada_pca32": "D2ADA, 32-d PCA density"}


def region_selectors(out, seeds):
    """{selector: [(root, {image_rel: [region ids]}) per seed]} from d2ada/train_ada.py's last datalist (the
    regions labelled after the last round)."""
    found = {}
    for s in seeds:
        for run, name in D2ADA_RUNS.items():
            lists = sorted((Path(out) / f"seed{s}" / run).glob("datalist_*.json"))
            if not lists:
                continue
            cfg = json.loads((Path(out) / f"seed{s}" / run / "config.json").read_text())
            root = cfg.get("target_root") or str(toy_root() / "toy_cityscapes")
            found.setdefault(name, []).append((root, json.loads(lists[-1].read_text())["trg_label_suppix"]))
    return found


def print_table(title, rows, tgt_share):
    names = list(rows)
    print(title + "\n")
    print("| class | target | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for c in np.argsort(-tgt_share):
        if tgt_share[c] == 0 and all(rows[n][c] == 0 for n in names):
            continue
        print(f"| {NAMES[c]} | {100 * tgt_share[c]:.2f} | " + " | ".join(f"{100 * rows[n][c]:.2f}" for n in names) + " |")
    tv = {n: 0.5 * np.abs(rows[n] - tgt_share).sum() for n in names}
    print("\nTotal-variation distance of the selected class shares from the target's: "
          + ", ".join(f"{n} {100 * v:.1f}%" for n, v in tv.items()) + "\n")


_TARGET_CACHE = {}


def target_stats(root):
    """(per-image train-id maps, class shares, hard-city image set) of a toy target's train split, cached."""
    root = str(root)
    if root not in _TARGET_CACHE:
        lut = L.lut_from_map(L.CITYSCAPES_ID_TO_TRAINID, 19)
        imgs = sorted(str(q.relative_to(root)) for q in (Path(root) / "leftImg8bit" / "train").rglob("*.png"))
        cache = {r: train_ids(label_path(root, r), lut) for r in imgs}
        tgt = sum(class_hist(v) for v in cache.values())
        hard_file = Path(root) / "hard.txt"  # toy v3 only: the hard city's image names
        hard_names = set(hard_file.read_text().split()) if hard_file.exists() else set()
        hard = {r for r in imgs if Path(r).name in hard_names}
        _TARGET_CACHE[root] = (cache, tgt / tgt.sum(), hard)
    return _TARGET_CACHE[root]


def selection_stats(run_dir, kind, root, rare=()):
    """Mechanism diagnostics of one active run, after the fact (ground truth used only here):
    class_tv: total-variation distance between the class shares of the selected labelled pixels and the target
    train split's; rare_share / rare_share_target: the share of those pixels in the classes `rare` (train ids),
    selected vs the whole split; hard_share / hard_share_target: the share of the selected images (region
    selectors: of the selected pixels) from the hard city (toy v3's hard.txt), vs the split's share.
    kind: 'mada' (select_*/selected.txt), 'ssada' (rounds 1.. of an SS-ADA run: what its acquisition picked,
    not the initial random draw), 'd2ada' (the regions of the last datalist). None when nothing is found."""
    run_dir = Path(run_dir)
    cache, tgt_share, hard = target_stats(root)
    h, n_hard, n = np.zeros(19), 0.0, 0.0
    if kind == "d2ada":
        lists = sorted(run_dir.glob("datalist_*.json"))
        if not lists:
            return None
        from d2ada.regions import read_superpixel
        for rel, ids in json.loads(lists[-1].read_text())["trg_label_suppix"].items():
            m = np.isin(read_superpixel(root, Path(root) / rel), ids)
            h += class_hist(cache[rel][m])
            k = float(m.sum())
            n += k
            n_hard += k if rel in hard else 0.0
    else:
        files = ([run_dir / "selected.txt"] if kind == "mada" else
                 [q for q in sorted(run_dir.glob("rounds/round_*/selected.txt")) if "init" not in q.parent.name])
        rel = [r for q in files if q.exists() for r in q.read_text().split()]
        if not rel:
            return None
        h = sum(class_hist(cache[r]) for r in rel)
        n, n_hard = float(len(rel)), float(sum(r in hard for r in rel))
    share = h / max(h.sum(), 1)
    rare = list(rare)
    return {"class_tv": round(float(0.5 * np.abs(share - tgt_share).sum()), 4),
            "rare_share": round(float(share[rare].sum()), 4) if rare else None,
            "rare_share_target": round(float(tgt_share[rare].sum()), 4) if rare else None,
            "hard_share": round(n_hard / n, 4) if hard and n else None,
            "hard_share_target": round(len(hard) / len(cache), 4) if hard else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmark" / "out"), help="the benchmark's --out folder")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed<N> folder found")
    p.add_argument("--rare", type=int, default=4, help="how many of the target's rarest classes to report")
    a = p.parse_args()
    seeds = a.seeds if a.seeds is not None else sorted(int(d.name[4:]) for d in Path(a.out).glob("seed*"))
    lut = L.lut_from_map(L.CITYSCAPES_ID_TO_TRAINID, 19)
    sel, reg = image_selectors(a.out, seeds), region_selectors(a.out, seeds)
    if not sel and not reg:
        sys.exit(f"no mada/select_* or d2ada datalists under {a.out}/seed{{{','.join(map(str, seeds))}}}")
    root = (next(iter(sel.values())) if sel else next(iter(reg.values())))[0][0]
    sel = {f"{k} (n={len(v)})": v for k, v in sel.items()}  # n = seeds found for that selector
    reg = {f"{k} (n={len(v)})": v for k, v in reg.items()}
    all_imgs = sorted(str(q.relative_to(root)) for q in (Path(root) / "leftImg8bit" / "train").rglob("*.png"))
    cache = {r: train_ids(label_path(root, r), lut) for r in all_imgs}
    tgt = sum(class_hist(v) for v in cache.values())
    tgt_share = tgt / tgt.sum()
    present = {r: class_hist(v) > 0 for r, v in cache.items()}
    base_rate = np.mean([present[r] for r in all_imgs], axis=0)
    rare = [c for c in np.argsort(tgt_share) if tgt_share[c] > 0][:a.rare]
    if reg:
        from d2ada.regions import read_superpixel
        rows = {}
        for name, per_seed in reg.items():
            h = np.zeros(19)
            for r_root, picked in per_seed:
                for rel, ids in picked.items():
                    m = np.isin(read_superpixel(r_root, Path(r_root) / rel), ids)
                    h += class_hist(cache[rel][m])
            rows[name] = h / h.sum()
        print_table(f"D2ADA region selectors, seeds {seeds}: class share of the labelled pixels after the last round "
                    f"(%) vs the target train split ({len(all_imgs)} images)", rows, tgt_share)
    if not sel:
        return
    rows, rare_rows = {}, {}
    for name, per_seed in sel.items():
        h = sum(class_hist(cache[r]) for _, rel in per_seed for r in rel)
        rows[name] = h / h.sum()
        rare_rows[name] = np.mean([present[r] for _, rel in per_seed for r in rel], axis=0)
    names = list(rows)
    print_table(f"Image selectors (MADA select_*, SS-ADA ssada_*), seeds {seeds}: class share of the selected images' "
                f"pixels (%) vs the target train split ({len(all_imgs)} images)", rows, tgt_share)
    print(f"Share of selected images containing each of the {a.rare} rarest target classes (%), vs every target image:\n")
    print("| class | all target images | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for c in rare:
        print(f"| {NAMES[c]} | {100 * base_rate[c]:.1f} | " + " | ".join(f"{100 * rare_rows[n][c]:.1f}" for n in names) + " |")
    print("\nClasses present per image (mean): every target image "
          f"{np.mean([present[r].sum() for r in all_imgs]):.2f}; "
          + ", ".join(f"{n} {np.mean([present[r].sum() for _, rel in sel[n] for r in rel]):.2f}" for n in names))


if __name__ == "__main__":
    main()
