r"""MADAN's dynamic adversarial image generation (Sec. 3.2-3.3; upstream
cyclegan/models/multi_cycle_gan_semantic_model.py): a CycleGAN per source (G_i: source i -> target,
F_i: target -> source i) with one target discriminator D_T shared by all sources, one D_i per source,
LSGAN losses, cycle consistency, and MADAN's three additions:
  DSC  Dynamic Semantic Consistency: the frozen source classifier F_i (train_classifiers.py) must give
       the same prediction on x_i and on G_i(x_i) (KL).
  SAD  Sub-domain Aggregation Discriminator D_3: the other sources' adapted images should look like the
       anchor source's adapted images (after --sad-frozen-epoch).
  CCD  Cross-domain Cycle Discriminator D_ij: source j's adapted image mapped back by source i's
       inverse generator, F_i(G_j(x_j)), should look like a real source-i image (after --ccd-frozen-epoch).

    L_G = sum_i [ 2 LSGAN(D_T(G_i(x_i)), 1) + LSGAN(D_i(F_i(x_T)), 1)
                  + lambda_A |F_i(G_i(x_i)) - x_i|_1 + lambda_B |G_i(F_i(x_T)) - x_T|_1
                  + w_dsc KL(C_i(x_i) || C_i(G_i(x_i))) ]                        (Eq. 1-3)
          + sum_{i != anchor} LSGAN(D_3(G_i(x_i)), 1)                            (SAD, Eq. 5)
          + w_ccd sum_{i != j} LSGAN(D_ij(F_i(G_j(x_j))), 1)                      (CCD, Eq. 6)
    every discriminator: 0.5 (LSGAN(D(real), 1) + LSGAN(D(fake from a 50-image pool), 0))
    w_dsc = dynamic_weight x general_semantic_weight (10 x 20 in the official multi-source script)

Toy domains (no arguments; needs runs/madan/classifiers from train_classifiers.py for DSC):
    python madan/train_translation.py
SYNTHIA + GTA5 -> Cityscapes (upstream scripts/CycleGAN/cyclegan_gta_synthia2cityscapes.sh):
    python madan/train_translation.py --source synthia,gta5 --source-root /data/RAND_CITYSCAPES,/data/GTA5 \
        --target cityscapes --target-root /data/cityscapes \
        --classifiers runs/madan/classifiers/synthia/model.pth,runs/madan/classifiers/gta5/model.pth
A second "dynamic" round (classifiers retrained on the translated sources, generators continued):
    python madan/train_translation.py --init-from runs/madan/translation/model.pth \
        --classifiers runs/madan/classifiers_r2/toy_synthia/model.pth,runs/madan/classifiers_r2/toy_gta5/model.pth \
        --out runs/madan/translation_r2
Several processes (gradients all-reduced by hand: the generators run several times per step):
    torchrun --nproc_per_node=2 madan/train_translation.py
"""
import argparse
import sys
import time
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch

from common import cli, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set, DOMAINS
from common.fcn import segmenter_from_checkpoint
from common.transforms import Compose, RandomCrop, RandomHFlip, Resize
from madan import losses as Lm
from madan.models import ImagePool, PatchDiscriminator, ResnetGenerator
from madan.util import (SOURCES_HELP, ResizeShort, average_gradients, fill_defaults, gan_to_norm, gan_to_uint8,
                        norm_to_gan, save_grid, sources_of, split_list)

# Defaults. PAPER: the official multi-source script (batch 4, short side 500 + random crop 400x400, ResNet-9-block
# ngf 64, PatchGAN ndf 64, Adam 2e-4 (0.5, 0.999), DSC weight 10 x 20, SAD after epoch 5, CCD weight 0.2
# after epoch 10, 40 epochs (--max_epoch 40) with CycleGAN's niter 100 / niter_decay 100: the lr stays constant).
# TOY: a CPU-sized CycleGAN (ngf 8, 3 blocks, ndf 16, batch 1 at 64x128, 4 "epochs" of 100 iterations; SAD after
# 1, CCD after 2: the paper's order, scaled). 400 iterations is far from converged: on v2 (README) 160 and 400 were
# worse than 800, the preset until issue 17's 40-minute benchmark budget cut it to 400.
PAPER = dict(batch_size=4, lr=2e-4, ngf=64, ndf=64, n_blocks=9, load_size=500, fine_size=(400, 400),
             max_epoch=40, niter=100, niter_decay=100, epoch_iters=None, sad_frozen_epoch=5, ccd_frozen_epoch=10,
             save_every=2000, classifiers=None, out="runs/madan/translation")
TOY = dict(batch_size=1, lr=2e-4, ngf=8, ndf=16, n_blocks=3, load_size=None, fine_size=(64, 128),
           max_epoch=4, niter=2, niter_decay=2, epoch_iters=100, sad_frozen_epoch=1, ccd_frozen_epoch=2,
           save_every=100, classifiers="runs/madan/classifiers/toy_synthia/model.pth,"
           "runs/madan/classifiers/toy_gta5/model.pth", out="runs/madan/translation")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p, source="toy_synthia,toy_gta5")
    for a in p._actions:
        if a.dest == "source":
            a.help = SOURCES_HELP
    g = p.add_argument_group("method (multi-source CycleGAN + DSC, SAD, CCD)")
    g.add_argument("--ngf", type=int, default=None, help="generator width (upstream --ngf 64)")
    g.add_argument("--ndf", type=int, default=None, help="discriminator width (upstream --ndf 64)")
    g.add_argument("--n-blocks", type=int, default=None, help="ResNet blocks in G (upstream resnet_9blocks)")
    g.add_argument("--n-layers-d", type=int, default=3, help="PatchGAN depth (upstream --n_layers_D)")
    g.add_argument("--no-dropout", action="store_true", help="no dropout in G's blocks (upstream --no_dropout; "
                   "the official script keeps dropout)")
    g.add_argument("--load-size", type=int, default=None, help="resize the SHORT side to this, keeping the aspect "
                   "ratio (upstream --loadSize with scale_width_and_crop = transforms.Resize(int)); toy: resize "
                   "to --fine-size")
    g.add_argument("--fine-size", type=cli.hw, default=None, help="then random-crop H,W (upstream --fineSize)")
    g.add_argument("--no-flip", type=int, default=1, choices=[0, 1], help="no random flip (upstream --no_flip, "
                   "passed by the official script)")
    g.add_argument("--lambda-A", type=float, default=1.0, help="weight of the source cycle loss")
    g.add_argument("--lambda-B", type=float, default=1.0, help="weight of the target cycle loss")
    g.add_argument("--lambda-identity", type=float, default=0.0, help="identity loss weight (x lambda_A/B)")
    g.add_argument("--pool-size", type=int, default=50, help="image pool of generated images per D")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    g.add_argument("--max-epoch", type=int, default=None, help="stop after this many epochs (upstream --max_epoch, "
                   "which upstream never honoured)")
    g.add_argument("--niter", type=int, default=None, help="epochs at the initial lr")
    g.add_argument("--niter-decay", type=int, default=None, help="epochs of linear lr decay to zero")
    g.add_argument("--epoch-iters", type=int, default=None, help="iterations per epoch (default: largest "
                   "source / batch)")
    g.add_argument("--shared-dt", type=int, default=1, choices=[0, 1], help="one target discriminator for all "
                   "sources (upstream --Shared_DT, default on)")
    g.add_argument("--dsc", type=int, default=1, choices=[0, 1], help="Dynamic Semantic Consistency "
                   "(upstream --DSC/--semantic_loss)")
    g.add_argument("--classifiers", default=None, help="comma-separated segmenter checkpoints, one per source "
                   "(upstream --weights_syn, --weights_gta), for DSC")
    g.add_argument("--dynamic-weight", type=float, default=10.0, help="DSC KL weight (upstream --dynamic_weight)")
    g.add_argument("--general-semantic-weight", type=float, default=20.0, help="second DSC factor (upstream "
                   "--general_semantic_weight; the official script passes 20)")
    g.add_argument("--sad", type=int, default=1, choices=[0, 1], help="Sub-domain Aggregation Discriminator")
    g.add_argument("--sad-frozen-epoch", type=int, default=None, help="SAD's generator term after this epoch")
    g.add_argument("--sad-anchor", type=int, default=-1, help="index of the source whose adapted images D_3 "
                   "calls real (upstream: GTA5, the second source)")
    g.add_argument("--ccd", type=int, default=1, choices=[0, 1], help="Cross-domain Cycle Discriminator")
    g.add_argument("--ccd-weight", type=float, default=0.2, help="weight of the CCD generator terms (upstream "
                   "--CCD_weight; the code read an undefined D1D2_weight)")
    g.add_argument("--ccd-frozen-epoch", type=int, default=None, help="CCD's generator terms after this epoch")
    g.add_argument("--hf-ccd", action="store_true", help="'half-frozen' CCD: an extra step on G_i only "
                   "(upstream --HF_CCD)")
    g.add_argument("--init-from", default=None, help="continue from this translation model.pth (next round)")
    args = p.parse_args(argv)
    fill_defaults(args, TOY, PAPER)
    n = len(split_list(args.source))
    if n < 2 and (args.sad or args.ccd):
        p.error("SAD and CCD need at least two sources (or pass --sad 0 --ccd 0)")
    if args.dsc and len(split_list(args.classifiers)) != n:
        p.error(f"--dsc needs --classifiers with one checkpoint per source ({n}), from train_classifiers.py")
    return args


def translation_aug(args):
    """Training transform: short side --load-size then a random --fine-size crop (never padded: the short
    side is >= the crop), optional flip; toy: resize to --fine-size."""
    aug = [ResizeShort(args.load_size), RandomCrop(args.fine_size)] if args.load_size else [Resize(args.fine_size)]
    if args.load_size and min(args.fine_size) > args.load_size:
        raise SystemExit(f"--fine-size {args.fine_size} is larger than --load-size {args.load_size}: "
                         "the crop would be padded")
    return Compose(aug + ([] if args.no_flip else [RandomHFlip()]))


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)

    # ---- data ------------------------------------------------------------------------------------
    sources = sources_of(args)
    n = len(sources)
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    aug = translation_aug(args)
    sets = [train_set(name, root, 19 if kind != "crosscity" else 13, "imagenet", aug, with_labels=False)
            for name, kind, root in sources]
    target = train_set(tgt, tgt_root, 19 if tgt_kind != "crosscity" else 13, "imagenet", aug,
                       with_labels=False)
    epoch_iters = args.epoch_iters or max(len(s) for s in sets + [target]) // (args.batch_size * world)
    total = args.max_epoch * epoch_iters
    stop = cli.clamp_stop(args, total, "--max-epoch x epoch iterations").stop_iter or total

    # ---- model -----------------------------------------------------------------------------------
    gcfg = {"sources": [s[0] for s in sources], "target": tgt, "ngf": args.ngf, "n_blocks": args.n_blocks,
            "dropout": not args.no_dropout, "fine_size": list(args.fine_size), "load_size": args.load_size}
    G = torch.nn.ModuleDict({f"G_{i}": ResnetGenerator(args.ngf, args.n_blocks, not args.no_dropout) for i in range(n)})
    F_ = torch.nn.ModuleDict({f"F_{i}": ResnetGenerator(args.ngf, args.n_blocks, not args.no_dropout) for i in range(n)})
    D = torch.nn.ModuleDict({f"D_{i}": PatchDiscriminator(args.ndf, args.n_layers_d) for i in range(n)})
    for i in range(n if not args.shared_dt else 1):
        D[f"D_T{'' if args.shared_dt else i}"] = PatchDiscriminator(args.ndf, args.n_layers_d)
    anchor = args.sad_anchor % n
    if args.sad:
        D["D_3"] = PatchDiscriminator(args.ndf, args.n_layers_d)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]  # CCD: D_ij on F_i(G_j(x_j)) vs x_i
    if args.ccd or args.hf_ccd:
        for i, j in pairs:
            D[f"D_{i}{j}"] = PatchDiscriminator(args.ndf, args.n_layers_d)
    if args.init_from:
        prev = rt.load_checkpoint(args.init_from)
        G.load_state_dict(prev["G"])
        F_.load_state_dict(prev["F"])
        if "D" in prev:
            D.load_state_dict(prev["D"])
    for m in (G, F_, D):
        m.to(device).train()
    classifiers = []
    if args.dsc:
        for path in split_list(args.classifiers):
            c, ccfg = segmenter_from_checkpoint(path)
            c = c.to(device).eval()  # frozen, eval mode (upstream left them in train mode)
            for q in c.parameters():
                q.requires_grad_(False)
            classifiers.append((c, ccfg["norm"]))
    D_T = (lambda i: D["D_T"]) if args.shared_dt else (lambda i: D[f"D_T{i}"])

    # ---- optimiser, resume -----------------------------------------------------------------------
    opt_G = torch.optim.Adam(chain(G.parameters(), F_.parameters()), lr=args.lr, betas=(args.beta1, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    pools = {k: ImagePool(args.pool_size, seed=args.seed * 7919 + h) for h, k in enumerate(
        [f"B{i}" for i in range(n)] + [f"A{i}" for i in range(n)] + [f"SAD{i}" for i in range(n)]
        + [f"CCD{i}{j}" for i, j in pairs])}
    start = 0
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        G.load_state_dict(ck["G"])
        F_.load_state_dict(ck["F"])
        D.load_state_dict(ck["D"])
        opt_G.load_state_dict(ck["opt_G"])
        opt_D.load_state_dict(ck["opt_D"])
        for k, sd in ck["pools"].items():
            pools[k].load_state_dict(sd)
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start = ck["iter"]
        log.log({"event": "resumed", "iter": start})
    src_batches = [infinite_loader(s, args.batch_size, args.seed + 1000 * k, start, args.workers, rank, world)
                   for k, s in enumerate(sets)]
    tgt_batches = infinite_loader(target, args.batch_size, args.seed + 999, start, args.workers, rank, world)

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, stop):
        epoch = it // epoch_iters  # 0-based; upstream counts epochs from 1 and tests `epoch > threshold`
        lr = args.lr * Lm.linear_decay(epoch, args.niter, args.niter_decay)
        rt.set_lr(opt_G, lr)
        rt.set_lr(opt_D, lr)
        real_A = [norm_to_gan(next(b)["image"].to(device), "imagenet") for b in src_batches]
        real_B = norm_to_gan(next(tgt_batches)["image"].to(device), "imagenet")
        # -- method: multi-source CycleGAN with DSC, SAD and CCD --
        sad_on = args.sad and epoch + 1 > args.sad_frozen_epoch
        ccd_on = args.ccd and epoch + 1 > args.ccd_frozen_epoch
        with rt.autocast(device, amp):
            fake_B = [G[f"G_{i}"](real_A[i]) for i in range(n)]          # source i -> target style
            rec_A = [F_[f"F_{i}"](fake_B[i]) for i in range(n)]
            fake_A = [F_[f"F_{i}"](real_B) for i in range(n)]            # target -> source i style
            rec_B = [G[f"G_{i}"](fake_A[i]) for i in range(n)]
            fake_A_ij = {(i, j): F_[f"F_{i}"](fake_B[j]) for i, j in pairs} if (args.ccd or args.hf_ccd) else {}
        # generators: D frozen
        D.requires_grad_(False)
        terms = {}
        with rt.autocast(device, amp):
            for i in range(n):
                terms[f"G_A{i}"] = 2 * Lm.lsgan(D_T(i)(fake_B[i]), True)
                terms[f"G_B{i}"] = Lm.lsgan(D[f"D_{i}"](fake_A[i]), True)
                terms[f"cyc_A{i}"] = args.lambda_A * Lm.cycle(rec_A[i], real_A[i])
                terms[f"cyc_B{i}"] = args.lambda_B * Lm.cycle(rec_B[i], real_B)
                if args.lambda_identity > 0:
                    terms[f"idt_A{i}"] = args.lambda_B * args.lambda_identity * Lm.cycle(G[f"G_{i}"](real_B), real_B)
                    terms[f"idt_B{i}"] = args.lambda_A * args.lambda_identity * Lm.cycle(F_[f"F_{i}"](real_A[i]),
                                                                                        real_A[i])
                if args.dsc:  # Eq. 3: the classifier sees its own input normalisation
                    clf, cnorm = classifiers[i]
                    with torch.no_grad():
                        p_real = clf(gan_to_norm(real_A[i], cnorm))["out"]
                    p_fake = clf(gan_to_norm(fake_B[i], cnorm))["out"]
                    terms[f"dsc{i}"] = args.dynamic_weight * args.general_semantic_weight * Lm.dsc(p_real, p_fake)
                if sad_on and i != anchor:
                    terms[f"sad{i}"] = Lm.sad_generator(D["D_3"], fake_B[i])
            if ccd_on and args.ccd:
                for i, j in pairs:
                    terms[f"ccd{i}{j}"] = args.ccd_weight * Lm.ccd_generator(D[f"D_{i}{j}"], fake_A_ij[(i, j)])
        loss_G = sum(terms.values())
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        average_gradients([G, F_], world)
        opt_G.step()
        if args.hf_ccd and epoch + 1 > args.ccd_frozen_epoch:  # extra CCD step on the G_i only
            F_.requires_grad_(False)
            with rt.autocast(device, amp):
                fb = [G[f"G_{i}"](real_A[i]) for i in range(n)]
                hf = args.ccd_weight * sum(Lm.ccd_generator(D[f"D_{i}{j}"], F_[f"F_{i}"](fb[j])) for i, j in pairs)
            opt_G.zero_grad(set_to_none=True)
            hf.backward()
            average_gradients([G], world)
            opt_G.step()
            F_.requires_grad_(True)
        # discriminators: 0.5 (real + pooled fake)
        D.requires_grad_(True)
        d_terms = {}
        with rt.autocast(device, amp):
            for i in range(n):
                d_terms[f"D_{i}"] = Lm.d_loss(D[f"D_{i}"], real_A[i], pools[f"A{i}"].query(fake_A[i]))
                d_terms[f"D_T{i}"] = Lm.d_loss(D_T(i), real_B, pools[f"B{i}"].query(fake_B[i]))
                if args.sad and i != anchor:
                    d_terms[f"D_3_{i}"] = Lm.sad_discriminator(D["D_3"], fake_B[anchor], pools[f"SAD{i}"].query(fake_B[i]))
            for i, j in (pairs if (args.ccd or args.hf_ccd) else []):
                d_terms[f"D_{i}{j}"] = Lm.ccd_discriminator(D[f"D_{i}{j}"], real_A[i],
                                                             pools[f"CCD{i}{j}"].query(fake_A_ij[(i, j)]))
        opt_D.zero_grad(set_to_none=True)
        sum(d_terms.values()).backward()
        average_gradients([D], world)
        opt_D.step()
        # -- end of method --
        if it % 10 == 0 or it + 1 == stop:
            log.log({"iter": it, "epoch": epoch + 1, "lr": lr, "loss_G": loss_G.item(),
                     **{k: round(v.item(), 4) for k, v in terms.items()},
                     **{k: round(v.item(), 4) for k, v in d_terms.items()},
                     "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- samples, checkpoint ----------------------------------------------------------------
        last = it + 1 == stop
        if ((it + 1) % args.save_every == 0 or last) and rank == 0:
            rows = [[gan_to_uint8(real_A[i][0]), gan_to_uint8(fake_B[i][0]), gan_to_uint8(rec_A[i][0]),
                     gan_to_uint8(real_B[0])] for i in range(n)]
            save_grid(rows, out / "samples" / f"iter_{it + 1:06d}.png",
                      titles=["source", "translated", "reconstructed", "target"])
        if (it + 1) % args.save_every == 0 or last:
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rt.rng_state())
            else:
                rngs = [rt.rng_state()]
            if rank == 0:
                rt.save_checkpoint(out / "checkpoint.pth", G=G.state_dict(), F=F_.state_dict(), D=D.state_dict(),
                                   opt_G=opt_G.state_dict(), opt_D=opt_D.state_dict(),
                                   pools={k: v.state_dict() for k, v in pools.items()}, iter=it + 1, rng=rngs,
                                   config=gcfg)

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", G=G.state_dict(), F=F_.state_dict(), D=D.state_dict(), config=gcfg,
                           iter=stop)
        final = {"iters": stop, "epochs": stop / epoch_iters, "epoch_iters": epoch_iters,
                 "last_losses": {k: v.item() for k, v in {**terms, **d_terms}.items()},
                 "wall_s": round(time.time() - t0, 1), "sources": gcfg["sources"], "target": tgt}
        rt.save_json(out / "final.json", final)
        print(f"[done] {stop} iterations ({stop / epoch_iters:.1f} epochs) -> {out}/model.pth; samples in {out}/samples")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
