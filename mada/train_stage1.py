r"""MADA stage 1 / MADAv2 step 1 ("train_active_stage1.py" / "step1_train_active_sup_only.py"): fine-tune
the warm-up DeepLabV3+ with the source labels and the labels of the actively selected target images
(select_active.py). MADA Sec. 3.4, Eq. 4: the supervised part of the objective.

    L = CE(active target) + CE(source)                (weights 1 and 1; batches 4 + 4)

Toy (no arguments: the warm-up model, MADA's selection in runs/mada/select_mada):
    python mada/train_stage1.py
MADAv2 step 1 (dual-distance selection; --recipe madav2 switches the paper preset to MADAv2's):
    python mada/train_stage1.py --recipe madav2 --selection runs/mada/select_madav2 --out runs/mada/stage1_madav2
GTA5 -> Cityscapes, 5% of the images (MADA stage 1; add --recipe madav2 for MADAv2 step 1):
    python mada/train_stage1.py --source gta5 --source-root /data/GTA5 --target cityscapes \
        --target-root /data/cityscapes --init-from runs/mada/warmup/model.pth \
        --selection runs/mada/select_mada/selected.json
Several processes:
    torchrun --nproc_per_node=2 mada/train_stage1.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set, DOMAINS
from common.evaluate import evaluate
from common.losses import cross_entropy
from common.metrics import format_table
from mada.releases import FORMAT_HELP, FORMATS, load_segmenter
from mada import core

# Defaults (mada/README.md, recipe tables). PAPER: MADA configs/active_from_gta_to_city_stage1.yml (SGD 1e-4 on
# every parameter, momentum 0.9, wd 2e-4, poly 0.9 over 90k iterations, 50 epochs of the target loader
# (2975 // 4 = 743 iterations, drop_last) = 37,150; batch 4 + 4; crop 512x896; active images read at 1052x1914).
# PAPER_V2: MADAv2 configs/active_from_gta_to_city_stage1.yml (150 epochs = 111,450, poly over 900k, backbone 1x /
# heads 10x (deeplab.py optim_parameters), active images read at 1024x2048). TOY: a short CPU fine-tuning.
PAPER = dict(iters=90000, stop_iter=37150, batch_size=4, lr=1e-4, head_lr_mult=1.0, crop_size=(512, 896),
             active_size=(1052, 1914), eval_size=(1024, 2048), eval_every=1000, save_every=1000, out="runs/mada/stage1")
PAPER_V2 = dict(PAPER, iters=900000, stop_iter=111450, head_lr_mult=10.0, active_size=(1024, 2048),
                out="runs/mada/stage1_madav2")
TOY = dict(iters=40, batch_size=4, lr=1e-2, head_lr_mult=1.0, eval_every=40, save_every=20, out="runs/mada/stage1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (MADA stage 1)")
    g.add_argument("--recipe", default="mada", choices=["mada", "madav2"], help="paper preset: MADA stage 1 or "
                   "MADAv2 step 1 (150 epochs, poly over 900k, heads 10x); the toy preset is the same for both")
    g.add_argument("--active-size", type=cli.hw, default=None, help="H,W the active target images are resized to "
                   "before the augmentation (upstream img_rows x img_cols of the active set)")
    g.add_argument("--init-from", default="runs/mada/warmup/model.pth", help="warm-up model.pth (warmup.py)")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--selection", default="runs/mada/select_mada",
                   help="selected.json / selected.txt (or its folder) of select_active.py, or upstream's list "
                   "(selection_list/stage1_cac_list_0.05.txt: CITY/NAME lines)")
    g.add_argument("--lambda-active", type=float, default=1.0, help="weight of the CE on the active images")
    g.add_argument("--head-lr-mult", type=float, default=None, help="lr multiplier of ASPP/decoder/classifier "
                   "(MADA trains every parameter at one lr: 1; MADAv2 10)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-4)
    g.add_argument("--eval-size", type=cli.hw, default=None, help="H,W of the target evaluation input (paper preset: "
                   "Cityscapes' full 1024x2048, as upstream; toy: the shared protocol of common)")
    g.add_argument("--random-mirror", type=int, default=1, choices=[0, 1], help="random horizontal flip")
    g.add_argument("--released-sched-order", action="store_true", help="iteration i at poly(i + 1), as upstream, "
                   "which steps its PolynomialLR before the optimiser (deviation 21); default poly(i)")
    args = p.parse_args(argv)
    cli.fill_defaults(args, TOY, PAPER_V2 if args.recipe == "madav2" else PAPER)
    cli.default_num_classes(args)
    return args


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)

    # ---- model -----------------------------------------------------------------------------------
    model, mcfg, fmt = load_segmenter(args.init_from, args.checkpoint_format)  # strict; MADA's releases too
    log.log({"event": "init", "init_from": args.init_from, "checkpoint_format": fmt, "config": mcfg})
    model = model.to(device, memory_format=rt.memory_format(amp)).train()

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    toy = cli.is_toy(args)
    src_aug = core.train_transform(toy, args.crop_size or DOMAINS[src][3], args.random_mirror,
                                   core.UPSTREAM_HW.get(DOMAINS[src][0]))
    tgt_aug = core.train_transform(toy, args.crop_size or DOMAINS[tgt][3], args.random_mirror, args.active_size)
    source = train_set(src, src_root, mcfg["num_classes"], mcfg["norm"], src_aug)
    labeled = core.read_selection(args.selection)
    val = core.eval_set_at(tgt, tgt_root, mcfg["num_classes"], mcfg["norm"], args.eval_size)

    # ---- optimiser, resume -----------------------------------------------------------------------
    optimizer = core.param_groups_sgd(model, args.lr, args.momentum, args.weight_decay, args.head_lr_mult)
    scaler = rt.grad_scaler(device, amp)
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        if ck["labeled"] != labeled:  # the labelled set is part of the run's state
            raise SystemExit(f"--selection {args.selection} differs from the labelled set stored in "
                             f"{out / 'checkpoint.pth'} ({len(ck['labeled'])} images): resume with the same selection")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        log.log({"event": "resumed", "iter": start})
    active = core.subset_by_names(train_set(tgt, tgt_root, mcfg["num_classes"], mcfg["norm"], tgt_aug),
                                  labeled, f"selection {args.selection}")
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    batches = infinite_loader(source, args.batch_size, args.seed, start, args.workers, rank, world)
    a_batches = infinite_loader(active, args.batch_size, args.seed + 1, start, args.workers, rank, world)

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        # upstream steps its scheduler before the optimiser: iteration i at poly(i + 1) (deviation 21, flag)
        lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it + 1 if args.released_sched_order else it, args.iters))
        batch, a_batch = next(batches), next(a_batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        xa, ya = rt.to_device(a_batch["image"], device, amp), a_batch["label"].to(device)
        # -- method: CE on the active target images + CE on the source (two passes, as upstream) --
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast(device, amp):
            pa = F.interpolate(ddp(xa)["out"], size=ya.shape[-2:], mode="bilinear", align_corners=True)
            loss_active = cross_entropy(pa, ya)
        scaler.scale(args.lambda_active * loss_active).backward()
        with rt.autocast(device, amp):
            ps = F.interpolate(ddp(x)["out"], size=y.shape[-2:], mode="bilinear", align_corners=True)
            loss_source = cross_entropy(ps, y)
        scaler.scale(loss_source).backward()
        loss = args.lambda_active * loss_active.detach() + loss_source.detach()
        # -- end of method --
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": lr, "loss": loss.item(), "loss_active": loss_active.item(),
                     "loss_source": loss_source.item(), "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
        if (it + 1) % args.eval_every == 0 or last:
            res = evaluate(model, val, mcfg["num_classes"], device, amp, rank=rank, world_size=world,
                           workers=args.workers, save_dir=out / "predictions" if last else None)
            if res["mIoU"] > best["mIoU"]:
                best = {"mIoU": res["mIoU"], "iter": it + 1}
                if rank == 0 and args.keep_snapshots:
                    rt.save_checkpoint(out / "best_model.pth", model=model.state_dict(), config=mcfg, iter=it + 1)
            log.log({"iter": it + 1, "val_mIoU": res["mIoU"], "best_mIoU": best["mIoU"]})
        if (it + 1) % args.save_every == 0 or last:
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rt.rng_state())
            else:
                rngs = [rt.rng_state()]
            if rank == 0:
                rt.save_checkpoint(out / "checkpoint.pth", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict(), iter=it + 1, rng=rngs, best=best, config=mcfg,
                                   labeled=labeled)

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter,
                           labeled=labeled)
        final = {"last": res, "best": best, "iters": args.stop_iter, "labeled_images": len(labeled),
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
