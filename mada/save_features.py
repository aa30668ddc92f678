r"""Per-image objective vectors (MADA Sec. 3.2; upstream savefeat_source.py / savefeat_target.py):
for every training image of a domain, V = [C, 256], row c = mean of the 256-d decoder feature over
M_c = (label == c) AND (argmax == c) at feature resolution; source: label = ground truth (model and
annotation agree), target: label = the model's own prediction (no target label is read). Classes
with fewer than --min-pixels pixels keep a zero row (and their count says so).

    V_c = sum_{p in M_c} f_p / |M_c|    if |M_c| >= 10, else 0

The vectors are streamed to OUT/vectors.npy (an on-disk [N, C, 256] float32 array, written through
np.lib.format.open_memmap, renamed into place when complete), with OUT/counts.npy ([N, C] pixel counts)
and OUT/meta.json (image names, checkpoint, domain). Never pickled; an earlier OUT is moved aside.

Toy (no arguments: the warm-up model, toy source):
    python mada/save_features.py
Target vectors of the warm-up model (MADAv2 target anchors), and of the stage-1 model (stage 2):
    python mada/save_features.py --domain target
    python mada/save_features.py --domain target --checkpoint runs/mada/stage1/model.pth
GTA5 / Cityscapes:
    python mada/save_features.py --domain source --source gta5 --source-root /data/GTA5 \
        --checkpoint runs/mada/warmup/model.pth --out runs/mada/features/source_warmup
    python mada/save_features.py --domain target --target cityscapes --target-root /data/cityscapes
torchrun (each rank writes its rows of the same array):
    torchrun --nproc_per_node=2 mada/save_features.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np
import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.datasets import DOMAINS, TOY_ALIASES, eval_loader, resolve_domain, train_set
from mada.releases import FORMAT_HELP, FORMATS, load_segmenter
from common.transforms import Compose, Resize
from mada import core


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="source", choices=["source", "target"],
                   help="source: mask = GT and prediction agree; target: mask = prediction")
    p.add_argument("--checkpoint", default="runs/mada/warmup/model.pth", help="model.pth (DeepLabV3+) of a run")
    p.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --checkpoint: " + FORMAT_HELP)
    p.add_argument("--source", default="toy", help="source domain (toy | gta5 | synthia ...)")
    p.add_argument("--source-root", default=None, help="dataset root of --source (toy: generated cache)")
    p.add_argument("--target", default="toy", help="target domain (toy | cityscapes ...)")
    p.add_argument("--target-root", default=None, help="dataset root of --target (toy: generated cache)")
    p.add_argument("--min-pixels", type=int, default=10, help="a class needs this many mask pixels (upstream 10)")
    p.add_argument("--size", type=cli.hw, default=None, help="H,W the images are resized to (default: toy, the "
                   "domain's training size; real data, upstream's full resolution: GTA5 1052x1914, Cityscapes "
                   "1024x2048, configs/CAC_from_gta_to_city_*.yml / Select_from_gta_to_city.yml)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (toy 8; real data 1, as "
                   "upstream)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images (quick checks)")
    p.add_argument("--amp", default="auto", choices=rt.AMP_CHOICES)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="output folder (default runs/mada/features/DOMAIN_RUN, RUN = "
                   "the checkpoint's run folder name)")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # prepare_run_dir's argument
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"runs/mada/features/{args.domain}_{Path(args.checkpoint).resolve().parent.name}"
    name = args.source if args.domain == "source" else args.target
    toy = str(name).startswith("toy")
    dom = TOY_ALIASES[args.domain] if name == "toy" else name
    if args.size is None and dom in DOMAINS:
        args.size = DOMAINS[dom][3] if toy else core.UPSTREAM_HW.get(DOMAINS[dom][0], DOMAINS[dom][3])
    if args.batch_size is None:
        args.batch_size = 8 if toy else 1
    return args


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank)
    log = rt.RunLogger(out, rank)
    model, cfg, fmt = load_segmenter(args.checkpoint, args.checkpoint_format)  # strict; MADA's releases too
    if cfg["model"] != "deeplabv3plus":
        raise SystemExit(f"{args.checkpoint} is a {cfg['model']}: MADA's objective vectors need the DeepLabV3+ "
                         f"decoder feature (train it with mada/warmup.py)")
    model = model.to(device, memory_format=rt.memory_format(amp)).eval()
    c = cfg["num_classes"]

    # ---- data: the domain's training images at --size (real data: full resolution), no augmentation --
    name, root = (args.source, args.source_root) if args.domain == "source" else (args.target, args.target_root)
    dom, _, root = resolve_domain(name, root, args.domain)
    resize = Resize(args.size) if dom.startswith("toy") else Resize(args.size, interp="bilinear")
    data = train_set(dom, root, c, cfg["norm"], Compose([resize]), with_labels=args.domain == "source")
    n = len(data) if args.max_images is None else min(len(data), args.max_images)
    names = [data.name(i) for i in range(n)]
    if n < len(data):
        data = core.IndexedSubset(data, range(n))  # the first n images: item index = row

    # ---- the on-disk arrays (rank 0 creates, every rank writes its shard, rank 0 renames) ------------
    tmp_v, tmp_c = out / "vectors.tmp.npy", out / "counts.tmp.npy"
    if rank == 0:
        np.lib.format.open_memmap(tmp_v, mode="w+", dtype=np.float32, shape=(n, c, 256)).flush()
        np.lib.format.open_memmap(tmp_c, mode="w+", dtype=np.int32, shape=(n, c)).flush()
    rt.barrier()
    vec_mm = np.lib.format.open_memmap(tmp_v, mode="r+")
    cnt_mm = np.lib.format.open_memmap(tmp_c, mode="r+")

    # -- method: objective vectors under the agreement mask (source) / the prediction (target) --
    t0, done = time.time(), 0  # done = batches of this rank
    with torch.no_grad():
        for batch in eval_loader(data, args.batch_size, args.workers, rank, world):
            x = rt.to_device(batch["image"], device, amp)
            with rt.autocast(device, amp):
                o = model(x, return_feat=True)
            feat, logits = o["feat"].float(), o["out"].float()
            if args.domain == "source":
                label = core.downsample_label(batch["label"].to(device), feat.shape[-2:])
            else:
                label = logits.argmax(1)
            v, cnt = core.objective_vectors(feat, logits, label, c, args.min_pixels)
            idx = batch["index"].numpy()
            vec_mm[idx] = v.cpu().numpy()
            cnt_mm[idx] = cnt.cpu().numpy()
            done += 1
            if rank == 0 and done % 25 == 0:
                print(f"[features] ~{done * args.batch_size * world}/{n} images ({time.time() - t0:.0f}s)", flush=True)
    # -- end of method --
    vec_mm.flush()
    cnt_mm.flush()
    del vec_mm, cnt_mm
    rt.barrier()

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        meta = {"domain": args.domain, "dataset": dom, "root": str(root), "checkpoint": str(args.checkpoint),
                "checkpoint_format": fmt.split()[0], "num_classes": c, "min_pixels": args.min_pixels, "shape": [n, c, 256], "names": names}
        rt.save_json(out / "meta.json", meta)
        tmp_v.replace(out / "vectors.npy")
        tmp_c.replace(out / "counts.npy")
        counts = np.load(out / "counts.npy")
        present = (counts >= args.min_pixels).mean(0)
        final = {"images": n, "seconds": round(time.time() - t0, 1), "mean_present_classes":
                 float((counts >= args.min_pixels).sum(1).mean()), "class_presence": present.round(4).tolist()}
        rt.save_json(out / "final.json", final)
        log.log({"event": "done", **{k: v for k, v in final.items() if k != "class_presence"}})
        print(f"[done] {n} x {c} x 256 objective vectors -> {out / 'vectors.npy'}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
