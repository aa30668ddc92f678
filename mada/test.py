r"""Evaluate MADA / MADAv2 checkpoints on the target: 19-class mIoU (16 + 13-class mIoU* for SYNTHIA
models), the per-class IoU table, optional flip TTA, colour-coded predictions. Protocol: images at the
evaluation size, logits upsampled to the full label resolution. Real data: upstream's full-resolution input
(Cityscapes val at 1024x2048, MADA configs/test_from_gta_to_city.yml); toy: the shared protocol of common.

    L = nothing (evaluation only)

Toy (no arguments: the MADA stage-2 model on the toy target val split):
    python mada/test.py
The held-out toy test split (what the benchmark reports):
    python mada/test.py --checkpoint runs/mada/stage2_semi/model.pth --split test
Cityscapes val, flip TTA:
    python mada/test.py --checkpoint model.pth --target cityscapes --target-root /data/cityscapes --flip
MADA's released stage-2 model (their Google Drive weights; mada/releases.py, paper: 64.9 mIoU):
    python mada/test.py --checkpoint from_gta5_to_cityscapes_on_deeplab101_best_model_stage2.pkl \
        --checkpoint-format mada --target cityscapes --target-root /data/cityscapes
torchrun (the evaluation is sharded and the confusion matrix all-reduced):
    torchrun --nproc_per_node=2 mada/test.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

from common import cli, runtime as rt
from common.datasets import DOMAINS, resolve_domain
from common.evaluate import evaluate
from common.metrics import format_table
from common.models import segmenter_from_checkpoint
from mada.releases import FORMAT_HELP, FORMATS, load_segmenter
from mada import core


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/mada/stage2/model.pth", help="model.pth of a run")
    p.add_argument("--ensemble", default=None, help="second checkpoint; logits averaged 0.5/0.5")
    p.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --checkpoint and --ensemble: "
                   + FORMAT_HELP)
    p.add_argument("--snapshots", default=None, help="folder of snapshot checkpoints: also report the best one")
    p.add_argument("--target", default="toy", help="target domain (toy | cityscapes | crosscity ...)")
    p.add_argument("--target-root", default=None, help="dataset root of --target (toy: generated cache)")
    p.add_argument("--split", default=None, help="evaluation split (default: the domain's val split; toy: val)")
    p.add_argument("--eval-size", type=cli.hw, default=None, help="H,W of the evaluation input (default: real data, "
                   "upstream's full resolution (Cityscapes 1024x2048); toy: the shared protocol of common)")
    p.add_argument("--flip", action="store_true", help="flip test-time augmentation (average of probabilities)")
    p.add_argument("--save-predictions", type=int, default=8, help="colour PNGs of the first N predictions "
                   "and predictions/grid.png (input | ground truth | prediction | errors of the first 4, legend)")
    p.add_argument("--save-label-ids", default=None, metavar="DIR", help="write EVERY prediction to DIR (new or "
                   "empty) as a single-channel PNG of Cityscapes label ids at the label's resolution, "
                   "CITY_SEQ_FRAME_pred_labelIds.png: what cityscapesscripts and the benchmark server read")
    p.add_argument("--amp", default="auto", choices=rt.AMP_CHOICES)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="where to write final.json, iou_table.md, predictions/ "
                   "(default: CHECKPOINT's folder/eval_SPLIT)")
    args = p.parse_args(argv)
    if args.eval_size is None and not str(args.target).startswith("toy") and args.target in DOMAINS:
        args.eval_size = core.UPSTREAM_HW.get(DOMAINS[args.target][0])
    return args


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    amp = rt.amp_dtype(args.amp, device)
    model, cfg, fmt = load_segmenter(args.checkpoint, args.checkpoint_format)  # strict; MADA's releases too
    model = model.to(device, memory_format=rt.memory_format(amp))
    other = None
    if args.ensemble:
        other, cfg2, _ = load_segmenter(args.ensemble, args.checkpoint_format)
        if (cfg2["num_classes"], cfg2["norm"]) != (cfg["num_classes"], cfg["norm"]):
            raise SystemExit(f"cannot ensemble {args.checkpoint} and {args.ensemble}: different classes or input norm")
        other = other.to(device, memory_format=rt.memory_format(amp))
    tgt, _, root = resolve_domain(args.target, args.target_root, "target")
    data = core.eval_set_at(tgt, root, cfg["num_classes"], cfg["norm"], args.eval_size, args.split)
    split = args.split or "val"
    out = Path(args.out or Path(args.checkpoint).parent / f"eval_{split}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    res = evaluate(model, data, cfg["num_classes"], device, amp, args.flip,
                   save_dir=out / "predictions" if args.save_predictions else None, n_save=args.save_predictions,
                   rank=rank, world_size=world, workers=args.workers, ensemble=other,
                   label_id_dir=args.save_label_ids)
    report = {"checkpoint": str(args.checkpoint), "ensemble": args.ensemble, "checkpoint_format": fmt, "target": tgt,
              "split": split, "flip": args.flip, "last": res, "mIoU": res["mIoU"], "images": len(data),
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
