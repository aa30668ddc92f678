"""Budget curves (issue 28): is the toy's null result the budget or the method?

Each method row below runs at several training lengths K (K x its toy preset's iterations, the poly schedule
stretched over them: benchmark/run.py --budget-scale), its control at the same K, and is evaluated on the toy v3
**val** split (the held-out test split is never looked at here). The curve of a row is its val mIoU minus its
control's at the same seed and K, against K.

    python benchmark/budget_curves.py                             # the grid, seed 0, --jobs 2 (CPU: hours, see --list)
    python benchmark/budget_curves.py --seeds 0 1 2 --jobs 12     # a bigger machine (on a GPU: minutes)
    python benchmark/budget_curves.py --families d2ada --add-scale d2ada=8
    python benchmark/budget_curves.py --list                      # the rows and steps of the grid
    python benchmark/budget_curves.py --report                    # table + plot of what has finished in --out
    python benchmark/budget_curves.py --report --publish          # ... written to benchmark/budget_curves.*

The grid (GRID): the advent_maxsquare adaptation rows against the continued-training control at 1x / 4x / 12x
(200 / 800 / 2400 iterations); D2ADA against random regions at 1x / 2x / 4x training per round (same 5 rounds, same
5% of target pixels); MADA stage 1 against random 5% + stage 1 at 1x / 4x. The source model, the warm-ups and the
selections of the warm-up model are not scaled: every K starts from the same ones (run once, in --out).

The rule, fixed before any curve was looked at (issue 28): a row SEPARATES at length K when its mean minus-control
on val exceeds twice the control's seed-to-seed spread, the standard deviation over the seeds of the control's val
mIoU at that K (with fewer than 2 seeds finished: the published 3-seed std of the control row on test, 1x). A
family with a separating row earns a `--budget-scale K` preset whose 3-seed test table is published beside the
default one (benchmark/results_x<K>.*); the default table, the toy generator and the loss weights never change.

Writes OUT/budget_curves.md/.json/.png (with --publish: benchmark/budget_curves.*): per row and K the val mIoU, the
control's, the paired difference per seed, the spread and the rule's verdict, the mechanism diagnostics
(target entropy, discriminator accuracy, what the selector picked) and the wall time of the row.
"""
import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmark"))
import run  # noqa: E402  (benchmark/run.py)

# family -> (method rows, their control, lengths K). Every row here is a row of run.PIPELINES.
GRID = {
    "advent_maxsquare": (["AdaptSegNet (output-space adversarial)", "ADVENT MinEnt", "ADVENT AdvEnt",
                          "MaxSquare (MS)", "MaxSquare (MS+IW)"], "Source only, continued (control)", (1, 4, 12)),
    "d2ada": (["D2ADA (5 rounds, 5% target pixels)"], "D2ADA baseline: random regions (5%)", (1, 2, 4)),
    "mada": (["MADA stage 1 (5% images, CE)"], "Random 5% images + MADA stage 1", (1, 4)),
}
# Unscaled rows whose steps the grid reads (the source model, the D2ADA warm-up); also evaluated on val.
PREREQ = {"advent_maxsquare": ["Source only"], "d2ada": ["D2ADA warm-up (UDA, AdaptSegNet)"], "mada": []}
PUBLISHED = ROOT / "benchmark" / "budget_curves"


def grid_rows(families, extra_scales, only_scales=None, only_rows=None):
    """The pipelines of the grid (run.budget_variant of each K, val split), each once, prerequisites first.
    only_scales: family -> the lengths to run instead of GRID's; only_rows: the method rows to keep (a cut grid)."""
    chosen, seen = [], set()
    for fam in families:
        rows, control, scales = GRID[fam]
        rows = [r for r in rows if not only_rows or r in only_rows]
        scales = (only_scales or {}).get(fam, scales)
        for k in sorted(set(scales) | set(extra_scales.get(fam, ()))):
            variant = run.budget_variant(run.PIPELINES, k, "val")
            for p, q in zip(run.PIPELINES, variant):
                if p["name"] in PREREQ[fam] + [control] + rows and q["name"] not in seen:
                    seen.add(q["name"])
                    chosen.append(dict(q, base_name=p["name"], family=fam, scale=k))
    return chosen


def published_spread(name):
    """The published 3-seed std of a control row (test split, 1x), the fallback spread of a single-seed curve."""
    path = run.PUBLISHED.with_suffix(".json")
    rows = json.loads(path.read_text()) if path.exists() else []
    return next((r["std"] for r in rows if r["name"] == name and r.get("n", 0) > 1), None)


def curves(out, seeds, chosen):
    """One record per (method row, K) with a finished control at some seed: the paired differences and the rule."""
    table = {r["name"]: r for r in run.table(out, seeds, 3, chosen)}
    recs = []
    for fam in GRID:
        rows, control, _ = GRID[fam]
        for p in chosen:
            if p["family"] != fam or p["base_name"] not in rows or p["name"] not in table:
                continue
            r = table[p["name"]]
            vc = r.get("vs_control")
            c = table.get(p["control"])
            if not vc or not c:
                continue
            ctrl_seeds = [v for s, v in zip(c["seeds"], c["per_seed"]) if s in vc["seeds"]]
            if len(ctrl_seeds) > 1:
                spread, spread_from = statistics.stdev(ctrl_seeds), f"control's std over {len(ctrl_seeds)} seeds (val)"
            else:
                spread, spread_from = published_spread(control), "published 3-seed std of the control (test, 1x)"
            diff = vc["per_seed"]
            recs.append({
                "family": fam, "row": p["base_name"], "control": control, "scale": p["scale"],
                "seeds": vc["seeds"], "row_val": [round(v, 2) for v in r["per_seed"]],
                "control_val": [round(v, 2) for v in ctrl_seeds], "minus_control": [round(d, 2) for d in diff],
                "mean": round(statistics.mean(diff), 2),
                "std": round(statistics.stdev(diff), 2) if len(diff) > 1 else None,
                "spread": None if spread is None else round(spread, 2), "spread_from": spread_from,
                "separates": bool(spread is not None and statistics.mean(diff) > 2 * spread),
                "diagnostics": r.get("diagnostics", {}), "control_diagnostics": c.get("diagnostics", {}),
                "seconds": r["seconds"], "control_seconds": c["seconds"], "machine": r["machine"]})
    return recs


def markdown(recs):
    def pct(d, k):
        return "" if d.get(k) is None else f"{100 * d[k]:.0f}%"
    lines = ["| family | row | K | row val | control val | minus control (per seed) | control spread | "
             "> 2x spread | target entropy (row / control) | D accuracy | selected from hard city (row / control) "
             "| wall time (row / control) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        d, cd = r["diagnostics"], r["control_diagnostics"]
        per = ", ".join(f"{v:+.1f}" for v in r["minus_control"])
        spread = "?" if r["spread"] is None else f"{r['spread']:.2f}"
        hard = f"{pct(d, 'hard_share')} / {pct(cd, 'hard_share')}" if d.get("hard_share") is not None else ""
        lines.append(
            f"| {r['family']} | {r['row']} | {r['scale']:g}x | {statistics.mean(r['row_val']):.1f} | "
            f"{statistics.mean(r['control_val']):.1f} | {r['mean']:+.2f} ({per}) | {spread} | "
            f"{'**yes**' if r['separates'] else 'no'} | {pct(d, 'target_entropy')} / {pct(cd, 'target_entropy')} | "
            f"{pct(d, 'dom_acc')} | {hard} | {r['seconds'] / 60:.1f} / {r['control_seconds'] / 60:.1f} min |")
    n = sorted({len(r["seeds"]) for r in recs})
    return ("\n".join(lines) + f"\n\nToy domains v3, val split (the held-out test split is not used). Seeds per "
            f"point: {n}. K = training length as a multiple of the toy preset (benchmark/run.py --budget-scale). "
            "Minus control: the row's val mIoU minus its control's at the same seed and K. Control spread: "
            + "; ".join(sorted({r["spread_from"] for r in recs})) + ". Rule: a row separates at K when its mean "
            "minus control exceeds twice that spread. Machine: " + " / ".join(sorted({r["machine"] for r in recs}))
            + ".\n")


def plot(recs, path):
    """Method minus control against K (log axis), one line per row, the seeds' min-max shaded; Pillow only."""
    from PIL import Image, ImageDraw
    fams = [f for f in GRID if any(r["family"] == f for r in recs)]
    W, H, pad = 460, 340, 50
    img = Image.new("RGB", (W * max(1, len(fams)), H + 120), "white")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for i, fam in enumerate(fams):
        fr = [r for r in recs if r["family"] == fam]
        ks = sorted({r["scale"] for r in fr})
        lo = min(min(r["minus_control"]) for r in fr + [{"minus_control": [-1.0]}])
        hi = max(max(r["minus_control"]) for r in fr + [{"minus_control": [1.0]}])
        spreads = [2 * r["spread"] for r in fr if r["spread"] is not None]
        hi = max(hi, max(spreads, default=0))
        x0, y0 = i * W + pad, 30

        def X(k):
            span = math.log(max(ks)) - math.log(min(ks)) or 1.0
            return x0 + (math.log(k) - math.log(min(ks))) / span * (W - 2 * pad)

        def Y(v):
            return y0 + (hi - v) / (hi - lo) * (H - 60)
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        dl, d = ImageDraw.Draw(layer), ImageDraw.Draw(img)
        rows = list(dict.fromkeys(r["row"] for r in fr))
        for j, name in enumerate(rows):
            pts = sorted((r["scale"], r) for r in fr if r["row"] == name)
            col = colours[j % len(colours)]
            if all(len(r["minus_control"]) > 1 for _, r in pts) and len(pts) > 1:
                band = [(X(k), Y(max(r["minus_control"]))) for k, r in pts] + \
                       [(X(k), Y(min(r["minus_control"]))) for k, r in reversed(pts)]
                dl.polygon(band, fill=col + (45,))
        img.paste(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"))
        d = ImageDraw.Draw(img)
        d.line([(x0, Y(0)), (x0 + W - 2 * pad, Y(0))], fill=(120, 120, 120))
        d.line([(x0, y0), (x0, y0 + H - 60)], fill="black")
        for k in ks:
            d.text((X(k) - 8, y0 + H - 55), f"{k:g}x", fill="black")
        for v in (lo, 0.0, hi):
            d.text((x0 - 45, Y(v) - 6), f"{v:+.1f}", fill="black")
        if spreads:  # the rule's threshold (twice the control's spread, largest over K)
            t = max(spreads)
            for xx in range(int(x0), int(x0 + W - 2 * pad), 8):
                d.line([(xx, Y(t)), (xx + 4, Y(t))], fill=(200, 0, 0))
        for j, name in enumerate(rows):
            pts = sorted((r["scale"], r) for r in fr if r["row"] == name)
            col = colours[j % len(colours)]
            xy = [(X(k), Y(r["mean"])) for k, r in pts]
            if len(xy) > 1:
                d.line(xy, fill=col, width=3)
            for x, y in xy:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
            d.text((x0, H + 10 + 14 * j), f"{name} - {fr[0]['control']}"[:70], fill=col)
        d.text((x0, 8), f"{fam}: val mIoU minus control vs training length", fill="black")
        d.text((x0, H + 10 + 14 * len(rows)), "dashed red: twice the control's seed spread (the rule's threshold); "
               "shaded: the seeds' range", fill=(120, 0, 0))
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0; the table covers every seed "
                    "finished in --out with --report)")
    ap.add_argument("--families", nargs="+", default=list(GRID), choices=list(GRID), help="which curves to run")
    ap.add_argument("--add-scale", nargs="+", default=[], metavar="FAMILY=K", help="a further length for a family's "
                    "curve, e.g. advent_maxsquare=32 (issue 28: the fourth, longer point on a GPU)")
    ap.add_argument("--scales", nargs="+", default=[], metavar="FAMILY=K,K", help="run only these lengths of a "
                    "family's curve, e.g. advent_maxsquare=1,4 (issue 28's cut: the 12x point is dropped first for "
                    "rows whose 4x point shows no trend)")
    ap.add_argument("--rows", nargs="+", default=None, help="only these method rows (their controls and "
                    "prerequisites come with them), e.g. to cut the grid")
    ap.add_argument("--out", default="benchmark/out_budget", help="working folder (every step's run folder; the table)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="pipeline-seeds at once")
    ap.add_argument("--workers", type=int, default=0, help="data-loading workers of every step (see run.py)")
    ap.add_argument("--progress-every", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--list", action="store_true", help="print the grid's rows and steps; run nothing")
    ap.add_argument("--report", action="store_true", help="run nothing; table and plot of what has finished")
    ap.add_argument("--publish", action="store_true", help="write the table and plot to benchmark/budget_curves.*")
    args = ap.parse_args(argv)
    extra, only = {}, {}
    for flag, items, dest in (("--add-scale", args.add_scale, extra), ("--scales", args.scales, only)):
        for item in items:
            fam, _, ks = item.partition("=")
            try:
                dest.setdefault(fam, []).extend(float(k) if "." in k else int(k) for k in ks.split(","))
            except ValueError:
                ks = ""
            if fam not in GRID or not ks:
                ap.error(f"{flag} takes FAMILY=K[,K...] with FAMILY in {list(GRID)}, got {item!r}")
    unknown = set(args.rows or ()) - {r for rows, _, _ in GRID.values() for r in rows}
    if unknown:
        ap.error(f"--rows: not rows of the grid: {sorted(unknown)}")
    chosen = grid_rows(args.families, extra, only, args.rows)
    out = (ROOT / args.out).resolve()
    if args.list:
        for p in chosen:
            print(f"{p['name']:60s} {len(p['steps'])} steps")
            for cmd, _ in p["steps"]:
                print("    " + run.shown(cmd.format(py=run.PY, seed="<seed>", base=out / "seed<seed>", run="<run>")))
        print(f"{len(chosen)} rows")
        return 0
    run.configure(3, args.jobs, args.workers)
    if not args.report:
        pub = run.recorded_times(out)  # the published 1x wall times; a row at K estimated as K times its own
        times = {p["name"]: (pub[p["base_name"]][0] * (p["scale"] if "[x" in p["name"] else 1), pub[p["base_name"]][1])
                 for p in chosen if p["base_name"] in pub}
        code = run.execute(chosen, args.seeds, out, args.jobs, out / "results", times, args.progress_every,
                           again="python benchmark/budget_curves.py --report")
        if code is not None:
            return code
    seeds = run.seeds_on_disk(out) if args.report else sorted(set(args.seeds) | set(run.seeds_on_disk(out)))
    recs = curves(out, seeds, chosen)
    if not recs:
        print(f"[curves] no finished row/control pair in {run.rel(out)}: nothing written")
        return 1
    dest = PUBLISHED if args.publish else out / "budget_curves"
    dest.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(recs)
    dest.with_suffix(".md").write_text(md)
    dest.with_suffix(".json").write_text(json.dumps(recs, indent=1))
    plot(recs, dest.with_suffix(".png"))
    print(md)
    print(f"[curves] written: {run.rel(dest)}.md, .json, .png")
    return 0 if run.STATE["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
