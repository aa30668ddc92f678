r"""D2ADA step 0, model warm-up (paper Sec. 4.1; official warmup.py): the initial model of the active
rounds. Either UDA warm-up, AdaptSegNet's output-space adversarial training
    L_G = CE(source) + lambda_adv * BCE(D(softmax(P_target)), source label)
    L_D = 1/2 BCE(D(softmax(P_source)), 0) + 1/2 BCE(D(softmax(P_target)), 1)
(P: logits upsampled to the input size, where upstream's DeepLab returns them)
(--warmup uda_warmup, the paper's choice), or supervised warm-up on the source only
(--warmup sup_warmup). Learning rates: linear warm-up over --warmup-iters, then poly (both networks).

Toy domains (no arguments: toy GTA5-style -> toy Cityscapes-style, DeepLabV3+ R18 from scratch):
    python d2ada/warmup.py
GTA5 -> Cityscapes, DeepLabV3+-R101 (or --model deeplabv2: D2ADA's DeepLabV2 with a 256-d feature):
    python d2ada/warmup.py --source gta5 --source-root /data/GTA5 \
        --target cityscapes --target-root /data/cityscapes --init /weights/resnet101-imagenet.pth
SYNTHIA -> Cityscapes, 16 classes:  ... --source synthia --source-root /data/RAND_CITYSCAPES --num-classes 16
Several processes:
    torchrun --nproc_per_node=2 d2ada/warmup.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set
from common.evaluate import evaluate
from common.losses import cross_entropy
from common.metrics import format_table
from common.models import FCDiscriminator
from common.transforms import ColorJitter, Compose, RandomHFlip, Resize
from d2ada.model import MODELS, make_model
from d2ada.regions import eval_set_at

# Defaults. PAPER: the official utils/common.py (DeepLabV3+-R101 OS16, SGD 2.5e-4, momentum 0.9, wd 5e-4,
# poly 0.9 over 100k iterations, batch 1, images resized to 1024x2048, D Adam 2.5e-4, 5k-iter linear
# warm-up, BN frozen). TOY: a CPU-sized preset trained from scratch (no ImageNet weights can be downloaded
# here), so a larger lr and batch (4; 8 before issue 17's 40-minute benchmark budget: the v2 numbers), and BN
# trained.
PAPER = dict(model="deeplabv3plus", backbone="resnet101", init=None, iters=100000, batch_size=1, lr=2.5e-4,
             crop_size=(1024, 2048), warmup_iters=5000, freeze_bn=1, eval_every=1000, save_every=1000,
             out="runs/d2ada/warmup")
TOY = dict(model="deeplabv3plus", backbone="resnet18", init="toy", iters=300, batch_size=4, lr=1e-2,
           crop_size=(64, 128), warmup_iters=30, freeze_bn=0, eval_every=100, save_every=100,
           out="runs/d2ada/warmup")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (D2ADA warm-up)")
    g.add_argument("--warmup", default="uda_warmup", choices=["uda_warmup", "sup_warmup"],
                   help="uda_warmup: output-space adversarial (AdaptSegNet); sup_warmup: source CE only")
    g.add_argument("--output-stride", type=int, default=16, choices=[8, 16], help="backbone output stride "
                   "(upstream --output_stride, default 16, for both models)")
    g.add_argument("--lambda-adv", type=float, default=0.0005, help="weight of the adversarial loss on G")
    g.add_argument("--lr-d", type=float, default=2.5e-4, help="discriminator learning rate (Adam 0.9/0.99)")
    g.add_argument("--warmup-iters", type=int, default=None, help="linear learning-rate warm-up length")
    g.add_argument("--freeze-bn", type=int, default=None, choices=[0, 1], help="BN in eval mode (frozen "
                   "statistics and affine parameters; paper 1, toy 0: from-scratch models need BN)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    args = p.parse_args(argv)
    cli.fill_defaults(args, TOY, PAPER)
    cli.default_num_classes(args)
    if args.model not in MODELS:
        p.error(f"--model must be one of {MODELS} for D2ADA (the selection needs a 256-d feature)")
    if args.init is None:
        p.error("--init (backbone weights file) is required on real data; pass --init scratch to train from scratch")
    return args


def set_bn_eval(model):
    """Frozen BN (upstream freeze_bn): statistics not updated, affine parameters not trained."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def warm_lr(base, it, iters, warmup_iters):
    """Poly decay times a linear warm-up factor (pytorch_warmup.LinearWarmup, as upstream)."""
    return rt.poly_lr(base, it, iters) * min(1.0, (it + 1) / max(1, warmup_iters))


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)
    uda = args.warmup == "uda_warmup"

    # ---- model -----------------------------------------------------------------------------------
    model, mcfg = make_model(args.model, args.backbone, args.num_classes, args.init, args.init_format,
                             args.output_stride)
    model = model.to(device, memory_format=rt.memory_format(amp)).train()
    if args.freeze_bn:
        set_bn_eval(model)
    disc = FCDiscriminator(args.num_classes).to(device).train() if uda else None

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    # upstream ExtResize (bilinear, ext_transforms.py:404-427) + ExtColorJitter + ExtRandomHorizontalFlip
    aug = Compose([Resize(args.crop_size, interp="bilinear"), ColorJitter(0.5, 0.5, 0.5, 0.0), RandomHFlip()])
    source = train_set(src, src_root, args.num_classes, mcfg["norm"], aug)
    target = train_set(tgt, tgt_root, args.num_classes, mcfg["norm"], aug, with_labels=False) if uda else None
    val = eval_set_at(tgt, tgt_root, args.num_classes, mcfg["norm"], args.crop_size)  # upstream: 1024x2048

    # ---- optimiser, resume -----------------------------------------------------------------------
    optimizer = rt.sgd_10x(model, args.lr, args.momentum, args.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr_d, betas=(0.9, 0.99)) if uda else None
    scaler = rt.grad_scaler(device, amp)
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        if uda:
            disc.load_state_dict(ck["disc"])
            opt_d.load_state_dict(ck["opt_d"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        log.log({"event": "resumed", "iter": start})
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    ddp_d = rt.wrap_ddp(disc, device, world) if uda else None
    batches = infinite_loader(source, args.batch_size, args.seed, start, args.workers, rank, world)
    t_batches = infinite_loader(target, args.batch_size, args.seed + 1, start, args.workers, rank, world) if uda else None

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    dom_accs = []  # (iter, discriminator accuracy) of this process's run (UDA warm-up only)
    for it in range(start, args.stop_iter):
        lr = rt.set_lr(optimizer, warm_lr(args.lr, it, args.iters, args.warmup_iters))
        batch = next(batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        # -- method: source CE (+ output-space adversarial alignment, AdaptSegNet, for uda_warmup) --
        rec = {}
        with rt.autocast(device, amp):
            pred = F.interpolate(ddp(x)["out"], size=y.shape[-2:], mode="bilinear", align_corners=True)
            loss_seg = cross_entropy(pred, y)
        loss = loss_seg
        if uda:
            for g in opt_d.param_groups:
                g["lr"] = warm_lr(args.lr_d, it, args.iters, args.warmup_iters)
            xt = rt.to_device(next(t_batches)["image"], device, amp)
            for p in disc.parameters():
                p.requires_grad_(False)
            with rt.autocast(device, amp):
                pred_t = F.interpolate(ddp(xt)["out"], size=xt.shape[-2:], mode="bilinear", align_corners=True)
                d_t = ddp_d(F.softmax(pred_t.float(), 1))
            loss_adv = F.binary_cross_entropy_with_logits(d_t.float(), torch.zeros_like(d_t.float()))  # fool D
            loss = loss_seg + args.lambda_adv * loss_adv
            rec["loss_adv"] = loss_adv.item()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if uda:
            for p in disc.parameters():
                p.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            with rt.autocast(device, amp):
                d_s = ddp_d(F.softmax(pred.detach().float(), 1)).float()
                d_t = ddp_d(F.softmax(pred_t.detach().float(), 1)).float()
            loss_d = 0.5 * (F.binary_cross_entropy_with_logits(d_s, torch.zeros_like(d_s))
                            + F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t)))
            loss_d.backward()
            opt_d.step()
            rec["loss_d"] = loss_d.item()
            # diagnostic: D's accuracy on this step's patches (logit > 0 = target); 50% = domains inseparable
            rec["dom_acc"] = 0.5 * ((d_s <= 0).float().mean() + (d_t > 0).float().mean()).item()
            dom_accs.append((it, rec["dom_acc"]))
        # -- end of method --
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": lr, "loss": loss.item(), "loss_seg": loss_seg.item(), **rec,
                     "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
        if (it + 1) % args.eval_every == 0 or last:
            res = evaluate(model, val, args.num_classes, device, amp, rank=rank, world_size=world,
                           workers=args.workers, save_dir=out / "predictions" if last else None)
            if args.freeze_bn:
                set_bn_eval(model)
            if res["mIoU"] > best["mIoU"]:
                best = {"mIoU": res["mIoU"], "iter": it + 1}
            log.log({"iter": it + 1, "val_mIoU": res["mIoU"], "best_mIoU": best["mIoU"]})
        if (it + 1) % args.save_every == 0 or last:
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rt.rng_state())
            else:
                rngs = [rt.rng_state()]
            if rank == 0:
                extra = dict(disc=disc.state_dict(), opt_d=opt_d.state_dict()) if uda else {}
                rt.save_checkpoint(out / "checkpoint.pth", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict(), iter=it + 1, rng=rngs, best=best, config=mcfg,
                                   **extra)

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter)
        final = {"last": res, "best": best, "iters": args.stop_iter, "warmup": args.warmup,
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt,
                 "diagnostics": {"dom_acc_last_quarter": rt.last_quarter(dom_accs, args.stop_iter)}}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
