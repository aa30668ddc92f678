r"""MADAN's feature-level adaptation (Sec. 3.4, "feature-level alignment"; upstream scripts/train_fcn_adda.py,
CyCADA's ADDA step): starting from the segmenter trained on the aggregated adapted sources, a 1x1-conv
domain classifier D on the segmenter's scores (or fc7 features) tells the adapted sources (1) from the
target (0); the segmenter is updated to make target predictions look like source ones, but only while D
is good enough: its accuracy over the last 100 steps above 60%. Weights are shared between the source
and target networks (upstream --weights_shared); the sources alternate (round robin).

    D pre-training (score discriminator, upstream --train_discrim_only then --weights_discrim): D steps
             only, until D's running accuracy passes 60%; then the loop below starts with that D.
    D step:  L_D = CE(D(s(x_k)), 1) + CE(D(s(x_T)), 0)                   (s: scores or features, detached)
    if mean acc(D, last 100) > 60%:
        G step:  lambda_g * CE(D(s(x_T)), 1)                             (target labelled "source")
        then:    CE(F(x_k), y_k)                                         (source supervision)

Toy (no arguments; needs runs/madan/segmenter (on translated sources) and runs/madan/translated):
    python madan/train_adda.py
Discriminator on features instead of scores:
    python madan/train_adda.py --discrim feat --out runs/madan/adda_feat
Real data (upstream scripts/ADDA/adda_cyclegta2cs_score.sh: SGD 2e-5, batch 8, lambda_g 0.1, 25k iterations,
images resized to 540x300 with random flip, starting from a discriminator pre-trained until it passes the 60% gate):
    python madan/train_adda.py --source gta5,synthia --source-root /data/cyclegta5,/data/cyclesynthia \
        --target cityscapes --target-root /data/cityscapes --init-from runs/madan/segmenter/model.pth
Several processes (gradients all-reduced by hand: the segmenter runs several times per step):
    torchrun --nproc_per_node=2 madan/train_adda.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch

from common import cli, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set, eval_set, DOMAINS
from common.evaluate import evaluate
from common.metrics import format_table
from common.transforms import Compose, RandomHFlip, Resize
from madan import losses as Lm
from madan.models import AddaDiscriminator, FeatureHook
from madan.releases import FORMAT_HELP, FORMATS, load_segmenter
from madan.util import SOURCES_HELP, average_gradients, fill_defaults, sources_of

# Defaults. PAPER: upstream adda_cyclegta2cs_score.sh (SGD lr 2e-5, momentum 0.9, wd 5e-4, batch 8, lambda_d 1,
# lambda_g 0.1, discriminator on scores pre-trained to the 60% gate, 25k iterations, --resize 300 = 300x540
# with random flip (cycada/data/data_loader.py:60-62, cycada/data/adda_datasets.py:58-60), stop after
# 3 x min(|source|, |target|) iterations without a G step (train_fcn_adda.py:425-430)).
# TOY: the toy segmenter was trained with SGD 1e-2, so a larger lr (1e-3) and a CPU-sized budget (batch 4,
# 200 iterations: with 60, D's running accuracy never passed the 60% gate, so no G step was ever taken; with 300
# about 40% of the steps were gated in on v2; 300 until issue 17's 40-minute benchmark budget cut it to 200).
PAPER = dict(iters=25000, batch_size=8, lr=2e-5, crop_size=(300, 540), random_mirror=1, pretrain_d=1,
             stall_stop=-1, eval_every=1000, save_every=1000, init_from=None, out="runs/madan/adda")
TOY = dict(iters=200, batch_size=4, lr=1e-3, random_mirror=0, pretrain_d=0, stall_stop=0, eval_every=200,
           save_every=100, source_root="runs/madan/translated/toy_synthia,runs/madan/translated/toy_gta5",
           init_from="runs/madan/segmenter/model.pth", out="runs/madan/adda")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p, source="toy_synthia,toy_gta5")
    for a in p._actions:
        if a.dest == "source":
            a.help = SOURCES_HELP + " (the translated ones: point --source-root at translate.py's output)"
    g = p.add_argument_group("method (ADDA on the aggregated adapted sources)")
    g.add_argument("--init-from", default=None, help="segmenter checkpoint to adapt (train_segmenter.py model.pth)")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--zero-skips", action="store_true", help="the released behaviour: reset the FCN8s skip layers "
                   "(score_pool3/4) to 0 after loading --init-from, as upstream's train_fcn_adda.py --weights_init "
                   "loads vgg.* and vgg_head.* only (off: every loaded weight is kept; README deviations)")
    g.add_argument("--discrim", default="score", choices=["score", "feat"], help="discriminator on the scores "
                   "(upstream --discrim_score) or on the last features (fc7 / layer4; --discrim_feat)")
    g.add_argument("--lambda-d", type=float, default=1.0, help="weight of the discriminator loss")
    g.add_argument("--lambda-g", type=float, default=0.1, help="weight of the adversarial (generator) loss")
    g.add_argument("--gate", type=float, default=60.0, help="G/CE steps only while D's running accuracy (%%) "
                   "is above this")
    g.add_argument("--gate-window", type=int, default=100, help="steps in D's running accuracy")
    g.add_argument("--random-mirror", type=int, default=None, choices=[0, 1], help="random horizontal flip of "
                   "source and target batches (upstream augment_collate flip=True whenever --resize is given)")
    g.add_argument("--pretrain-d", type=int, default=None, choices=[0, 1], help="first train D alone until its "
                   "running accuracy passes --gate (upstream --train_discrim_only, then --weights_discrim)")
    g.add_argument("--pretrain-d-iters", type=int, default=None, help="most D-only steps of the pre-training "
                   "(default --iters; upstream's run had no other bound)")
    g.add_argument("--init-disc", default=None, help="load a pre-trained discriminator state (upstream "
                   "--weights_discrim; e.g. OUT/discriminator_abv60.pth of an earlier run) instead of pre-training")
    g.add_argument("--stall-stop", type=int, default=None, help="stop after this many iterations without a G step "
                   "(-1: 3 x min(source images, target images) as upstream; 0: never)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    args = p.parse_args(argv)
    fill_defaults(args, TOY, PAPER)
    if args.init_from is None:
        p.error("--init-from (the segmenter trained on the adapted sources) is required")
    return args


def zero_skips(model):
    """Upstream's load of an FCN8s (VGG16_FCN8s(weights_init=FILE), cycada/models/fcn8s.py): only vgg.* and vgg_head.*
    are read, so score_pool3/4 keep their zero initialisation. Returns the names reset."""
    names = [n for n in ("score_pool3", "score_pool4") if isinstance(getattr(model, n, None), torch.nn.Conv2d)]
    if not names:
        raise SystemExit(f"--zero-skips needs an FCN8s segmenter (score_pool3/4); this one is {type(model).__name__}")
    with torch.no_grad():
        for n in names:
            getattr(model, n).weight.zero_()
            getattr(model, n).bias.zero_()
    return names


def adda_aug(args, name):
    """Transform of domain `name`: resize to --crop-size (paper: 300x540), else the domain's size; optional flip."""
    return Compose([Resize(args.crop_size or DOMAINS[name][3])] + ([RandomHFlip()] if args.random_mirror else []))


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)

    # ---- model -----------------------------------------------------------------------------------
    model, mcfg, fmt = load_segmenter(args.init_from, args.checkpoint_format)  # strict; official releases too
    log.log({"event": "init", "init_from": args.init_from, "checkpoint_format": fmt, "config": mcfg})
    if args.num_classes != mcfg["num_classes"]:
        raise SystemExit(f"{args.init_from} has {mcfg['num_classes']} classes, this run {args.num_classes}")
    if args.zero_skips:
        log.log({"event": "zero_skips", "reset": zero_skips(model)})
    model = model.to(device, memory_format=rt.memory_format(amp)).train()
    hook = FeatureHook(model)
    disc = AddaDiscriminator(mcfg["num_classes"] if args.discrim == "score" else hook.channels()).to(device).train()

    # ---- data ------------------------------------------------------------------------------------
    sources = sources_of(args)
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    sets = [train_set(name, root, args.num_classes, mcfg["norm"], adda_aug(args, name)) for name, kind, root in sources]
    target = train_set(tgt, tgt_root, args.num_classes, mcfg["norm"], adda_aug(args, tgt), with_labels=False)
    val = eval_set(tgt, tgt_root, args.num_classes, mcfg["norm"])

    # ---- optimiser, resume -----------------------------------------------------------------------
    opt_dis = torch.optim.SGD(disc.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    opt_rep = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    gate = Lm.AccuracyGate(args.gate, args.gate_window)
    start, best, g_updates = 0, {"mIoU": -1.0}, 0
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        disc.load_state_dict(ck["disc"])
        opt_dis.load_state_dict(ck["opt_dis"])
        opt_rep.load_state_dict(ck["opt_rep"])
        gate = Lm.AccuracyGate(args.gate, args.gate_window, ck["gate"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best, g_updates = ck["iter"], ck["best"], ck["g_updates"]
        log.log({"event": "resumed", "iter": start})
    n = len(sets)
    stall = 3 * min(sum(len(s) for s in sets), len(target)) if args.stall_stop == -1 else args.stall_stop

    def d_step(xs, xt):  # one discriminator step on detached scores/features (also the pre-training step)
        with torch.no_grad(), rt.autocast(device, amp):
            score_s, feat_s = hook(model, xs)
            score_t, feat_t = hook(model, xt)
        with rt.autocast(device, amp):
            d_s = disc(score_s if args.discrim == "score" else feat_s)
            d_t = disc(score_t if args.discrim == "score" else feat_t)
            loss_d = Lm.domain_ce_pair(d_s, d_t)
        opt_dis.zero_grad(set_to_none=True)
        (args.lambda_d * loss_d).backward()
        average_gradients([disc], world)
        opt_dis.step()
        return loss_d, Lm.domain_accuracy(d_s, d_t)

    if args.init_disc and start == 0:
        disc.load_state_dict(rt.load_checkpoint(args.init_disc)["disc"])
        log.log({"event": "discriminator loaded", "path": str(args.init_disc)})
    elif args.pretrain_d and start == 0:
        # -- method: D pre-training until the gate (upstream --train_discrim_only saves discriminator_abv60.pth
        # at the first step whose running accuracy is above 60%; its loop then never ends: we stop there) --
        pre = Lm.AccuracyGate(args.gate, args.gate_window)
        pre_s = [infinite_loader(s, args.batch_size, args.seed + 1000 * k + 500, 0, args.workers, rank, world)
                 for k, s in enumerate(sets)]
        pre_t = infinite_loader(target, args.batch_size, args.seed + 1499, 0, args.workers, rank, world)
        limit, j = args.pretrain_d_iters or args.iters, -1
        for j in range(limit):
            loss_d, acc = d_step(rt.to_device(next(pre_s[j % n])["image"], device, amp),
                                 rt.to_device(next(pre_t)["image"], device, amp))
            if pre.update(acc):
                break
        log.log({"event": "discriminator pre-trained", "steps": j + 1, "dom_acc": pre.mean(), "passed": pre.open()})
        if rank == 0:
            rt.save_checkpoint(out / "discriminator_abv60.pth", disc=disc.state_dict(), steps=j + 1, dom_acc=pre.mean())
        # the adaptation run starts with fresh optimiser and gate history (upstream: a new run, --weights_discrim)
        opt_dis = torch.optim.SGD(disc.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        # -- end of method --
    batches = [infinite_loader(s, args.batch_size, args.seed + 1000 * k, max(0, -(-(start - k) // n)), args.workers,
                               rank, world) for k, s in enumerate(sets)]
    tgt_batches = infinite_loader(target, args.batch_size, args.seed + 999, start, args.workers, rank, world)
    last_g = ck["last_g"] if start and "last_g" in ck else start - 1

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        k = it % n
        batch, tbatch = next(batches[k]), next(tgt_batches)
        xs, ys = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        xt = rt.to_device(tbatch["image"], device, amp)
        # -- method: ADDA -- D step on detached scores/features, then gated G and source-CE steps --
        loss_d, acc = d_step(xs, xt)
        gate.update(acc)
        rec = {}
        if gate.open():
            g_updates, last_g = g_updates + 1, it
            disc.requires_grad_(False)
            with rt.autocast(device, amp):
                score_t, feat_t = hook(model, xt)
                loss_g = Lm.domain_ce(disc(score_t if args.discrim == "score" else feat_t), 1)  # fool D
            opt_rep.zero_grad(set_to_none=True)
            (args.lambda_g * loss_g).backward()
            average_gradients([model], world)
            opt_rep.step()
            with rt.autocast(device, amp):
                loss_s = Lm.seg_ce(model(xs)["out"], ys)
            opt_rep.zero_grad(set_to_none=True)
            loss_s.backward()
            average_gradients([model], world)
            opt_rep.step()
            disc.requires_grad_(True)
            rec = {"loss_g": loss_g.item(), "loss_seg": loss_s.item()}
        # -- end of method --
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": args.lr, "loss_d": loss_d.item(), "dom_acc": gate.mean(), "g_updates": g_updates,
                     **rec, "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        stalled = stall > 0 and it + 1 - last_g >= stall  # upstream (:425): "No suitable discriminator found"
        last = it + 1 == args.stop_iter or stalled
        if (it + 1) % args.eval_every == 0 or last:
            res = evaluate(model, val, args.num_classes, device, amp, rank=rank, world_size=world,
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
                rt.save_checkpoint(out / "checkpoint.pth", model=model.state_dict(), disc=disc.state_dict(),
                                   opt_dis=opt_dis.state_dict(), opt_rep=opt_rep.state_dict(), gate=list(gate.acc),
                                   g_updates=g_updates, last_g=last_g, iter=it + 1, rng=rngs, best=best, config=mcfg)
                if args.keep_snapshots:
                    (out / "snapshots").mkdir(exist_ok=True)
                    rt.save_checkpoint(out / "snapshots" / f"iter_{it + 1:06d}.pth", model=model.state_dict(),
                                       config=mcfg, iter=it + 1)
        if stalled:
            log.log({"event": "stopped", "iter": it + 1, "reason": f"no G step in {stall} iterations"})
            break

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=it + 1)
        final = {"last": res, "best": best, "iters": it + 1, "g_updates": g_updates,
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt,
                 # D's running accuracy over the last --gate-window steps, as a fraction (50% = inseparable)
                 "diagnostics": {"dom_acc_last_window": round(gate.mean() / 100, 4) if gate.acc else None}}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}), "
              f"{g_updates} gated G steps -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
