r"""The MDAN baseline (Zhao et al., "Adversarial multiple source domain adaptation", NeurIPS 2018) for
segmentation, as MADAN compares against it (upstream scripts/train_fcn_mdan.py, cycada/models/MDAN.py):
one segmenter on all (untranslated) sources; per source j a domain classifier D_j (source j vs target)
sits behind a gradient reversal on the segmenter's last features, and the per-source losses are
aggregated by a soft-max over sources, so the worst source dominates.

    L_j = CE(F(x_j), y_j) + mu * [ CE(D_j(R(f(x_j))), 1) + CE(D_j(R(f(x_T))), 0) ]     (R: gradient reversal)
    L   = (1/gamma) log sum_j exp(gamma L_j)            ("dynamic"; gamma 10, mu 1e-2)
    L   = max_j CE_j + mu min_j domain_j               ("maxmin")

Toy (no arguments; fine-tunes the "sources combined" segmenter runs/madan/combined/model.pth):
    python madan/train_mdan.py
From scratch instead:
    python madan/train_mdan.py --init-from none --init scratch --iters 120 --out runs/madan/mdan_scratch
SYNTHIA + GTA5 -> Cityscapes, FCN8s-VGG16 (upstream: Adam 1e-4, batch 1, grad-norm clip 10):
    python madan/train_mdan.py --source synthia,gta5 --source-root /data/RAND_CITYSCAPES,/data/GTA5 \
        --target cityscapes --target-root /data/cityscapes --init /weights/vgg16-397923af.pth
Several processes (gradients all-reduced by hand: the segmenter runs once per domain per step):
    torchrun --nproc_per_node=2 madan/train_mdan.py
"""
import argparse
import sys
import time
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch

from common import cli, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set, eval_set, DOMAINS
from common.evaluate import evaluate
from common.fcn import make_segmenter
from common.metrics import format_table
from common.transforms import Compose, Resize
from madan import losses as Lm
from madan.models import DomainClassifier, FeatureHook
from madan.releases import FORMAT_HELP, FORMATS, load_segmenter
from madan.util import SOURCES_HELP, average_gradients, fill_defaults, sources_of

# Defaults. PAPER: upstream train_fcn_mdan.py (FCN8s-VGG16, Adam 1e-4 on segmenter and heads, batch 1 per
# domain, gamma 10, mu 1e-2, "dynamic", clip 10, 100k iterations). TOY: fine-tune the toy "sources
# combined" DeepLabV2-ResNet18 for 60 iterations, batch 2 per domain.
PAPER = dict(model="fcn8s", backbone="vgg16", init=None, iters=100000, batch_size=1, lr=1e-4, eval_every=5000,
             save_every=5000, init_from=None, out="runs/madan/mdan")
TOY = dict(model="deeplabv2", backbone="resnet18", init="toy", iters=60, batch_size=2, lr=1e-4,
           eval_every=60, save_every=60, init_from="runs/madan/combined/model.pth", out="runs/madan/mdan")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p, source="toy_synthia,toy_gta5")
    for a in p._actions:
        if a.dest == "model":
            a.choices = ["fcn8s", "deeplabv2", "deeplabv3plus"]
        if a.dest == "backbone":
            a.choices = ["vgg16", "resnet18", "resnet34", "resnet50", "resnet101"]
        if a.dest == "source":
            a.help = SOURCES_HELP
    g = p.add_argument_group("method (MDAN)")
    g.add_argument("--init-from", default=None, help="start from this segmenter checkpoint ('none': build from "
                   "--model/--init)")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--mode", default="dynamic", choices=["dynamic", "maxmin"], help="aggregation over sources")
    g.add_argument("--gamma", type=float, default=10.0, help="soft-max temperature of 'dynamic'")
    g.add_argument("--mu", type=float, default=1e-2, help="weight of the domain losses")
    g.add_argument("--grl-lambda", type=float, default=1.0, help="gradient reversal scale")
    g.add_argument("--clip", type=float, default=10.0, help="gradient-norm clip (segmenter, heads)")
    args = p.parse_args(argv)
    fill_defaults(args, TOY, PAPER)
    if args.init_from in ("none", "None", ""):
        args.init_from = None
    if args.init_from is None and args.init is None:
        p.error("--init (ImageNet weights file) or --init-from (a segmenter checkpoint) is required on real data")
    return args


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)

    # ---- model -----------------------------------------------------------------------------------
    if args.init_from:
        model, mcfg, fmt = load_segmenter(args.init_from, args.checkpoint_format)  # strict; official releases too
        log.log({"event": "init", "init_from": args.init_from, "checkpoint_format": fmt, "config": mcfg})
    else:
        model, mcfg = make_segmenter(args.model, args.backbone, args.num_classes, args.init, args.init_format,
                                     multi_level=False)
    if args.num_classes != mcfg["num_classes"]:
        raise SystemExit(f"{args.init_from} has {mcfg['num_classes']} classes, this run {args.num_classes}")
    model = model.to(device, memory_format=rt.memory_format(amp)).train()
    hook = FeatureHook(model)

    # ---- data ------------------------------------------------------------------------------------
    sources = sources_of(args)
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    sets = [train_set(name, root, args.num_classes, mcfg["norm"], Compose([Resize(args.crop_size or DOMAINS[name][3])]))
            for name, kind, root in sources]
    target = train_set(tgt, tgt_root, args.num_classes, mcfg["norm"], Compose([Resize(args.crop_size or DOMAINS[tgt][3])]),
                       with_labels=False)
    val = eval_set(tgt, tgt_root, args.num_classes, mcfg["norm"])
    heads = torch.nn.ModuleList(DomainClassifier(hook.channels()) for _ in sources).to(device).train()

    # ---- optimiser, resume -----------------------------------------------------------------------
    optimizer = torch.optim.Adam(chain(model.parameters(), heads.parameters()), lr=args.lr)
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        heads.load_state_dict(ck["heads"])
        optimizer.load_state_dict(ck["optimizer"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        log.log({"event": "resumed", "iter": start})
    batches = [infinite_loader(s, args.batch_size, args.seed + 1000 * k, start, args.workers, rank, world)
               for k, s in enumerate(sets)]
    tgt_batches = infinite_loader(target, args.batch_size, args.seed + 999, start, args.workers, rank, world)

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    dom_accs = []  # (iter, domain classifiers' accuracy averaged over the sources) of this process's run
    for it in range(start, args.stop_iter):
        src = [next(b) for b in batches]
        xt = rt.to_device(next(tgt_batches)["image"], device, amp)
        # -- method: per-source task + reversed-gradient domain losses, soft-max aggregated --
        with rt.autocast(device, amp):
            _, feat_t = hook(model, xt)
            tasks, doms, accs = [], [], []
            for j, b in enumerate(src):
                score_j, feat_j = hook(model, rt.to_device(b["image"], device, amp))
                tasks.append(Lm.seg_ce(score_j, b["label"].to(device)))
                d_s = heads[j](feat_j, args.grl_lambda)[..., None, None]
                d_t = heads[j](feat_t, args.grl_lambda)[..., None, None]
                doms.append(Lm.domain_ce(d_s, 1) + Lm.domain_ce(d_t, 0))
                accs.append(Lm.domain_accuracy(d_s.detach(), d_t.detach()))  # diagnostic only
            loss = Lm.mdan_loss(tasks, doms, args.mu, args.gamma, args.mode)
        # -- end of method --
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients([model, heads], world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        torch.nn.utils.clip_grad_norm_(heads.parameters(), args.clip)
        optimizer.step()
        dom_accs.append((it, sum(accs) / len(accs)))
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": args.lr, "loss": loss.item(), **{f"task_{s[0]}": t.item() for s, t in zip(sources, tasks)},
                     **{f"dom_{s[0]}": d.item() for s, d in zip(sources, doms)},
                     **{f"dom_acc_{s[0]}": a for s, a in zip(sources, accs)},
                     "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
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
                rt.save_checkpoint(out / "checkpoint.pth", model=model.state_dict(), heads=heads.state_dict(),
                                   optimizer=optimizer.state_dict(), iter=it + 1, rng=rngs, best=best, config=mcfg)
                if args.keep_snapshots:
                    (out / "snapshots").mkdir(exist_ok=True)
                    rt.save_checkpoint(out / "snapshots" / f"iter_{it + 1:06d}.pth", model=model.state_dict(),
                                       config=mcfg, iter=it + 1)

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter)
        final = {"last": res, "best": best, "iters": args.stop_iter,
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt,
                 "diagnostics": {"dom_acc_last_quarter": rt.last_quarter(dom_accs, args.stop_iter)}}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
