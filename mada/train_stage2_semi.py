r"""MADAv2 step 2 (upstream step2_train_active_semi_sup.py): semi-supervised fine-tuning on the target
only, after AEL/U2PL. No source data. Teacher = the stage-1 model, frozen, in eval mode (--teacher-mode train:
upstream's train-mode forwards); student starts from it. Labelled = the active images (OHEM CE); unlabelled =
pairs of target images, the second drawn from a class-wise bank, mixed by class-aware CutMix; consistency =
confidence-weighted CE to the teacher on the labelled and on the mixed images; after a warm-up, the MADA anchor
loss (mada/core.py). MADAv2 Sec. 3.4 (formulas in mada/semi.py).

    L = OHEM-CE(active) + [L_cons(active, teacher) + L_cons(mixed, teacher)] + 0.1 L_anchor (it >= start)

Toy (no arguments: teacher/student = the stage-1 model, its target anchors):
    python mada/train_stage2_semi.py
The MADAv2 chain (dual-distance selection, its own stage 1):
    python mada/train_stage2_semi.py --init-from runs/mada/stage1_madav2/model.pth \
        --anchors runs/mada/anchors/target_stage1_madav2 --selection runs/mada/select_madav2 \
        --out runs/mada/stage2_semi_madav2
GTA5 -> Cityscapes (the source flags only name the run; no source image is read):
    python mada/train_stage2_semi.py --target cityscapes --target-root /data/cityscapes --source gta5 \
        --init-from runs/mada/stage1_madav2/model.pth --anchors runs/mada/anchors/target_stage1_madav2 \
        --selection runs/mada/select_madav2
Upstream's released behaviour where we deviate (deviations 2-6, 8, 21 of mada/README.md), all at once:
    python mada/train_stage2_semi.py --released
Several processes:
    torchrun --nproc_per_node=2 mada/train_stage2_semi.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np
import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set, DOMAINS
from common.evaluate import evaluate
from common.losses import ohem_cross_entropy
from common.metrics import format_table
from mada.releases import FORMAT_HELP, FORMATS, load_segmenter
from mada import core, semi

# Defaults (mada/README.md, recipe tables). PAPER: MADAv2 configs/active_from_gta_to_city_stage2.yml (SGD 1e-4,
# backbone 1x / heads 10x, momentum 0.9, wd 2e-4, poly over 900k, 200 epochs of the target loader (2975 // 4 = 743
# iterations, drop_last) = 148,600 iterations; anchor loss while epoch > 50 (adaptation_model_AEL.py:373), i.e.
# from iteration 51 x 743 = 37,893; entropy-filter percent 20 (1 - epoch / 200), per epoch; labelled batch 4;
# OHEM 0.7 / 100k; crop 512x896; active images read at 1052x1914). TOY: a short CPU run (epochs of 4 iterations).
PAPER = dict(iters=900000, stop_iter=148600, batch_size=4, lr=1e-4, anchor_start=37893, epoch_iters=743,
             ohem_min_kept=100000, crop_size=(512, 896), active_size=(1052, 1914),
             eval_size=(1024, 2048), eval_every=1000, save_every=1000,
             out="runs/mada/stage2_semi")
TOY = dict(iters=40, batch_size=4, lr=2.5e-3, anchor_start=10, epoch_iters=4, ohem_min_kept=2000, eval_every=40,
           save_every=20, out="runs/mada/stage2_semi")
# Where we deviate from the released code (mada/README.md, deviations 2-6, 8, 21), the released behaviour is a flag;
# --released turns all of them on at once (a value given explicitly wins). OURS = the defaults.
OURS = dict(entropy_filter="high", cons_norm="valid", released_sched_order=False, released_param_groups=False,
            released_class_conf=False, class_conf_init="zeros", teacher_mode="eval")
RELEASED = dict(entropy_filter="low", cons_norm="all", released_sched_order=True, released_param_groups=True,
                released_class_conf=True, class_conf_init="rand", teacher_mode="train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (MADAv2 step 2, semi-supervised)")
    g.add_argument("--init-from", default="runs/mada/stage1/model.pth", help="stage-1 model.pth (teacher and "
                   "student initialisation)")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--anchors", default="runs/mada/anchors/target_stage1",
                   help="target anchors of the stage-1 model (cluster_anchors.py), or "
                   "MADAv2's anchors/cluster_centroids_sub_10_target_stage1.pkl")
    g.add_argument("--selection", default="runs/mada/select_mada",
                   help="selected.json / selected.txt (or its folder) of select_active.py, or upstream's list "
                   "(selection_list/stage1_cac_list_0.05.txt: CITY/NAME lines)")
    g.add_argument("--ohem-thresh", type=float, default=0.7, help="OHEM probability threshold (labelled CE)")
    g.add_argument("--ohem-min-kept", type=int, default=None, help="OHEM: at least this many pixels per batch")
    g.add_argument("--lambda-cons", type=float, default=1.0, help="weight of the two consistency terms")
    g.add_argument("--gamma", type=float, default=2.0, help="consistency weight = teacher confidence ** gamma")
    g.add_argument("--conf-thresh", type=float, default=0.0, help="teacher confidence below which labelled-"
                   "image consistency pixels are ignored (upstream 0)")
    g.add_argument("--entropy-percent", type=float, default=20.0, help="percent of unlabelled teacher pixels "
                   "dropped in the first epoch, decaying per epoch as percent (1 - epoch / epochs) (U2PL "
                   "low_entropy_threshold)")
    g.add_argument("--epoch-iters", type=int, default=None, help="iterations per epoch of upstream's target loader "
                   "(2975 // 4 = 743): the unit of the entropy-filter decay")
    g.add_argument("--entropy-filter", default=None, choices=["high", "low"], help="high (default): drop the most "
                   "uncertain pixels (U2PL's intent); low: drop the most certain ones (upstream MADAv2, deviation 5)")
    g.add_argument("--cons-norm", default=None, choices=["valid", "all"], help="consistency weights normalised "
                   "over the non-ignored pixels (valid, default) or over every pixel, ignored ones included (all: "
                   "upstream, deviation 8)")
    g.add_argument("--class-momentum", type=float, default=0.999, help="momentum of the class confidence")
    g.add_argument("--released-class-conf", action="store_true", default=None, help="the stored class confidence "
                   "never changes; each iteration uses its one-step update (upstream loses the update in a local "
                   "variable, deviation 3); default: the update is kept")
    g.add_argument("--class-conf-init", default=None, choices=["zeros", "rand"], help="initial class confidence: "
                   "zeros (default) or U(0, 1) per class drawn from --seed (upstream torch.rand, deviation 4)")
    g.add_argument("--teacher-mode", default=None, choices=["eval", "train"], help="eval (default): the teacher "
                   "frozen for good; train: upstream's train-mode forwards of the labelled and the mixed images "
                   "(batch statistics, dropout, BN running statistics updated; deviation 6)")
    g.add_argument("--area-thresh", type=float, default=0.005, help="CutMix: smallest class region (fraction)")
    g.add_argument("--area-thresh2", type=float, default=0.01, help="bank: class share for an image to hold it")
    g.add_argument("--lambda-anchor", type=float, default=0.1, help="weight of the anchor loss (0.1)")
    g.add_argument("--anchor-start", type=int, default=None, help="iteration from which the anchor loss is on")
    g.add_argument("--anchor-momentum", type=float, default=0.999, help="momentum of the nearest-anchor update")
    g.add_argument("--absent", default="zero", choices=core.ABSENT_CHOICES,
                   help="zero: absent classes' zero rows enter distances/updates (upstream); mask: ablation")
    g.add_argument("--anchor-grad", default="pooling", choices=core.GRAD_CHOICES, help="gradient of V_c: "
                   "pooling = 2/(h w) per pixel (upstream NormalisationPoolingFunction); mean = 1/|M_c| (ablation)")
    g.add_argument("--active-size", type=cli.hw, default=None, help="H,W the active target images are resized to "
                   "before the augmentation (upstream img_rows x img_cols of the active set)")
    g.add_argument("--min-pixels", type=int, default=10, help="pixels a class needs in an objective vector")
    g.add_argument("--head-lr-mult", type=float, default=10.0, help="lr multiplier of ASPP/decoder/classifier")
    g.add_argument("--released-param-groups", action="store_true", default=None, help="optimise only the backbone "
                   "(1x) and the ASPP (--head-lr-mult x), as upstream, whose decoder line is commented out: low-level "
                   "projection, decoder and classifier never trained (deviation 2)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=2e-4)
    g.add_argument("--eval-size", type=cli.hw, default=None, help="H,W of the target evaluation input (paper preset: "
                   "Cityscapes' full 1024x2048, as upstream; toy: the shared protocol of common)")
    g.add_argument("--random-mirror", type=int, default=1, choices=[0, 1], help="random horizontal flip")
    g.add_argument("--released-sched-order", action="store_true", default=None, help="iteration i at poly(i + 1), "
                   "as upstream, which steps its PolynomialLR before the optimiser (deviation 21); default poly(i)")
    g.add_argument("--released", action="store_true", help="every released behaviour at once: " +
                   " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in RELEASED.items()))
    args = p.parse_args(argv)
    for k in OURS:  # unset: the released value with --released, else ours
        if getattr(args, k) is None:
            setattr(args, k, (RELEASED if args.released else OURS)[k])
    cli.fill_defaults(args, TOY, PAPER)
    cli.default_num_classes(args)
    return args


def gather(t):
    """all_gather of a tensor of the same shape on every rank -> list in rank order."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return parts


def released_param_groups_sgd(model, lr, momentum, weight_decay, head_mult=10.0):
    """Upstream MADAv2's optimiser (models/deeplab.py:66-89, DeepLab.optim_parameters; adaptation_model_AEL.py:81):
    the parameters of the Conv2d / BatchNorm2d modules of the backbone at lr and of the ASPP at 10 lr (its decoder
    line is commented out, :77). Our low_proj + decoder + classifier = upstream's decoder: frozen here (upstream
    computes their gradients and never applies them)."""
    def conv_bn(mod):
        return [p for m in mod.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))
                for p in m.parameters(recurse=False) if p.requires_grad]
    if not hasattr(model, "aspp"):
        raise SystemExit("--released-param-groups needs a DeepLabV3+ (backbone + ASPP) model")
    groups = [{"params": conv_bn(model.backbone), "lr": lr, "lr_mult": 1.0},
              {"params": conv_bn(model.aspp), "lr": head_mult * lr, "lr_mult": head_mult}]
    kept = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        if id(p) not in kept:
            p.requires_grad_(False)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def initial_class_conf(nc, how, seed):
    """r_c at the start: zeros (ours), or upstream's torch.rand (models/adaptation_model_AEL.py:134-137, deviation 4;
    its draw comes from torch's global generator after the networks' construction) from a generator seeded here."""
    if how == "rand":
        return torch.rand(nc, generator=torch.Generator().manual_seed(seed))
    return torch.zeros(nc)


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)

    # ---- model -----------------------------------------------------------------------------------
    model, mcfg, fmt = load_segmenter(args.init_from, args.checkpoint_format)  # strict; MADAv2's releases too
    log.log({"event": "init", "init_from": args.init_from, "checkpoint_format": fmt, "config": mcfg})
    model = model.to(device, memory_format=rt.memory_format(amp)).train()
    teacher = load_segmenter(args.init_from, args.checkpoint_format)[0]  # frozen (--teacher-mode eval) or upstream's train-mode
    teacher = teacher.to(device, memory_format=rt.memory_format(amp)).eval().requires_grad_(False)  # forwards
    nc = mcfg["num_classes"]

    # ---- data ------------------------------------------------------------------------------------
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    toy = cli.is_toy(args)
    act_aug = core.train_transform(toy, args.crop_size or DOMAINS[tgt][3], args.random_mirror, args.active_size)
    tgt_aug = core.train_transform(toy, args.crop_size or DOMAINS[tgt][3], args.random_mirror,
                                   core.UPSTREAM_HW.get(DOMAINS[tgt][0]))
    labeled = core.read_selection(args.selection)
    val = core.eval_set_at(tgt, tgt_root, nc, mcfg["norm"], args.eval_size)
    anchors = torch.from_numpy(core.load_anchors(args.anchors, nc)[0]).to(device)
    if anchors.shape[1] != nc:
        raise SystemExit(f"anchors {tuple(anchors.shape)} of {args.anchors} do not match {nc} classes")

    # ---- optimiser, resume -----------------------------------------------------------------------
    if args.released_param_groups:  # upstream's groups: backbone 1x + ASPP only (deviation 2)
        optimizer = released_param_groups_sgd(model, args.lr, args.momentum, args.weight_decay, args.head_lr_mult)
    else:
        optimizer = core.param_groups_sgd(model, args.lr, args.momentum, args.weight_decay, args.head_lr_mult)
    scaler = rt.grad_scaler(device, amp)
    target = train_set(tgt, tgt_root, nc, mcfg["norm"], tgt_aug, with_labels=False)
    bank = torch.zeros(nc, len(target), device=device)       # class-wise CutMix bank
    class_conf = initial_class_conf(nc, args.class_conf_init, args.seed).to(device)  # r_c
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        if ck["labeled"] != labeled:  # the labelled set is part of the run's state
            raise SystemExit(f"--selection {args.selection} differs from the labelled set stored in "
                             f"{out / 'checkpoint.pth'} ({len(ck['labeled'])} images): resume with the same selection")
        model.load_state_dict(ck["model"])
        anchors.copy_(ck["anchors"])
        bank.copy_(ck["bank"])
        class_conf.copy_(ck["class_conf"])
        if "teacher" in ck:  # --teacher-mode train: its BN statistics drift and are part of the state
            teacher.load_state_dict(ck["teacher"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        log.log({"event": "resumed", "iter": start})
    active = core.subset_by_names(train_set(tgt, tgt_root, nc, mcfg["norm"], act_aug), labeled,
                                  f"selection {args.selection}")
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    a_batches = infinite_loader(active, args.batch_size, args.seed + 1, start, args.workers, rank, world)
    t_batches = infinite_loader(target, 1, args.seed + 2, start, args.workers, rank, world)

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        # upstream steps its scheduler before the optimiser: iteration i at poly(i + 1) (deviation 21, flag)
        lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it + 1 if args.released_sched_order else it, args.iters))
        a_batch, t_batch = next(a_batches), next(t_batches)
        xa, ya = rt.to_device(a_batch["image"], device, amp), a_batch["label"].to(device)
        rng = np.random.default_rng([args.seed, rank, it])  # this iteration's draws (exact resume)
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**31)))
        # -- method: OHEM CE(active) + confidence-weighted consistency (active, class-aware CutMix) + anchors --
        # unlabelled pair: a loader image + an image of the bank holding a sampled (rarely confident) class
        id2, cat = semi.sample_from_bank(bank, class_conf, rng)
        u2 = target[(id2, int(args.seed * 100003 + it))]["image"][None]
        xu = rt.to_device(torch.cat([t_batch["image"], u2]), device, amp)
        ids = [int(t_batch["index"][0]), id2]
        optimizer.zero_grad(set_to_none=True)
        h, w = ya.shape[-2:]
        with rt.autocast(device, amp):  # the student first, as upstream (whose train-mode teacher draws dropout next)
            s_sup = F.interpolate(ddp(xa)["out"], size=(h, w), mode="bilinear", align_corners=True)
        s_sup = s_sup.float()
        loss_sup = ohem_cross_entropy(s_sup, ya, args.ohem_thresh, args.ohem_min_kept)
        with torch.no_grad(), rt.autocast(device, amp):
            # --teacher-mode train (deviation 6): the labelled images in train mode (upstream sets it before the loop,
            # step2_train_active_semi_sup.py:85, and at the end of each step, adaptation_model_AEL.py:296), the pair in
            # eval (adaptation_model_AEL.py:254)
            t_sup = teacher.train(args.teacher_mode == "train")(xa)["out"]
            t_uns = teacher.eval()(xu)["out"]
        t_sup = F.interpolate(t_sup.float(), size=(h, w), mode="bilinear", align_corners=True)
        t_uns = F.interpolate(t_uns.float(), size=xu.shape[-2:], mode="bilinear", align_corners=True)
        pred_u = t_uns.argmax(1)
        box = semi.class_box(pred_u[1].cpu().numpy(), cat, args.area_thresh, rng)
        semi.update_bank(bank, pred_u, ids, args.area_thresh2)
        x_mix, t_mix = semi.cutmix_pair(xu, t_uns, semi.box_mask(box, *xu.shape[-2:], device))
        x_mix = x_mix.contiguous(memory_format=rt.memory_format(amp))
        if args.teacher_mode == "train":  # adaptation_model_AEL.py:296-298: the mixed images in train mode, output
            with torch.no_grad(), rt.autocast(device, amp):  # unused (U2PL features, deviation 7); it moves the BN
                teacher.train()(x_mix)                         # statistics and draws dropout masks
            if world > 1:  # one teacher on every rank (rank 0's statistics, as DDP does for the student's)
                for b in teacher.buffers():
                    torch.distributed.broadcast(b, 0)
        conf_sup, lab_sup = F.softmax(t_sup, 1).max(1)
        lab_sup = torch.where(conf_sup < args.conf_thresh, torch.full_like(lab_sup, 255), lab_sup)
        percent = semi.entropy_percent(args.entropy_percent, it, args.epoch_iters, args.stop_iter)  # per epoch
        lab_mix, conf_mix = semi.entropy_filter(t_mix, percent, args.entropy_filter)

        # class confidence r_c: momentum update from the student on the labelled images, used by this iteration's
        # consistency terms (upstream's order)
        cc = semi.category_confidence(s_sup.detach(), ya, nc)
        if world > 1:
            torch.distributed.all_reduce(cc)
            cc /= world
        r = class_conf * args.class_momentum + (1 - args.class_momentum) * cc
        if not args.released_class_conf:  # upstream assigns r to a local (adaptation_model_AEL.py:333-336): the
            class_conf.copy_(r)           # stored r never changes (deviation 3, --released-class-conf)
        loss_cons_sup = semi.weighted_consistency(s_sup, lab_sup, conf_sup, r, args.gamma, generator=gen,
                                                  norm=args.cons_norm)
        scaler.scale(loss_sup + args.lambda_cons * loss_cons_sup).backward()
        with rt.autocast(device, amp):
            s_mix = F.interpolate(ddp(x_mix)["out"], size=x_mix.shape[-2:], mode="bilinear", align_corners=True)
        loss_cons_uns = semi.weighted_consistency(s_mix.float(), lab_mix, conf_mix, r, args.gamma,
                                                  generator=gen, norm=args.cons_norm)
        scaler.scale(args.lambda_cons * loss_cons_uns).backward()
        loss_anchor = torch.zeros((), device=device)
        if it >= args.anchor_start:  # MADA anchor loss on the weak unlabelled images, after the warm-up epochs
            with rt.autocast(device, amp):
                pw = ddp(xu, return_feat=True)
            loss_anchor, vec, present, d = core.batch_anchor_loss(pw["feat"].float(), pw["out"].float(), anchors,
                                                                  nc, args.min_pixels, args.absent, args.anchor_grad)
            scaler.scale(args.lambda_anchor * loss_anchor).backward()
            if world > 1:  # every rank applies every rank's update, in rank order: anchors stay identical
                vec, present, d = (torch.cat(gather(t)) for t in (vec, present, d))
            core.update_nearest_anchor(anchors, vec, present, d, args.anchor_momentum, args.absent)
        if world > 1:  # keep the bank identical on every rank
            torch.distributed.all_reduce(bank, op=torch.distributed.ReduceOp.MAX)
        loss = (loss_sup + args.lambda_cons * (loss_cons_sup + loss_cons_uns) + args.lambda_anchor * loss_anchor).detach()
        # -- end of method --
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": lr, "loss": loss.item(), "loss_sup": loss_sup.item(),
                     "loss_cons_sup": loss_cons_sup.item(), "loss_cons_unsup": loss_cons_uns.item(),
                     "loss_anchor": loss_anchor.item(), "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
        if (it + 1) % args.eval_every == 0 or last:
            res = evaluate(model, val, nc, device, amp, rank=rank, world_size=world,
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
                                   labeled=labeled, anchors=anchors.cpu(), bank=bank.cpu(),
                                   class_conf=class_conf.cpu(),
                                   **({"teacher": teacher.state_dict()} if args.teacher_mode == "train" else {}))

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter,
                           labeled=labeled)
        final = {"last": res, "best": best, "iters": args.stop_iter, "labeled_images": len(labeled),
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt}
        core.atomic_save_npz(out / "anchors_final.npz", anchors=anchors.cpu().numpy(),
                             present=core.load_anchors(args.anchors, nc)[1])
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
