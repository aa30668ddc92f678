"""What upstream's two training passes cost against one joint pass: the network part of one SS-ADA iteration
(BiSeNetV1-R18 `ssada` layout, train mode) run both ways, interleaved in one process, on random inputs.

    python ssada/bench_forward.py                                   # toy size: B 2, 72x128 crops, 2 CPU cores
    python ssada/bench_forward.py --crop 640,640 --batch 4 --reps 10 --warmup 3   # the paper preset, on a GPU

One iteration, as train_ssada.py: source (B), labelled target (B) and weak unlabelled (B) images with the feature
perturbation (`need_fp`), and the two strong views (2B). `--forward two` (the default, upstream's
ss_ada_bisenetv1_single.py:303 and :310): the first three in one pass, the strong views in a second; `joint`: all
5B images in one pass. Each output is upsampled to the crop (align_corners=False) and given a cross-entropy against
random labels; one backward of the sum; one SGD step. The two ways differ only in how the batch is split (BN
statistics per pass), so their time and peak memory are what the choice costs. Reported: median step time over
--reps, each way's ratio to `joint`, and peak memory (CUDA: max_memory_allocated; CPU: peak RSS growth sampled
every 2 ms), for fp32 and the default precision (--amp auto). Writes --out (JSON) and prints a Markdown table.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.bisenet import make_bisenet


def step(model, opt, views, labels, forward, device, amp):
    """One iteration's network work: the passes, a CE per output, one backward, one SGD step."""
    src_lab_weak, strong = views
    hw = labels.shape[-2:]
    up = lambda t: F.interpolate(t.float(), size=hw, mode="bilinear", align_corners=False)
    with rt.autocast(device, amp):
        if forward == "two":
            pred = model(src_lab_weak, need_fp=True)
            outs = [pred[h] for h in pred] + [model(strong)["out"]]
        else:
            pred = model(torch.cat([src_lab_weak, strong]), need_fp=True)
            outs = [pred[h] for h in pred]
    loss = sum(F.cross_entropy(up(o), labels[: o.shape[0]]) for o in outs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crop", type=cli.hw, default=(72, 128), help="H,W of the training crop (paper: 640,640)")
    p.add_argument("--batch", type=int, default=2, help="B: images per stream (paper: 4)")
    p.add_argument("--reps", type=int, default=5, help="timed iterations per way and precision (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations of each case first (GPU: 3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/ssada/bench_forward.json")
    a = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    default = rt.amp_dtype("auto", device)
    precisions = {"fp32": None}
    if default is not None:
        precisions[f"default ({str(default).replace('torch.', '')})"] = default
    b, (h, w) = a.batch, a.crop
    g = torch.Generator().manual_seed(0)
    cases = {}
    for pname, amp in precisions.items():
        for forward in ("two", "joint"):
            torch.manual_seed(0)
            model, _ = make_bisenet(19, "scratch", "ssada")
            model = model.to(device, memory_format=rt.memory_format(amp)).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            views = (rt.to_device(torch.randn(3 * b, 3, h, w, generator=g), device, amp),
                     rt.to_device(torch.randn(2 * b, 3, h, w, generator=g), device, amp))
            labels = torch.randint(0, 19, (5 * b, h, w), generator=g).to(device)
            cases[(pname, forward)] = (model, opt, views, labels, forward, amp)
    for c in cases.values():
        for _ in range(a.warmup):
            step(*c[:5], device, c[5])
    times, peaks = {k: [] for k in cases}, {k: 0 for k in cases}
    for _ in range(a.reps):
        for k, c in cases.items():
            with rt.PeakMemory(device) as pk:
                t0 = time.perf_counter()
                step(*c[:5], device, c[5])
                times[k].append(time.perf_counter() - t0)
            peaks[k] = max(peaks[k], pk.peak)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    rows = []
    print(f"SS-ADA iteration, network part: B {b} per stream, crop {h}x{w}, {name}, torch {torch.__version__}, "
          f"{a.reps} interleaved reps (median)\n")
    print("| precision | forward | median step (s) | vs joint | peak memory (MiB) |\n|---|---|---|---|---|")
    for (pname, forward) in cases:
        med = statistics.median(times[(pname, forward)])
        ref = statistics.median(times[(pname, "joint")])
        rows.append({"precision": pname, "forward": forward, "median_s": med, "ratio_to_joint": med / ref,
                     "peak_mib": peaks[(pname, forward)] / 2**20, "times": times[(pname, forward)]})
        print(f"| {pname} | {forward} | {med:.4f} | {med / ref:.2f}x | {peaks[(pname, forward)] / 2**20:.0f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "batch": b, "crop": [h, w],
                               "reps": a.reps, "warmup": a.warmup, "rows": rows}, indent=1) + "\n")
    print(f"\n[done] {out}")


if __name__ == "__main__":
    main()
