r"""MADA stage 2 (upstream train_active_stage2.py): continue from the stage-1 model with, in addition to
the supervised terms, hard pseudo-labels on the unlabelled target and the soft multi-anchor loss that
pulls each target image's objective vector toward the target anchors (made from the stage-1 model's
target vectors: save_features.py --domain target + cluster_anchors.py), whose nearest anchor follows
the image by a momentum update. MADA Sec. 3.4, Eqs. 4-6.

    L = CE(active) + CE(source) + CE(target, argmax of the model itself) + 0.7 L_anchor
    L_anchor = sum_k w_k d_k / sum_k w_k,  w_k = 1/d_k,  d_k = d(V_t, A_k)          (Eq. 5)
    A_k* <- 0.999 A_k* + 0.001 V_t,  k* = argmin_k d_k                             (Eq. 6)

Toy (no arguments: the stage-1 model, its target anchors in runs/mada/anchors/target_stage1):
    python mada/train_stage2.py
Ablation: absent classes masked out of the distances and the anchor update (upstream: zero rows enter them):
    python mada/train_stage2.py --absent mask
GTA5 -> Cityscapes:
    python mada/train_stage2.py --source gta5 --source-root /data/GTA5 --target cityscapes \
        --target-root /data/cityscapes --init-from runs/mada/stage1/model.pth \
        --anchors runs/mada/anchors/target_stage1 --selection runs/mada/select_mada
Several processes (the anchor updates of all ranks are gathered and applied in rank order):
    torchrun --nproc_per_node=2 mada/train_stage2.py
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

# Defaults (mada/README.md, recipe tables). PAPER: MADA configs/active_from_gta_to_city_stage2.yml (the stage-1
# optimiser: SGD 1e-4 on every parameter, momentum 0.9, wd 2e-4, poly 0.9 over 90k, 50 epochs of 743 iterations
# = 37,150; batch 4 + 4 + 4; crop 512x896; active images read at 1052x1914; cls_feature_weight 0.7).
# TOY: a short CPU fine-tuning of the toy stage-1 model.
PAPER = dict(iters=90000, stop_iter=37150, batch_size=4, lr=1e-4, crop_size=(512, 896), active_size=(1052, 1914),
             eval_size=(1024, 2048), eval_every=1000, save_every=1000, out="runs/mada/stage2")
TOY = dict(iters=40, batch_size=4, lr=5e-3, eval_every=40, save_every=20, out="runs/mada/stage2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (MADA stage 2)")
    g.add_argument("--init-from", default="runs/mada/stage1/model.pth", help="stage-1 model.pth")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--anchors", default="runs/mada/anchors/target_stage1",
                   help="target anchors of the stage-1 model (cluster_anchors.py), or "
                   "MADA's anchors/cluster_centroids_full_target_10.pkl")
    g.add_argument("--selection", default="runs/mada/select_mada",
                   help="selected.json / selected.txt (or its folder) of select_active.py, or upstream's list "
                   "(selection_list/stage1_cac_list_0.05.txt: CITY/NAME lines)")
    g.add_argument("--lambda-active", type=float, default=1.0, help="weight of the CE on the active images")
    g.add_argument("--lambda-pseudo", type=float, default=1.0, help="weight of the target pseudo-label CE")
    g.add_argument("--lambda-anchor", type=float, default=0.7, help="weight of the soft anchor loss (0.7)")
    g.add_argument("--anchor-momentum", type=float, default=0.999, help="momentum of the nearest-anchor update")
    g.add_argument("--absent", default="zero", choices=core.ABSENT_CHOICES,
                   help="zero: absent classes' zero rows enter distances/updates (upstream); mask: ablation")
    g.add_argument("--anchor-grad", default="pooling", choices=core.GRAD_CHOICES, help="gradient of V_c: "
                   "pooling = 2/(h w) per pixel (upstream NormalisationPoolingFunction); mean = 1/|M_c| (ablation)")
    g.add_argument("--active-size", type=cli.hw, default=None, help="H,W the active target images are resized to "
                   "before the augmentation (upstream img_rows x img_cols of the active set)")
    g.add_argument("--min-pixels", type=int, default=10, help="pixels a class needs in an objective vector")
    g.add_argument("--head-lr-mult", type=float, default=1.0, help="lr multiplier of ASPP/decoder/classifier "
                   "(MADA trains every parameter at one lr)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-4)
    g.add_argument("--eval-size", type=cli.hw, default=None, help="H,W of the target evaluation input (paper preset: "
                   "Cityscapes' full 1024x2048, as upstream; toy: the shared protocol of common)")
    g.add_argument("--random-mirror", type=int, default=1, choices=[0, 1], help="random horizontal flip")
    g.add_argument("--released-sched-order", action="store_true", help="iteration i at poly(i + 1), as upstream, "
                   "which steps its PolynomialLR before the optimiser (deviation 21); default poly(i)")
    args = p.parse_args(argv)
    cli.fill_defaults(args, TOY, PAPER)
    cli.default_num_classes(args)
    return args


def gather(t):
    """all_gather of a tensor of the same shape on every rank -> list in rank order."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return parts


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
    act_aug = core.train_transform(toy, args.crop_size or DOMAINS[tgt][3], args.random_mirror, args.active_size)
    tgt_aug = core.train_transform(toy, args.crop_size or DOMAINS[tgt][3], args.random_mirror,
                                   core.UPSTREAM_HW.get(DOMAINS[tgt][0]))
    source = train_set(src, src_root, mcfg["num_classes"], mcfg["norm"], src_aug)
    labeled = core.read_selection(args.selection)
    val = core.eval_set_at(tgt, tgt_root, mcfg["num_classes"], mcfg["norm"], args.eval_size)

    anchors = torch.from_numpy(core.load_anchors(args.anchors, mcfg["num_classes"])[0]).to(device)
    if anchors.shape[1] != mcfg["num_classes"]:
        raise SystemExit(f"anchors {tuple(anchors.shape)} of {args.anchors} do not match {mcfg['num_classes']} classes")

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
        anchors.copy_(ck["anchors"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        log.log({"event": "resumed", "iter": start})
    active = core.subset_by_names(train_set(tgt, tgt_root, mcfg["num_classes"], mcfg["norm"], act_aug),
                                  labeled, f"selection {args.selection}")
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    batches = infinite_loader(source, args.batch_size, args.seed, start, args.workers, rank, world)
    a_batches = infinite_loader(active, args.batch_size, args.seed + 1, start, args.workers, rank, world)
    target = train_set(tgt, tgt_root, mcfg["num_classes"], mcfg["norm"], tgt_aug, with_labels=False)
    t_batches = infinite_loader(target, args.batch_size, args.seed + 2, start, args.workers, rank, world)

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        # upstream steps its scheduler before the optimiser: iteration i at poly(i + 1) (deviation 21, flag)
        lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it + 1 if args.released_sched_order else it, args.iters))
        batch, a_batch, t_batch = next(batches), next(a_batches), next(t_batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        xa, ya = rt.to_device(a_batch["image"], device, amp), a_batch["label"].to(device)
        xt = rt.to_device(t_batch["image"], device, amp)
        # -- method: CE(active) + CE(source) + CE(pseudo) + 0.7 L_anchor, then the anchor update --
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast(device, amp):
            pa = F.interpolate(ddp(xa)["out"], size=ya.shape[-2:], mode="bilinear", align_corners=True)
            loss_active = cross_entropy(pa, ya)
        scaler.scale(args.lambda_active * loss_active).backward()
        with rt.autocast(device, amp):
            ps = F.interpolate(ddp(x)["out"], size=y.shape[-2:], mode="bilinear", align_corners=True)
            loss_source = cross_entropy(ps, y)
        scaler.scale(loss_source).backward()
        with rt.autocast(device, amp):
            pt = ddp(xt, return_feat=True)
        logits_t, feat_t = pt["out"].float(), pt["feat"].float()
        # hard pseudo-labels: the model's own argmax, no threshold, at feature (1/4) resolution
        loss_pseudo = cross_entropy(logits_t, logits_t.detach().argmax(1))
        loss_anchor, vec, present, d = core.batch_anchor_loss(feat_t, logits_t, anchors, mcfg["num_classes"],
                                                              args.min_pixels, args.absent, args.anchor_grad)
        scaler.scale(args.lambda_pseudo * loss_pseudo + args.lambda_anchor * loss_anchor).backward()
        if world > 1:  # every rank applies every rank's update, in rank order: anchors stay identical
            vec, present, d = (torch.cat(gather(t)) for t in (vec, present, d))
        core.update_nearest_anchor(anchors, vec, present, d, args.anchor_momentum, args.absent)
        loss = (args.lambda_active * loss_active + loss_source + args.lambda_pseudo * loss_pseudo
                + args.lambda_anchor * loss_anchor).detach()
        # -- end of method --
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": lr, "loss": loss.item(), "loss_active": loss_active.item(),
                     "loss_source": loss_source.item(), "loss_pseudo": loss_pseudo.item(),
                     "loss_anchor": loss_anchor.item(), "s_per_iter": (time.time() - t0) / (it - start + 1)})

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
                                   labeled=labeled, anchors=anchors.cpu())

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter,
                           labeled=labeled)
        final = {"last": res, "best": best, "iters": args.stop_iter, "labeled_images": len(labeled),
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt}
        core.atomic_save_npz(out / "anchors_final.npz", anchors=anchors.cpu().numpy(),
                             present=core.load_anchors(args.anchors, mcfg["num_classes"])[1])
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
