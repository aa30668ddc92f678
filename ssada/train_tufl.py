"""TUFL (Yan et al., T-ITS 2023): threshold-adaptive unsupervised focal loss, Cityscapes -> CrossCity
(13 classes), BiSeNetV1-R18 (ywher/TUFL, utils/loss.py UnsupFocalLoss / AdaptUnsupFocalLoss,
unsup/train_step.py). A source model (phase 1, supervised, TUFL's `--supervision_mode sup`; skipped with
--init-from) is adapted (phase 2) with the supervised source loss plus the focal consistency between a
target view and its photometrically perturbed, mirrored copy (aligned back before the loss):

    L = L_sup + lambda_u * L_unsup,      L_sup = mean over the 3 heads of OHEM-CE (0.7, n_min = B H W / 16)
    L_unsup = mean over the 3 heads of mean_{max p > tau_y} [ sum_c p_c (log p_c - d^gamma log q_c) + H(p) ]
    p = softmax(target view), q = softmax(perturbed view), y = argmax p, d = |p_y - q_y|
    tau: fixed (0.8) or adaptive per class (--thresholds adaptive: EMA a of the confidence ranked
         int(n_c b tau_c^d) among the pixels predicted c)

Toy domains (no arguments: toy Cityscapes-style source -> toy CrossCity-style target, 13 classes):
    python ssada/train_tufl.py
Adaptive thresholds:
    python ssada/train_tufl.py --thresholds adaptive --out runs/ssada/tufl_adaptive
Cityscapes -> Rio, from a Cityscapes BiSeNet (the README's command: 2k iters, lr 0.5e-5, frozen BN):
    python ssada/train_tufl.py --source cityscapes --source-root /data/cityscapes --target crosscity \
        --target-root /data/NTHU_Datasets --city Rio --init-from cityscapes_bisenet13.pth
Several processes:
    torchrun --nproc_per_node=2 ssada/train_tufl.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.bisenet import bisenet_from_checkpoint, make_bisenet
from common.datasets import DOMAINS, build_dataset, infinite_loader, resolve_domain, train_set, eval_set
from common.evaluate import evaluate
from common.losses import ohem_cross_entropy
from common.metrics import format_table
from common.transforms import Compose, RandomHFlip, Resize
from ssada.data import UnlabeledViews
from ssada.losses import AdaptiveThresholds, unsup_focal_loss

# Defaults. PAPER: TUFL README command (2000 iterations, 1 + 1 images, lr 0.5e-5 without warm-up,
# gamma 2, tau 0.8, lambda_u 0.08, frozen BN) from a Cityscapes-trained BiSeNet (--init-from). TOY: the
# source model is trained here first (phase 1, from scratch), then adapted.
PAPER = dict(init=None, iters=2000, batch_size=1, lr=0.5e-5, source_iters=0, source_batch_size=8,
             source_lr=0.01, freeze_bn=1, eval_every=200, save_every=200, out="runs/ssada/tufl")
TOY = dict(init="scratch", iters=150, batch_size=2, lr=0.005, source_iters=300, source_batch_size=4,
           source_lr=0.02, freeze_bn=0, eval_every=150, save_every=150, out="runs/ssada/tufl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p, source="toy_cityscapes", target="toy_crosscity")
    g = p.add_argument_group("method (TUFL)")
    g.add_argument("--city", default="Rome", help="CrossCity city (Rome | Rio | Taipei | Tokyo)")
    g.add_argument("--init-from", default=None, help="source model checkpoint (skips phase 1)")
    g.add_argument("--source-iters", type=int, default=None, help="phase 1: supervised source iterations")
    g.add_argument("--source-batch-size", type=int, default=None)
    g.add_argument("--source-lr", type=float, default=None)
    g.add_argument("--thresholds", default="fixed", choices=["fixed", "adaptive", "none"],
                   help="confidence selection of the focal loss: fixed tau, TUFL's adaptive per-class, or none")
    g.add_argument("--tau", type=float, default=0.8, help="fixed threshold / initial adaptive threshold")
    g.add_argument("--gamma", type=float, default=2.0, help="focal exponent on |p_y - q_y|")
    g.add_argument("--unsup-coeff", type=float, default=0.08, help="lambda_u")
    g.add_argument("--adapt-a", type=float, default=0.9, help="EMA factor of the adaptive thresholds")
    g.add_argument("--adapt-b", type=float, default=0.8, help="rank fraction of the adaptive thresholds")
    g.add_argument("--adapt-d", type=float, default=8.0, help="exponent on tau_c in the rank")
    g.add_argument("--freeze-bn", type=int, default=None, choices=[0, 1], help="BN in eval mode while adapting")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    args = p.parse_args(argv)
    stop = args.stop_iter  # counts over both phases (fill_defaults would tie it to --iters)
    cli.fill_defaults(args, TOY, PAPER)
    args.stop_iter = stop
    cli.default_num_classes(args)
    if args.init is None and args.init_from is None:
        p.error("--init-from (a source BiSeNet) or --init (ResNet-18 weights) is required on real data")
    return args


def bn_eval(model):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)

    # ---- model -----------------------------------------------------------------------------------
    if args.init_from:
        model, mcfg = bisenet_from_checkpoint(args.init_from)
        if mcfg["num_classes"] != args.num_classes:
            raise SystemExit(f"{args.init_from} has {mcfg['num_classes']} classes, not {args.num_classes}")
        args.source_iters = 0
    else:
        model, mcfg = make_bisenet(args.num_classes, args.init)
    model = model.to(device, memory_format=rt.memory_format(amp)).train()

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    crop = args.crop_size or DOMAINS[tgt][3]
    source = train_set(src, src_root, args.num_classes, mcfg["norm"], Compose([Resize(crop), RandomHFlip()]))
    tfiles = build_dataset(tgt_kind, tgt_root, DOMAINS[tgt][1], args.num_classes, None, mcfg["norm"],
                           with_labels=False, city=args.city).files
    target = UnlabeledViews([f for f, _ in tfiles], Compose([Resize(crop), RandomHFlip()]), mcfg["norm"])
    val = eval_set(tgt, tgt_root, args.num_classes, mcfg["norm"]) if tgt_kind != "crosscity" else \
        build_dataset(tgt_kind, tgt_root, DOMAINS[tgt][2], args.num_classes,
                      Compose([Resize(DOMAINS[tgt][4], resize_label=False)]), mcfg["norm"], city=args.city)
    total = args.source_iters + args.iters
    args.stop_iter = min(args.stop_iter or total, total)

    # ---- optimiser, resume -----------------------------------------------------------------------
    def optimiser():
        return rt.sgd_10x(model, args.lr, args.momentum, args.weight_decay)
    optimizer = optimiser()
    scaler = rt.grad_scaler(device, amp)
    thresholds = [AdaptiveThresholds(args.num_classes, args.tau, args.adapt_a, args.adapt_b, args.adapt_d)
                  for _ in range(3)]  # one per head
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        for t, s in zip(thresholds, ck["thresholds"]):
            t.load_state_dict(s)
        log.log({"event": "resumed", "iter": start})
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    phase1 = start < args.source_iters
    bs = args.source_batch_size if phase1 else args.batch_size
    batches = infinite_loader(source, bs, args.seed, start if phase1 else start - args.source_iters,
                              args.workers, rank, world)
    tbatches = None if phase1 else infinite_loader(target, args.batch_size, args.seed + 1, start - args.source_iters,
                                                   args.workers, rank, world)
    heads = ("out", "aux16", "aux32")

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        if it == args.source_iters and args.source_iters > 0 and phase1:  # phase 1 -> phase 2
            phase1 = False
            if rank == 0:
                rt.save_checkpoint(out / "source_model.pth", model=model.state_dict(), config=mcfg, iter=it)
            optimizer = optimiser()
            batches = infinite_loader(source, args.batch_size, args.seed, 0, args.workers, rank, world)
            tbatches = infinite_loader(target, args.batch_size, args.seed + 1, 0, args.workers, rank, world)
            log.log({"iter": it, "event": "source phase done", "saved": "source_model.pth"})
        if phase1:
            lr = rt.set_lr(optimizer, rt.poly_lr(args.source_lr, it, args.source_iters))
        else:
            lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it - args.source_iters, args.iters))
            if args.freeze_bn:
                bn_eval(model)
        batch = next(batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        hw = y.shape[-2:]
        ohem = lambda o: ohem_cross_entropy(F.interpolate(o.float(), size=hw, mode="bilinear", align_corners=True),
                                            y, 0.7, y.numel() // 16)
        stats = {}
        if phase1:
            with rt.autocast(device, amp):
                pred = ddp(x)
            loss = loss_sup = sum(ohem(pred[h][:x.shape[0]]) for h in heads) / 3
        else:
            # -- method: supervised source + unsupervised focal loss between a target view and its
            #    perturbed mirror (logits mirrored back to align) --
            tb = next(tbatches)
            xt, xa = tb["image"].to(device), tb["s1"].to(device).flip(-1)
            n = x.shape[0]
            with rt.autocast(device, amp):
                pred = ddp(rt.to_device(torch.cat([x, xt, xa]), device, amp))
            loss_sup = sum(ohem(pred[h][:n]) for h in heads) / 3
            loss_u, kept = 0.0, []
            for j, h in enumerate(heads):
                ref, other = pred[h][n:2 * n], pred[h][2 * n:].flip(-1)
                ref = F.interpolate(ref.float(), size=hw, mode="bilinear", align_corners=True)
                other = F.interpolate(other.float(), size=hw, mode="bilinear", align_corners=True)
                if args.thresholds == "adaptive":
                    tau = thresholds[j].update(F.softmax(ref.detach(), 1))
                else:
                    tau = None if args.thresholds == "none" else args.tau
                lu, frac = unsup_focal_loss(ref, other, args.gamma, tau)
                loss_u = loss_u + lu / 3
                kept.append(frac)
            loss = loss_sup + args.unsup_coeff * loss_u
            stats = {"loss_unsup": loss_u.item(), "kept": sum(kept) / 3}
            if args.thresholds == "adaptive":
                stats["tau_mean"] = float(thresholds[0].tau.mean())
            # -- end of method --
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "phase": "source" if phase1 else "adapt", "lr": lr, "loss": loss.item(),
                     "loss_sup": loss_sup.item(), **stats, "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
        if (it + 1) % args.eval_every == 0 or last or it + 1 == args.source_iters:
            state = rt.rng_state()  # evaluation must not move the training RNG (exact resume; its loader draws a seed)
            res = evaluate(model, val, args.num_classes, device, amp, rank=rank, world_size=world,
                           workers=args.workers, save_dir=out / "predictions" if last else None)
            rt.set_rng_state(state)
            if res["mIoU"] > best["mIoU"] and not phase1:
                best = {"mIoU": res["mIoU"], "iter": it + 1}
                if rank == 0:
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
                                   thresholds=[t.state_dict() for t in thresholds])

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter)
        final = {"last": res, "best": best, "iters": args.stop_iter, "source_iters": args.source_iters,
                 "thresholds": args.thresholds, "adaptive_tau": [t.tau.tolist() for t in thresholds],
                 "wall_s": round(time.time() - t0, 1), "eval_split": "test", "target": tgt}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    main(parse_args())
