r"""Evaluate checkpoints on the target: 19-class mIoU (16 + 13-class mIoU* for SYNTHIA models), the
per-class IoU table, optional flip TTA, colour-coded predictions. The protocol of AdaptSegNet/ADVENT:
images at the evaluation size (Cityscapes 1024x512), logits upsampled to the full label resolution.

    L = nothing (evaluation only)

Toy (no arguments: the source-only run's model on the toy target val split):
    python advent_maxsquare/test.py
The held-out toy test split (what the benchmark reports):
    python advent_maxsquare/test.py --checkpoint runs/advent_maxsquare/source/model.pth --split test
Logit-averaging ensemble of two checkpoints (ADVENT's AdvEnt+MinEnt):
    python advent_maxsquare/test.py --checkpoint runs/.../advent/model.pth --ensemble runs/.../minent/model.pth
Best snapshot vs last (both reported, labelled; 'best' is chosen ON the split it is reported on):
    python advent_maxsquare/test.py --checkpoint runs/advent_maxsquare/source/model.pth \
        --snapshots runs/advent_maxsquare/source/snapshots
Cityscapes val, flip TTA:
    python advent_maxsquare/test.py --checkpoint model.pth --target cityscapes --target-root /data/cityscapes --flip
AdaBN baseline (Li et al. 2016): BN running statistics re-estimated on the unlabelled target train split
(no weights change) before evaluating; on the toy pair this alone is most of every adaptation script's gain,
since those scripts forward target batches in train mode:
    python advent_maxsquare/test.py --checkpoint runs/advent_maxsquare/source/model.pth --split test --adabn
torchrun (the evaluation is sharded and the confusion matrix all-reduced):
    torchrun --nproc_per_node=2 advent_maxsquare/test.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

from common import runtime as rt
from common.datasets import eval_set, resolve_domain
from common.evaluate import adabn_on_domain, evaluate  # adabn_on_domain: the AdaBN control (--adabn)
from common.metrics import format_table
from common.models import segmenter_from_checkpoint
from common.transforms import Compose, Resize
from advent_maxsquare.releases import FORMAT_HELP, FORMATS, load_segmenter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/advent_maxsquare/source/model.pth", help="model.pth of a run")
    p.add_argument("--ensemble", default=None, help="second checkpoint; logits averaged 0.5/0.5 (ADVENT)")
    p.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --checkpoint and --ensemble: "
                   + FORMAT_HELP)
    p.add_argument("--snapshots", default=None, help="folder of snapshot checkpoints: also report the best one")
    p.add_argument("--target", default="toy", help="target domain (toy | cityscapes | crosscity ...)")
    p.add_argument("--target-root", default=None, help="dataset root of --target (toy: generated cache)")
    p.add_argument("--split", default=None, help="evaluation split (default: the domain's val split; toy: val)")
    p.add_argument("--flip", action="store_true", help="flip test-time augmentation (average of probabilities)")
    p.add_argument("--resize-labels", action="store_true", help="MaxSquare's protocol (tools/evaluate.py:248-251): "
                   "labels resized (nearest) to the evaluation input size, instead of the prediction upsampled to "
                   "the full label resolution (AdaptSegNet/ADVENT, the default)")
    p.add_argument("--save-predictions", type=int, default=8, help="colour PNGs of the first N predictions "
                   "and predictions/grid.png (input | ground truth | prediction | errors of the first 4, legend)")
    p.add_argument("--save-label-ids", default=None, metavar="DIR", help="write EVERY prediction to DIR (new or "
                   "empty) as a single-channel PNG of Cityscapes label ids at the label's resolution, "
                   "CITY_SEQ_FRAME_pred_labelIds.png: what cityscapesscripts and the benchmark server read")
    p.add_argument("--adabn", action="store_true", help="AdaBN: re-estimate BN running statistics on the "
                   "unlabelled target train split (cumulative average, train-time input size) before evaluating")
    p.add_argument("--adabn-images", type=int, default=0, help="AdaBN: use the first N shuffled images (0 = all)")
    p.add_argument("--amp", default="auto", choices=rt.AMP_CHOICES)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="where to write final.json, iou_table.md, predictions/ "
                   "(default: CHECKPOINT's folder/eval_SPLIT)")
    return p.parse_args(argv)


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
    data = eval_set(tgt, root, cfg["num_classes"], cfg["norm"], args.split)
    if args.resize_labels:  # MaxSquare: image and label both at the input size (nearest for the label)
        data.transform = Compose([Resize(data.transform.transforms[0].size_hw)])
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
              "flip": args.flip, "resize_labels": args.resize_labels, "adabn": args.adabn, "last": res,
              "mIoU": res["mIoU"], "images": len(data),
              "seconds": round(time.time() - t0, 1)}
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
        line = f"[test] {tgt}/{split}: last mIoU {res['mIoU']:.2f}"
        for k in ("mIoU16", "mIoU13"):
            if k in res:
                line += f"  {k} {res[k]:.2f}"
        if "best_snapshot" in report:
            line += f"  | best snapshot {report['best_snapshot']['name']} {report['best_snapshot']['mIoU']:.2f} (on {split})"
        print(line + f" -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
