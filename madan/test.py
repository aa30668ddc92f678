r"""Evaluate MADAN checkpoints (any segmenter of this folder: FCN8s-VGG16 or DeepLab) on the target: mIoU
(16 classes + 13-class mIoU* when a SYNTHIA source is involved, as in MADAN's multi-source table), the
per-class IoU table, optional flip TTA, colour-coded predictions. Two protocols (--protocol):
  madan  upstream's scripts/eval_fcn.py (default on real data): the FULL 2048x1024 image in, no resize; with
         the 19-class model of the paper preset, mIoU16 = (sum of the IoUs of the 16 classes other than
         terrain, truck, train) / 16 (eval_fcn.py:118-131; a class absent from GT and prediction counts 0).
  segda  this repository's (default on toy): images at the domain's evaluation size (Cityscapes 1024x512),
         logits upsampled to the label resolution, nanmean over the model's classes.

    L = nothing (evaluation only)

Toy (no arguments: the MADAN+ADDA model on the toy target val split):
    python madan/test.py
The held-out toy test split (what the benchmark reports):
    python madan/test.py --checkpoint runs/madan/adda/model.pth --split test
Logit-averaging ensemble of two checkpoints:
    python madan/test.py --checkpoint runs/madan/adda/model.pth --ensemble runs/madan/mdan/model.pth
Best snapshot vs last (both reported, labelled; 'best' is chosen ON the split it is reported on):
    python madan/test.py --checkpoint runs/madan/segmenter/model.pth --snapshots runs/madan/segmenter/snapshots
Cityscapes val, flip TTA:
    python madan/test.py --checkpoint model.pth --target cityscapes --target-root /data/cityscapes --flip
AdaBN control (BN running statistics re-estimated on the unlabelled target train split; DeepLab only, FCN8s
has no BN): what a model gains from target BN statistics alone, which ADDA and MDAN also get from their target
batches in train mode:
    python madan/test.py --checkpoint runs/madan/combined/model.pth --split test --adabn
torchrun (the evaluation is sharded and the confusion matrix all-reduced):
    torchrun --nproc_per_node=2 madan/test.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

from common import runtime as rt
from common.datasets import DOMAINS, build_dataset, eval_set, resolve_domain
from common.evaluate import adabn_on_domain, evaluate  # adabn_on_domain: the AdaBN control (--adabn)
from common.metrics import format_table
from common.fcn import segmenter_from_checkpoint
from common.transforms import Compose
from madan.releases import FORMAT_HELP, FORMATS, load_segmenter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/madan/adda/model.pth", help="model.pth of a run")
    p.add_argument("--ensemble", default=None, help="second checkpoint; logits averaged 0.5/0.5 (ADVENT)")
    p.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --checkpoint and --ensemble: "
                   + FORMAT_HELP)
    p.add_argument("--snapshots", default=None, help="folder of snapshot checkpoints: also report the best one")
    p.add_argument("--target", default="toy", help="target domain (toy | cityscapes | crosscity ...)")
    p.add_argument("--target-root", default=None, help="dataset root of --target (toy: generated cache)")
    p.add_argument("--split", default=None, help="evaluation split (default: the domain's val split; toy: val)")
    p.add_argument("--protocol", default=None, choices=["madan", "segda"], help="madan: full-resolution input, "
                   "sum of the 16 common IoUs / 16 (upstream eval_fcn.py); segda: the domain's evaluation size, "
                   "nanmean (default: madan on real data, segda on toy)")
    p.add_argument("--flip", action="store_true", help="flip test-time augmentation (average of probabilities)")
    p.add_argument("--save-predictions", type=int, default=8, help="colour PNGs of the first N predictions "
                   "and predictions/grid.png (input | ground truth | prediction | errors of the first 4, legend)")
    p.add_argument("--save-label-ids", default=None, metavar="DIR", help="write EVERY prediction to DIR (new or "
                   "empty) as a single-channel PNG of Cityscapes label ids at the label's resolution, "
                   "CITY_SEQ_FRAME_pred_labelIds.png: what cityscapesscripts and the benchmark server read")
    p.add_argument("--adabn", action="store_true", help="AdaBN: re-estimate BN running statistics on the "
                   "unlabelled target train split before evaluating (a control, see above)")
    p.add_argument("--adabn-images", type=int, default=0, help="AdaBN: use the first N shuffled images (0 = all)")
    p.add_argument("--amp", default="auto", choices=rt.AMP_CHOICES)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="where to write final.json, iou_table.md, predictions/ "
                   "(default: CHECKPOINT's folder/eval_SPLIT)")
    args = p.parse_args(argv)
    if args.protocol is None:  # upstream's protocol on real data, this repository's on the toy domains
        args.protocol = "segda" if str(args.target).startswith("toy") else "madan"
    return args


def eval_data(tgt, root, num_classes, norm, split, protocol):
    """The evaluation split: 'madan' feeds the image at full resolution (upstream eval_fcn.py: the network's
    transform only), 'segda' resizes it to the domain's evaluation size. Labels stay at full resolution."""
    if protocol == "segda":
        return eval_set(tgt, root, num_classes, norm, split)
    kind, _, default_split = DOMAINS[tgt][:3]
    return build_dataset(kind, root, split or default_split, num_classes, Compose([]), norm)


def madan_miou16(res, num_classes):
    """Upstream's reported number (eval_fcn.py:118-131): sum of the per-class IoUs of the 16 common classes
    (all but terrain, truck, train) / 16; a class with no pixel in GT or prediction counts 0, not NaN."""
    iou = [0.0 if v is None else v for k, v in res["per_class"].items() if k not in ("terrain", "truck", "train")]
    assert len(iou) == 16, (num_classes, len(iou))
    return sum(iou) / 16


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    amp = rt.amp_dtype(args.amp, device)
    model, cfg, fmt = load_segmenter(args.checkpoint, args.checkpoint_format)  # strict; official releases too
    if rank == 0:
        print(f"[test] {args.checkpoint}: format {fmt}", flush=True)
    model = model.to(device, memory_format=rt.memory_format(amp))
    other = None
    if args.ensemble:
        other, cfg2, fmt2 = load_segmenter(args.ensemble, args.checkpoint_format)
        if rank == 0:
            print(f"[test] {args.ensemble}: format {fmt2}", flush=True)
        if (cfg2["num_classes"], cfg2["norm"]) != (cfg["num_classes"], cfg["norm"]):
            raise SystemExit(f"cannot ensemble {args.checkpoint} and {args.ensemble}: different classes or input norm")
        other = other.to(device, memory_format=rt.memory_format(amp))
    tgt, _, root = resolve_domain(args.target, args.target_root, "target")
    protocol = args.protocol
    data = eval_data(tgt, root, cfg["num_classes"], cfg["norm"], args.split, protocol)
    split = args.split or "val"
    out = Path(args.out or Path(args.checkpoint).parent / f"eval_{split}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    if args.adabn:
        if other is not None:
            raise SystemExit("--adabn with --ensemble is not supported")
        n = adabn_on_domain(model, tgt, root, cfg["num_classes"], cfg["norm"], device, amp, args.adabn_images,
                            args.workers, world)
        print(f"[test] AdaBN: BN statistics re-estimated on {n} {tgt} train images")
    res = evaluate(model, data, cfg["num_classes"], device, amp, args.flip,
                   save_dir=out / "predictions" if args.save_predictions else None, n_save=args.save_predictions,
                   rank=rank, world_size=world, workers=args.workers, ensemble=other,
                   label_id_dir=args.save_label_ids)
    report = {"checkpoint": str(args.checkpoint), "ensemble": args.ensemble, "checkpoint_format": fmt,
              "target": tgt, "split": split,
              "flip": args.flip, "adabn": args.adabn, "protocol": protocol, "last": res, "mIoU": res["mIoU"],
              "images": len(data),
              "seconds": round(time.time() - t0, 1)}
    if protocol == "madan" and cfg["num_classes"] in (16, 19):
        res["mIoU16_madan"] = report["mIoU16_madan"] = madan_miou16(res, cfg["num_classes"])
    # Snapshot scan: papers report the best snapshot on the 500-image val set. We report both and label
    # them: 'best' is selected on this very split, so it is optimistic.
    if args.snapshots:
        scan = {}
        for snap in sorted(Path(args.snapshots).glob("*.pth")):
            m, _ = segmenter_from_checkpoint(snap)
            m = m.to(device, memory_format=rt.memory_format(amp))
            scan[snap.name] = evaluate(m, data, cfg["num_classes"], device, amp, args.flip, rank=rank,
                                       world_size=world, workers=args.workers)["mIoU"]
        if scan:
            name = max(scan, key=scan.get)
            report["snapshots"] = scan
            report["best_snapshot"] = {"name": name, "mIoU": scan[name],
                                       "note": f"selected on {split}: optimistic, not comparable to 'last'"}
    if rank == 0:
        rt.save_json(out / "final.json", report)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        line = f"[test] {tgt}/{split} ({protocol} protocol): last mIoU {res['mIoU']:.2f}"
        for k in ("mIoU16", "mIoU13", "mIoU16_madan"):
            if k in res:
                line += f"  {k} {res[k]:.2f}"
        if "best_snapshot" in report:
            line += f"  | best snapshot {report['best_snapshot']['name']} {report['best_snapshot']['mIoU']:.2f} (on {split})"
        print(line + f" -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
