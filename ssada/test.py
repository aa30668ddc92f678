r"""Evaluate SS-ADA / TUFL checkpoints (BiSeNetV1, or any segda segmenter) on the target: mIoU (13-class
for CrossCity), the per-class IoU table, colour-coded predictions. Two modes, as upstream's
evaluate_single_gpu: 'whole' (the image at the evaluation size in one pass) and 'sliding' (windows of
--crop-size H,W with stride 2/3 of the window, softmax probabilities summed; the last window of a row or
column is moved back inside the image, so any crop shape works, also one larger than the image). The logits are
upsampled as the model's upstream does (--align-corners auto: False for an SS-ADA BiSeNet, True for TUFL's and others).

    L = nothing (evaluation only)

Toy (no arguments: the default SS-ADA run's model on the toy target val split):
    python ssada/test.py
The held-out toy test split (what the benchmark reports), sliding window:
    python ssada/test.py --checkpoint runs/ssada/ssada/model.pth --split test --mode sliding --crop-size 48,64
TUFL on the toy CrossCity-style target (13 classes):
    python ssada/test.py --checkpoint runs/ssada/tufl/model.pth --target toy_crosscity
Cityscapes val as SS-ADA validates (full resolution, 640x640 windows, stride 2/3):
    python ssada/test.py --checkpoint model.pth --target cityscapes --target-root /data/cityscapes \
        --mode sliding --crop-size 640,640 --eval-size full
CrossCity test as TUFL evaluates (utils/evaluate.py: full resolution, 647x647 windows, stride 5/6):
    python ssada/test.py --checkpoint model.pth --target crosscity --target-root /data/NTHU_Datasets \
        --city Rome --mode sliding --crop-size 647,647 --eval-size full --stride-rate 0.8333333
The released models (format auto-detected; ssada/releases.py): TUFL's Cityscapes -> Rio model, SS-ADA's
GTA5 -> Cityscapes model with 25% of the target labels:
    python ssada/test.py --checkpoint model_epoch_2000.pth --target crosscity --target-root /data/NTHU_Datasets \
        --city Rio --mode sliding --crop-size 647,647 --eval-size full --stride-rate 0.8333333
    python ssada/test.py --checkpoint best.pth --target cityscapes --target-root /data/cityscapes \
        --mode sliding --crop-size 640,640 --eval-size full
torchrun (the evaluation is sharded and the confusion matrix all-reduced):
    torchrun --nproc_per_node=2 ssada/test.py
"""
import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.bisenet import any_segmenter_from_checkpoint
from common.datasets import CITY_GROUPS, DOMAINS, build_dataset, eval_loader, resolve_domain
from common.evaluate import PredictionOutputs, evaluate
from common.metrics import ConfusionMatrix, format_table
from common.transforms import Compose, Resize
from ssada.releases import FORMAT_HELP, FORMATS, load_segmenter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/ssada/ssada/model.pth", help="model.pth of a run")
    p.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --checkpoint: " + FORMAT_HELP)
    p.add_argument("--target", default="toy", help="target domain (toy | toy_crosscity | cityscapes | crosscity ...)")
    p.add_argument("--target-root", default=None, help="dataset root of --target (toy: generated cache)")
    p.add_argument("--split", default=None, help="evaluation split (default: the domain's val split; toy: val)")
    p.add_argument("--city", default="Rome", help="CrossCity city (Rome | Rio | Taipei | Tokyo)")
    p.add_argument("--mode", default="whole", choices=["whole", "sliding"], help="whole image or sliding window")
    p.add_argument("--crop-size", type=cli.hw, default=None, help="sliding window H,W (default: half the eval size)")
    p.add_argument("--eval-size", type=size_or_full, default=None, help="input size H,W (default: the domain's; "
                   "'full' = the images' own size, as both upstreams evaluate)")
    p.add_argument("--stride-rate", type=float, default=2 / 3,
                   help="sliding-window stride as a fraction of the window (SS-ADA 2/3, TUFL 5/6)")
    p.add_argument("--save-predictions", type=int, default=8, help="colour PNGs of the first N predictions "
                   "and predictions/grid.png (input | ground truth | prediction | errors of the first 4, legend)")
    p.add_argument("--save-label-ids", default=None, metavar="DIR", help="write EVERY prediction to DIR (new or "
                   "empty) as a single-channel PNG of Cityscapes label ids at the label's resolution, "
                   "CITY_SEQ_FRAME_pred_labelIds.png: what cityscapesscripts and the benchmark server read")
    p.add_argument("--align-corners", default="auto", choices=["auto", "0", "1"],
                   help="bilinear upsampling of the logits: 0 as SS-ADA's heads, 1 as TUFL's; auto: 0 for an SS-ADA "
                   "BiSeNet (variant 'ssada'), 1 for a TUFL BiSeNet and every other model (the house convention)")
    p.add_argument("--amp", default="auto", choices=rt.AMP_CHOICES)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="where to write final.json, iou_table.md, predictions/ "
                   "(default: CHECKPOINT's folder/eval_SPLIT)")
    return p.parse_args(argv)


def size_or_full(text):
    """'H,W' or 'full' (no resize)."""
    return "full" if text == "full" else cli.hw(text)


def windows(size, win, stride):
    """Start offsets of windows of length `win` covering [0, size): stride steps, the last one moved
    back so that it ends at the border (one window at 0 when win >= size)."""
    if win >= size:
        return [0]
    starts = list(range(0, size - win, stride)) + [size - win]
    return sorted(set(starts))


def upsample(logits, hw, align_corners):
    """Bilinear upsampling of head logits to hw: SS-ADA's heads use align_corners=False (nn.Upsample x8 / x16,
    model/semseg/bisenetv1.py:69-70), TUFL's True (unsup/model.py:263-272)."""
    return F.interpolate(logits.float(), size=hw, mode="bilinear", align_corners=align_corners)


@torch.no_grad()
def predict(model, x, out_hw, amp=None, align_corners=True):
    """Main-head logits upsampled to out_hw (one bilinear step, align_corners as the method's upstream)."""
    with rt.autocast(x.device, amp):
        out = model(x)["out"]
    return upsample(out, out_hw, align_corners)


class AtInputSize(torch.nn.Module):
    """`net` whose main head is upsampled to the input size inside the forward (bilinear, align_corners=False), as
    SS-ADA's BiSeNetOutput does: common.evaluate's own upsampling to the label size is then the identity when the
    label has the image's size (upstream evaluates at full resolution); only an image resized for the evaluation
    (the toy preset) is upsampled a second time, to the label (align_corners=True, common.evaluate)."""

    def __init__(self, net, align_corners=False):
        super().__init__()
        self.net, self.align_corners = net, align_corners

    def forward(self, x):
        return {"out": upsample(self.net(x)["out"], x.shape[-2:], self.align_corners)}


def whole_model(model, align_corners):
    """What common.evaluate is given: the model itself (its heads upsampled there with align_corners=True), or
    wrapped in AtInputSize for align_corners=False."""
    return model if align_corners else AtInputSize(rt.unwrap(model), False)


@torch.no_grad()
def sliding_logits(model, x, crop_hw, num_classes, amp=None, stride_rate=2 / 3, align_corners=True):
    """Sum of softmax probabilities of the main head over sliding windows, stride `stride_rate` of the
    window (SS-ADA int(grid * 2/3); TUFL ceil(crop * 5/6)), divided by the number of windows covering
    each pixel; each window's logits upsampled to the window with `align_corners` (SS-ADA False, TUFL True).
    Returns (B, C, H, W) probabilities."""
    b, _, h, w = x.shape
    ch, cw = min(crop_hw[0], h), min(crop_hw[1], w)
    total = torch.zeros(b, num_classes, h, w, device=x.device)
    count = torch.zeros(1, 1, h, w, device=x.device)
    step = (lambda n: math.ceil(n * stride_rate)) if stride_rate > 2 / 3 else (lambda n: int(n * stride_rate))
    for r in windows(h, ch, max(1, step(ch))):
        for c in windows(w, cw, max(1, step(cw))):
            with rt.autocast(x.device, amp):
                out = model(x[:, :, r:r + ch, c:c + cw])["out"]
            total[:, :, r:r + ch, c:c + cw] += upsample(out, (ch, cw), align_corners).softmax(1)
            count[:, :, r:r + ch, c:c + cw] += 1
    return total / count


@torch.no_grad()
def evaluate_sliding(model, dataset, num_classes, crop_hw, device, amp=None, save_dir=None, n_save=8,
                     rank=0, world_size=1, workers=2, stride_rate=2 / 3, label_id_dir=None, align_corners=True):
    was = model.training
    model.eval()
    conf = ConfusionMatrix(num_classes, device)
    outs = PredictionOutputs(dataset, num_classes, save_dir, n_save, label_id_dir, rank=rank, world_size=world_size)
    for batch in eval_loader(dataset, 1, workers, rank, world_size):
        x = rt.to_device(batch["image"], device, amp)
        y = batch["label"].to(device)
        prob = sliding_logits(model, x, crop_hw, num_classes, amp, stride_rate, align_corners)
        pred = upsample(prob, y.shape[-2:], align_corners).argmax(1)  # the identity at full resolution
        conf.update(pred, y)
        outs.add(batch, pred, y)  # colour PNGs, grid.png, label-id PNGs (common.evaluate)
    outs.close()
    model.train(was)
    return (conf.all_reduce() if world_size > 1 else conf).summary()


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    amp = rt.amp_dtype(args.amp, device)
    model, cfg, fmt = load_segmenter(args.checkpoint, args.checkpoint_format, any_segmenter_from_checkpoint)
    if rank == 0:
        print(f"[test] {args.checkpoint}: format {fmt}", flush=True)
    model = model.to(device, memory_format=rt.memory_format(amp)).eval()
    ac = (cfg.get("model") != "bisenetv1" or cfg.get("variant", "ssada") != "ssada") \
        if args.align_corners == "auto" else args.align_corners == "1"
    tgt, kind, root = resolve_domain(args.target, args.target_root, "target")
    split = args.split or DOMAINS[tgt][2]
    size = args.eval_size or DOMAINS[tgt][4]  # images resized to it ('full': not resized); labels kept at full resolution
    tf = None if size == "full" else Compose([Resize(size, resize_label=False)])
    size = DOMAINS[tgt][4] if size == "full" else size
    data = build_dataset(kind, root, split, cfg["num_classes"], tf,
                         cfg["norm"], cities=CITY_GROUPS.get(tgt), city=args.city)
    out = Path(args.out or Path(args.checkpoint).parent / f"eval_{split}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    crop = args.crop_size or (max(1, size[0] // 2), max(1, size[1] // 2))

    t0 = time.time()
    save = out / "predictions" if args.save_predictions else None
    if args.mode == "whole":
        res = evaluate(whole_model(model, ac), data, cfg["num_classes"], device, amp, save_dir=save,
                       n_save=args.save_predictions,
                       rank=rank, world_size=world, workers=args.workers, label_id_dir=args.save_label_ids)
    else:
        res = evaluate_sliding(model, data, cfg["num_classes"], crop, device, amp, save, args.save_predictions,
                               rank, world, args.workers, args.stride_rate, args.save_label_ids, ac)
    report = {"checkpoint": str(args.checkpoint), "target": tgt, "split": split, "mode": args.mode,
              "crop_size": list(crop) if args.mode == "sliding" else None, "align_corners": ac, "last": res, "mIoU": res["mIoU"],
              "images": len(data), "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        rt.save_json(out / "final.json", report)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[test] {tgt}/{split} ({args.mode}): mIoU {res['mIoU']:.2f} -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
