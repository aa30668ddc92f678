"""Performance benchmark (separate from the tests): fp32-eager vs the default (--amp auto: bf16 autocast
+ channels_last where the device runs bf16 natively), side by side in ONE process, interleaved, so both
see the same machine state.

    python benchmark/perf.py                    # everything; writes benchmark/perf_latest.md
    python benchmark/perf.py --quick            # fewer repetitions, no R101
    python benchmark/perf.py --compile          # also try torch.compile on the toy preset and R101
    python benchmark/perf.py --cases r101 --compile --no-loading --reps 3   # torch.compile on R101 only
    python benchmark/perf.py --cases r101 --r101-shape 4,3,512,1024 --warmup 3 --no-loading --reps 10   # a GPU

Measures:
  1. training step (forward, CE loss, backward, SGD step) of DeepLabV2-ResNet-101 at 1x3x512x1024 and of the
     toy preset (DeepLabV2-ResNet-18, 8x3x72x128): median step time, ratio, peak memory;
  2. evaluation throughput (images/s) of both models;
  3. data loading for a GTA5-sized pipeline (1914x1052 PNG decode, random scale 0.5-1.5, crop 1280x720,
     flip) with 0, 1 and 2 workers: images/s, to show whether loading would starve training;
  4. optionally torch.compile: compile time, compiled step time, and the iterations it needs to pay back.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import runtime as rt
from common.datasets import build_dataset
from common.losses import cross_entropy
from common.models import DeepLabV2
from common.transforms import Compose, RandomHFlip, RandomScaleCrop


def make_case(backbone, shape, device, amp):
    torch.manual_seed(0)
    model = DeepLabV2(19, backbone, multi_level=True).to(device, memory_format=rt.memory_format(amp)).train()
    opt = rt.sgd_10x(model, 2.5e-4)
    x = rt.to_device(torch.randn(*shape), device, amp)
    y = torch.randint(0, 19, (shape[0], shape[2], shape[3]), device=device)
    return model, opt, x, y


def train_step(model, opt, x, y, device, amp):
    with rt.autocast(device, amp):
        out = model(x)
        main = F.interpolate(out["out"], size=y.shape[-2:], mode="bilinear", align_corners=True)
        aux = F.interpolate(out["aux"], size=y.shape[-2:], mode="bilinear", align_corners=True)
        loss = cross_entropy(main, y) + 0.1 * cross_entropy(aux, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_training(name, backbone, shape, device, reps, warmup=1):
    """Interleaved: fp32, default, fp32, default, ... after warm-up steps of each."""
    default = rt.amp_dtype("auto", device)
    cases = {"fp32 eager": make_case(backbone, shape, device, None),
             f"default ({'bf16' if default is torch.bfloat16 else 'fp32'} + "
             f"{'channels_last' if default is not None else 'contiguous'})": make_case(backbone, shape, device, default)}
    amps = dict(zip(cases, [None, default]))
    times = {k: [] for k in cases}
    peaks = {k: 0 for k in cases}
    for k, (m, o, x, y) in cases.items():
        for _ in range(warmup):
            train_step(m, o, x, y, device, amps[k])
    for _ in range(reps):
        for k, (m, o, x, y) in cases.items():
            with rt.PeakMemory(device) as pk:
                t0 = time.perf_counter()
                train_step(m, o, x, y, device, amps[k])
                times[k].append(time.perf_counter() - t0)
            peaks[k] = max(peaks[k], pk.peak)
    rows = []
    base = statistics.median(times["fp32 eager"])
    for k in cases:
        med = statistics.median(times[k])
        rows.append((name, k, med, base / med, peaks[k] / 2**20))
    # evaluation throughput (eval mode, no grad)
    evals = []
    for k, (m, o, x, y) in cases.items():
        m.eval()
        with torch.no_grad():
            for _ in range(2):  # warm-up: the first eval-mode calls pick kernels (cuDNN) and allocate
                with rt.autocast(device, amps[k]):
                    m(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while n < max(2, reps) * x.shape[0] or (time.perf_counter() - t0 < 2 and n < 50 * x.shape[0]):
                with rt.autocast(device, amps[k]):
                    m(x)
                n += x.shape[0]
                if device.type == "cuda":
                    torch.cuda.synchronize()
        evals.append((name, k, n / (time.perf_counter() - t0)))
        m.train()
    return rows, evals, cases, amps


def bench_compile(name, cases, amps, device, reps):
    """torch.compile the default case: compile time (first step) and the compiled median step time."""
    k = [c for c in cases if c != "fp32 eager"][0]
    m, o, x, y = cases[k]
    eager = []
    for _ in range(reps):
        t0 = time.perf_counter()
        train_step(m, o, x, y, device, amps[k])
        eager.append(time.perf_counter() - t0)
    cm = torch.compile(m)
    t0 = time.perf_counter()
    train_step(cm, o, x, y, device, amps[k])
    compile_s = time.perf_counter() - t0
    comp = []
    for _ in range(reps):
        t0 = time.perf_counter()
        train_step(cm, o, x, y, device, amps[k])
        comp.append(time.perf_counter() - t0)
    e, c = statistics.median(eager), statistics.median(comp)
    payback = compile_s / (e - c) if e > c else float("inf")
    return (name, k, compile_s, e, c, payback)


def bench_loading(workers_list, n_images, tmp):
    root = Path(tmp) / "GTA5"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        # smooth noise compresses like a photo more than white noise does
        small = rng.integers(0, 255, (66, 120, 3), dtype=np.uint8)
        Image.fromarray(small).resize((1914, 1052), Image.BILINEAR).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(rng.integers(0, 34, (66, 120), dtype=np.uint8)).resize((1914, 1052), Image.NEAREST).save(
            root / "labels" / f"{i:05d}.png")
    ds = build_dataset("gta5", root, "all", 19, Compose([RandomScaleCrop((1052, 1914), (720, 1280)), RandomHFlip()]))
    rows = []
    for w in workers_list:
        loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=True, num_workers=w)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["image"].shape[0]
        rows.append((w, n / (time.perf_counter() - t0)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per case")
    ap.add_argument("--quick", action="store_true", help="3 repetitions, no R101")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    ap.add_argument("--cases", nargs="+", choices=["toy", "r101"], default=None,
                    help="training/eval cases to run (default: both; --quick: toy)")
    ap.add_argument("--no-loading", action="store_true", help="skip the data-loading measurement")
    ap.add_argument("--r101-shape", default="1,3,512,1024", help="N,C,H,W of the R101 case (a GPU: try 4,3,512,1024)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps per case first (GPU: 3)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmark/perf_latest.md", help="where the tables go (benchmark/perf.md "
                    "collects the runs the README quotes, by hand)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    reps = 3 if args.quick else args.reps
    which = args.cases or (["toy"] if args.quick else ["toy", "r101"])
    cases = [c for k, c in [("toy", ("toy preset: DeepLabV2-R18 8x3x72x128", "resnet18", (8, 3, 72, 128))),
                            ("r101", (f"DeepLabV2-R101 {'x'.join(args.r101_shape.split(','))}", "resnet101",
                                      tuple(int(v) for v in args.r101_shape.split(","))))] if k in which]
    train_rows, eval_rows, comp_rows = [], [], []
    for name, bb, shape in cases:
        print(f"[perf] {name} ...", flush=True)
        r, e, built, amps = bench_training(name, bb, shape, device, reps, args.warmup)
        train_rows += r
        eval_rows += e
        if args.compile:
            print(f"[perf] torch.compile {name} ...", flush=True)
            comp_rows.append(bench_compile(name, built, amps, device, reps))
        del built
    load_rows = []
    if not args.no_loading:
        print("[perf] data loading ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            load_rows = bench_loading([0, 1, 2], 12 if args.quick else 24, tmp)

    cpu = "CUDA " + torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    md = [f"# Performance: fp32 eager vs default (`--amp auto`)", "",
          f"Device: {cpu}; torch {torch.__version__}; {reps} interleaved repetitions per case, medians.", "",
          "| training step | precision | median step (s) | speed-up vs fp32 | RSS growth during the step (MiB; CUDA: peak allocated) |", "|---|---|---|---|---|"]
    md += [f"| {a} | {b} | {c:.3f} | {d:.2f}x | {e:.0f} |" for a, b, c, d, e in train_rows]
    md += ["", "| evaluation | precision | images/s |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c:.2f} |" for a, b, c in eval_rows]
    if load_rows:
        md += ["", "| data loading (GTA5-sized: 1914x1052 PNG decode, scale 0.5-1.5, crop 1280x720, flip) | images/s |",
               "|---|---|"]
        md += [f"| {w} worker(s) | {r:.2f} |" for w, r in load_rows]
    if comp_rows:
        md += ["", "| torch.compile | precision | compile (s) | eager step (s) | compiled step (s) | steps to pay back |",
               "|---|---|---|---|---|---|"]
        md += [f"| {a} | {b} | {c:.1f} | {d:.3f} | {e:.3f} | {f:.0f} |" for a, b, c, d, e, f in comp_rows]
    text = "\n".join(md) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
