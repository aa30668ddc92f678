r"""D2ADA step 1, the active rounds (paper Sec. 3, Algorithm 1; official train_ADA.py). Round 0 takes
the warm-up model; every later round t fine-tunes the previous round's model on the source plus the
target regions labelled so far (target labels outside the selected regions are ignored):
    L = CE over source pixels and labelled target pixels
After training and validation, a round selects the next regions (unless it is the last):
  1. region statistics of all source images and the whole target train split: 256-d head feature
     averaged per superpixel and region-mean softmax (pseudo label), through the training transform as
     upstream (--density-aug), and region-mean entropy on the clean images; per class N_S, N_T and the
     mixture size are logged every round;
  2. density-aware selection (Sec. 3.2): per class, d = log p_S(z) - log p_T(z) from Gaussian mixtures,
     lowest first, classes merged by weighted round-robin, budget lambda * B;
  3. uncertainty selection (Sec. 3.3): highest region-mean entropy, the rest of the budget;
     lambda = alpha * 2^(beta (1 - t)) with t = 1 at the first selection (Sec. 3.4, see selection.py).
B = --active-selection-size image-equivalents of pixels (1% of the target train images) per round.
Writes checkpointXX.pth (model of round XX, XX% labels) and datalist_XX.json (the labelled set it
selected) per round, pictures of the selected regions (selections/round_XX.png: regions outlined by
criterion; round_XX_classes.png: class shares of the picked pixels vs the target), and the labelled pixel
percentage per round.

Toy domains (no arguments; after `python d2ada/superpixels.py` and `python d2ada/warmup.py`):
    python d2ada/train_ada.py
Baselines at the same budget: --selection random | uncertainty | density
GTA5 -> Cityscapes (superpixels for both datasets first), 5 rounds of 1%:
    python d2ada/train_ada.py --source gta5 --source-root /data/GTA5 --target cityscapes \
        --target-root /data/cityscapes --init-from runs/d2ada/warmup/model.pth
Continue an interrupted run from its last finished round (and its own datalist):
    python d2ada/train_ada.py --resume
Continue D2ADA's released round X (its checkpoint0X.tar and the regions it had selected, datalist_0X.pkl;
region ids of D2ADA's superpixel maps: `python d2ada/datalist.py import-superpixels` first): trains round X+1
    python d2ada/train_ada.py --source gta5 --source-root /data/GTA5 --target cityscapes \
        --target-root /data/cityscapes --init-from checkpoint02.tar --datalist datalist_02.pkl
Several processes (training is data-parallel; extraction and selection run on rank 0):
    torchrun --nproc_per_node=2 d2ada/train_ada.py
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np
import torch
import torch.nn.functional as F

from common import cli, pictures as P, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set
from common.evaluate import evaluate
from common.losses import cross_entropy
from common.metrics import format_table
from common.transforms import ColorJitter, Compose, RandomHFlip, Resize
from d2ada import regions as R, selection as S
from d2ada.regions import eval_set_at
from d2ada.releases import FORMAT_HELP, FORMATS, datalist_round, labeled_from_any_datalist, load_segmenter, \
    read_datalist
from d2ada.warmup import set_bn_eval

# Defaults. PAPER: the official utils/common.py (5 rounds of 29 images' worth of pixels, 120k fine-tuning
# iterations per round, SGD 2.5e-4 with 10x head, wd 5e-4, poly, batch 1, 1024x2048, BN frozen,
# alpha = beta = 1). TOY: CPU-sized rounds on models trained from scratch (batch 4; 8 before issue 17's
# 40-minute benchmark budget: the v2 numbers).
# Both presets feed ALL source images to the source densities (upstream density_aware_selection.py:113) and
# extract the density features through the training transform (upstream :101-110, imageset 'train').
PAPER = dict(iters=120000, batch_size=1, lr=2.5e-4, crop_size=(1024, 2048), freeze_bn=1, save_every=2000,
             source_sample=0, init_from="runs/d2ada/warmup/model.pth", out="runs/d2ada/ada")
TOY = dict(iters=60, batch_size=4, lr=5e-3, crop_size=(64, 128), freeze_bn=0, save_every=20,
           source_sample=0, init_from="runs/d2ada/warmup/model.pth", out="runs/d2ada/ada")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (D2ADA active rounds)")
    g.add_argument("--init-from", default=None, help="warm-up model (d2ada/warmup.py's model.pth, or D2ADA's "
                   "checkpoint0X.tar); it fixes the network, so --model/--backbone/--init are not used here")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--datalist", default=None, help="the labelled set to continue from: D2ADA's datalist_0X.pkl "
                   "(or its image-mode .json) or ours (datalist_XX.json); with --init-from the model of that round "
                   "(checkpoint0X): training starts at round X+1")
    g.add_argument("--start-round", type=int, default=None, help="first round to train with --datalist (default: "
                   "the datalist's round + 1, from its 'round' entry or its name datalist_XX; upstream "
                   "--init_iteration)")
    g.add_argument("--rounds", type=int, default=5, help="active rounds after the warm-up round 0")
    g.add_argument("--active-selection-size", type=float, default=None, help="budget per round in image-"
                   "equivalents of pixels (default: 1%% of the target train images: 29 for Cityscapes)")
    g.add_argument("--selection", default="d2ada", choices=["d2ada", "density", "uncertainty", "random"],
                   help="d2ada (density + uncertainty, dynamic schedule) or one criterion alone (baselines)")
    g.add_argument("--alpha", type=float, default=1.0, help="dynamic scheduling: lambda = alpha 2^(beta (1 - t))")
    g.add_argument("--beta", type=float, default=1.0)
    g.add_argument("--per-class", type=int, default=200, help="density candidates per class")
    g.add_argument("--source-sample", type=int, default=None, help="source images whose regions feed the "
                   "source densities (0 = all, the default, as upstream; N = a fixed random sample of N images)")
    g.add_argument("--density-aug", default="train", choices=["train", "none"], help="input of the density "
                   "features: 'train' = the training transform (colour jitter + flip, seeded per image; upstream), "
                   "'none' = the clean resized image. The uncertainty is always computed on clean images (upstream)")
    g.add_argument("--density-pca", type=int, default=0, help="OURS, an ablation (not upstream): fit the "
                   "mixtures on a PCA projection of the region features to this many dimensions (0 = off: 256-d)")
    g.add_argument("--gmm-max-iter", type=int, default=200)
    g.add_argument("--gmm-threads", type=int, default=1, help="BLAS threads per mixture fit")
    g.add_argument("--gmm-workers", type=int, default=2, help="classes fitted at once (bounded thread pool)")
    g.add_argument("--pictures", type=int, default=4, help="target images drawn per round with their selection")
    g.add_argument("--freeze-bn", type=int, default=None, choices=[0, 1], help="BN frozen (paper 1, toy 0)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    args = p.parse_args(argv)
    cli.fill_defaults(args, TOY, PAPER)
    args.eval_every = args.eval_every or args.iters  # validation at the end of every round
    cli.default_num_classes(args)
    return args


def main(args):
    dlist = read_datalist(args.datalist) if args.datalist else None  # checked before the run folder is touched
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)

    # ---- model -----------------------------------------------------------------------------------
    model, mcfg, fmt = load_segmenter(args.init_from, args.checkpoint_format)  # strict; D2ADA's releases too
    log.log({"event": "init", "init_from": args.init_from, "checkpoint_format": fmt})
    if mcfg["num_classes"] != args.num_classes:
        raise SystemExit(f"{args.init_from} has {mcfg['num_classes']} classes, --num-classes is {args.num_classes}")
    model = model.to(device, memory_format=rt.memory_format(amp)).train()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    # upstream ExtResize (bilinear, ext_transforms.py:404-427) + ExtColorJitter + ExtRandomHorizontalFlip
    aug = Compose([Resize(args.crop_size, interp="bilinear"), ColorJitter(0.5, 0.5, 0.5, 0.0), RandomHFlip()])
    source = train_set(src, src_root, args.num_classes, mcfg["norm"], aug)
    target = train_set(tgt, tgt_root, args.num_classes, mcfg["norm"], None)  # labels read only in regions
    val = eval_set_at(tgt, tgt_root, args.num_classes, mcfg["norm"], args.crop_size)  # upstream: 1024x2048
    names = [target.name(i) for i in range(len(target))]
    src_names = [source.name(i) for i in range(len(source))]
    inventory = R.region_inventory(target)
    img_px = float(np.mean([px.sum() for px in inventory]))
    size = args.active_selection_size or max(1, int(0.01 * len(target)))
    n_src = len(source) if not args.source_sample else min(args.source_sample, len(source))
    src_idx = np.sort(np.random.default_rng(args.seed).choice(len(source), n_src, replace=False)).tolist()
    classes = list(range(args.num_classes))
    log.log({"event": "setup", "target_images": len(target), "target_regions": int(sum(len(p) for p in inventory)),
             "budget_images_per_round": size, "source_images_for_density": n_src})

    labeled, start = {}, 0
    if dlist is not None:  # continue from a labelled set (D2ADA's released datalist_0X, or ours)
        labeled, summary = labeled_from_any_datalist(dlist, names, src_names, inventory, args.datalist)
        found = datalist_round(args.datalist, dlist)
        start = args.start_round if args.start_round is not None else -1 if found is None else found + 1
        if start < 1 or start > args.rounds:
            raise rt.InputError(f"--datalist {args.datalist}: cannot tell which round it ends (no 'round' entry, "
                                f"name not datalist_XX), or round {start} is past --rounds {args.rounds}: give "
                                f"--start-round")
        log.log({"event": "datalist", "datalist": str(args.datalist), "start_round": start, **summary})

    # -- method: the active rounds --
    history, res = [], None
    for rnd in range(start, args.rounds + 1):
        ck_path, dl_path = out / f"checkpoint{rnd:02d}.pth", out / f"datalist_{rnd:02d}.json"
        lab_str = {names[i]: sorted(r) for i, r in sorted(labeled.items()) if r}
        if args.resume and ck_path.exists():  # round finished earlier: its model, and below its datalist
            ck = rt.load_checkpoint(ck_path)
            model.load_state_dict(ck["model"])
            res = ck["result"]
            log.log({"event": "resumed_round", "round": rnd})
        else:
            if rnd == 0:
                model.load_state_dict(init_state)
            else:
                train_round(args, rnd, model, mcfg, source, target, labeled, lab_str, device, amp, rank, world, out, log)
            res = evaluate(model, val, args.num_classes, device, amp, rank=rank, world_size=world,
                           workers=args.workers, save_dir=out / "predictions" if rnd == args.rounds else None)
            if args.freeze_bn:
                set_bn_eval(model)
            if rank == 0:
                rt.save_checkpoint(ck_path, model=rt.unwrap(model).state_dict(), config=mcfg, round=rnd,
                                   labeled=lab_str, result=res)
        pct = 100.0 * sum(int(inventory[i][list(r)].sum()) for i, r in labeled.items() if r) / \
            float(sum(int(p.sum()) for p in inventory))
        history.append({"round": rnd, "labeled_percent": round(pct, 3), "val_mIoU": res["mIoU"],
                        "labeled_regions": int(sum(len(r) for r in labeled.values()))})
        log.log({"round": rnd, "labeled_percent": pct, "val_mIoU": res["mIoU"]})
        if rnd == args.rounds:
            break

        # ---- selection of the next regions (rank 0), written to datalist_XX.json --------------------
        if args.resume and dl_path.exists():
            labeled = R.labeled_from_datalist(json.loads(dl_path.read_text()), names, dl_path)
            continue
        if rank == 0:
            labeled = select(args, rnd, model, source, target, src_idx, names, src_names, inventory, labeled,
                             size * img_px, classes, mcfg["norm"], device, amp, out, dl_path, log)
        rt.barrier()
        labeled = R.labeled_from_datalist(json.loads(dl_path.read_text()), names, dl_path)
        if args.freeze_bn:
            set_bn_eval(model)
    # -- end of method --

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=rt.unwrap(model).state_dict(), config=mcfg, round=args.rounds)
        final = {"last": res, "rounds": history, "selection": args.selection, "eval_split": "val", "target": tgt}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print("[done] " + "  ".join(f"r{h['round']}: {h['labeled_percent']:.2f}% -> {h['val_mIoU']:.2f}"
                                    for h in history) + f" -> {out}")
    rt.cleanup_distributed()


def train_round(args, rnd, model, mcfg, source, target, labeled, lab_str, device, amp, rank, world, out, log):
    """Fine-tune (fresh SGD, poly over --iters) on the source plus the labelled target regions."""
    # upstream ExtResize (bilinear, ext_transforms.py:404-427) + ExtColorJitter + ExtRandomHorizontalFlip
    aug = Compose([Resize(args.crop_size, interp="bilinear"), ColorJitter(0.5, 0.5, 0.5, 0.0), RandomHFlip()])
    data = R.ConcatSet(source, R.RegionLabeledSet(target, labeled, aug, source.norm))
    model.train()
    if args.freeze_bn:
        set_bn_eval(model)
    optimizer = rt.sgd_10x(rt.unwrap(model), args.lr, args.momentum, args.weight_decay)
    scaler = rt.grad_scaler(device, amp)
    start, state = 0, out / "checkpoint.pth"
    if args.resume and state.exists():
        ck = rt.load_checkpoint(state)
        if ck["round"] == rnd:  # interrupted inside this round: continue exactly
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
            start = ck["iter"]
            log.log({"event": "resumed", "round": rnd, "iter": start})
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    batches = infinite_loader(data, args.batch_size, args.seed * 1000 + rnd, start, args.workers, rank, world)
    t0 = time.time()
    for it in range(start, args.stop_iter):
        lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it, args.iters))
        batch = next(batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        with rt.autocast(device, amp):
            pred = F.interpolate(ddp(x)["out"], size=y.shape[-2:], mode="bilinear", align_corners=True)
            loss = cross_entropy(pred, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"round": rnd, "iter": it, "lr": lr, "loss": loss.item(),
                     "s_per_iter": (time.time() - t0) / (it - start + 1)})
        if (it + 1) % args.save_every == 0 and it + 1 < args.stop_iter:
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rt.rng_state())
            else:
                rngs = [rt.rng_state()]
            if rank == 0:
                rt.save_checkpoint(state, model=rt.unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict(), round=rnd, iter=it + 1, rng=rngs, labeled=lab_str,
                                   config=mcfg)


def select(args, rnd, model, source, target, src_idx, names, src_names, inventory, labeled, budget_px, classes,
           norm, device, amp, out, dl_path, log):
    """Region statistics, then selection.select_round; writes datalist_XX.json and pictures."""
    t0 = time.time()
    net = rt.unwrap(model)
    lam = S.dynamic_lambda(rnd + 1, args.alpha, args.beta)
    density = args.selection == "density" or (args.selection == "d2ada" and lam > 0)
    # uncertainty (and pixel counts): clean images, as upstream's pool set (val transform); random selection
    # reads only the pixel counts, so it takes them from the region inventory and runs no model pass
    trg = R.inventory_regions(inventory) if args.selection == "random" else \
        R.extract_regions(net, target, range(len(target)), args.crop_size, norm, device, amp,
                          workers=args.workers, desc=f"round {rnd} target regions")
    srcr = None
    if density:  # density features: through the training transform unless --density-aug none (see --help)
        aug = Compose([ColorJitter(0.5, 0.5, 0.5, 0.0), RandomHFlip()]) if args.density_aug == "train" else None
        if aug is not None:
            jit = R.extract_regions(net, target, range(len(target)), args.crop_size, norm, device, amp,
                                    workers=args.workers, desc=f"round {rnd} target regions (train transform)",
                                    transform=aug, seed=args.seed * 1000 + rnd)
            trg = dict(trg, feat=jit["feat"], prob=jit["prob"])
        srcr = R.extract_regions(net, source, src_idx, args.crop_size, norm, device, amp, workers=args.workers,
                                 desc=f"round {rnd} source regions", transform=aug,
                                 seed=args.seed * 1000 + rnd + 100000)  # other draws than the target's
    pool = np.array([r not in labeled.get(i, ()) for i, r in zip(trg["image"], trg["region"])])
    t_feat = time.time() - t0
    picks, info = S.select_round(trg, srcr, pool, budget_px, lam, args.selection, classes, args.gmm_threads,
                                 args.gmm_workers, seed=args.seed * 1000 + rnd, per_class=args.per_class,
                                 max_iter=args.gmm_max_iter, log=log.log, pca=args.density_pca)
    if "density_classes" in info:  # per class: source regions N_S, target regions N_T, mixture components
        log.log({"round": rnd, "event": "density_classes", "source_images": len(src_idx),
                 "source_regions": int(len(srcr["pixels"])), "target_regions": int(len(trg["pixels"])),
                 "density_aug": args.density_aug, "density_pca": args.density_pca,
                 "N_S/N_T/components": " ".join(f"{c}:{v['N_S']}/{v['N_T']}/{v['components']}"
                                                for c, v in info["density_classes"].items()),
                 "classes": info["density_classes"]})
    new = {k: set(v) for k, v in labeled.items()}
    chosen = []
    for r, crit, score in picks:
        i, reg = int(trg["image"][r]), int(trg["region"][r])
        new.setdefault(i, set()).add(reg)
        chosen.append({"name": names[i], "region": reg, "criterion": crit, "score": score,
                       "pixels": int(trg["pixels"][r])})
    info.update(feature_seconds=round(t_feat, 1), selection_seconds=round(time.time() - t0 - t_feat, 1),
                criteria={c: sum(1 for p in chosen if p["criterion"] == c) for c in ("density", "uncertainty", "random")})
    dl = R.datalist_dict(rnd, src_names, names, inventory, new, chosen, info)
    rt.save_json(dl_path, dl)
    log.log({"round": rnd, "event": "selected", "regions": len(chosen), "lambda": info["lambda"],
             "labeled_percent_next": dl["labeled_percent"], **{k: v for k, v in info.items() if k.endswith("seconds")}})
    # pictures: the images with the most regions picked this round
    per_img = {}
    for p in chosen:
        per_img.setdefault(p["name"], {})[p["region"]] = p["criterion"]
    index = {n: i for i, n in enumerate(names)}
    for n in sorted(per_img, key=lambda n: (-len(per_img[n]), n))[:args.pictures]:
        i = index[n]
        img_path = target.files[i][0]
        sp = R.read_superpixel(target.root, img_path)
        R.draw_selection(img_path, sp, per_img[n], sorted(labeled.get(i, ())),
                         out / "selections" / f"round_{rnd:02d}" / (Path(n).stem + ".png"))
    # one sheet per round (regions outlined by criterion) and the class shares of the picked pixels vs the
    # target's ground truth (common.pictures; the ground truth is read for the pictures only)
    P.region_selection_pictures(target, {index[n]: r for n, r in per_img.items()},
                                lambda i: R.read_superpixel(target.root, target.files[i][0]), R.CRITERION_COLOURS,
                                out / "selections" / f"round_{rnd:02d}.png",
                                f"D2ADA round {rnd}: {len(chosen)} regions, lambda {info['lambda']:.3f}",
                                earlier=labeled, n_show=args.pictures)
    return new


if __name__ == "__main__":
    rt.run_main(main, parse_args)
