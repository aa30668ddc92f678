"""The flags every training script shares (one vocabulary, architecture.md rule 7), and the
toy-vs-paper default switch. Each script keeps its own method flags and its own TOY/PAPER tables."""
import argparse

from .runtime import AMP_CHOICES


def hw(text):
    """'H,W' or 'HxW' -> (H, W)."""
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 720,1280), got {text!r}")
    return int(parts[0]), int(parts[1])


def positive(text):
    """An integer >= 1 (iterations, batch sizes, intervals)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v} (an interval of 0 has no meaning; "
                                         f"to validate only at the end, pass the run's length)")
    return v


def add_common_args(p, source="toy", target="toy"):
    g = p.add_argument_group("data")
    g.add_argument("--source", default=source, help="labelled source domain: toy | toy_gta5 | toy_synthia | "
                   "toy_cityscapes | gta5 | synthia | cityscapes | cityscapes_group0 | cityscapes_group1")
    g.add_argument("--source-root", default=None, help="dataset root of --source (toy: generated cache)")
    g.add_argument("--target", default=target, help="target domain: toy | toy_cityscapes | toy_crosscity | "
                   "cityscapes | crosscity | cityscapes_group1 ...")
    g.add_argument("--target-root", default=None, help="dataset root of --target (toy: generated cache)")
    g.add_argument("--num-classes", type=int, default=None, choices=[19, 16, 13],
                   help="label space: 19 (GTA5), 16 (SYNTHIA), 13 (CrossCity); default from the data")
    g.add_argument("--crop-size", type=hw, default=None, help="training input size H,W (images are resized "
                   "to it, as upstream; default: the domain's paper size)")
    g.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=["deeplabv2", "deeplabv3plus"], help="segmentation network")
    g.add_argument("--backbone", default=None, choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    g.add_argument("--init", default=None, help="ImageNet(/COCO) backbone weights file; 'scratch' = random "
                   "init; 'toy' (the toy presets' default) = scratch on toy v2, the toy stand-in for ImageNet weights on v3 "
                   "(common/toy_backbone.py, pre-trained once, cached)")
    g.add_argument("--init-format", default="torchvision", choices=["torchvision", "caffe"],
                   help="torchvision weights -> torchvision input normalisation; caffe (DeepLab's converted "
                   "DeepLab_resnet_pretrained_init-f81d91e8.pth) -> caffe ResNet and BGR-mean input")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=positive, default=None, help="length of the poly schedule (iter_max)")
    g.add_argument("--stop-iter", type=positive, default=None, help="stop early at this iteration (iter_stop)")
    g.add_argument("--batch-size", type=positive, default=None, help="images per step per process")
    g.add_argument("--lr", type=float, default=None, help="base learning rate (heads get 10x)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="autocast: bf16 where native, else off")
    g.add_argument("--compile", action="store_true", help="torch.compile the segmenter's training forward. Off by "
                   "default: on a 2-core CPU it pays back its compile time after ~300 DeepLabV2-R101 512x1024 steps, "
                   "but not within a toy run (~1000 steps needed); see benchmark/perf.md")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (config, log.jsonl, checkpoints, predictions)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth (full state)")
    g.add_argument("--eval-every", type=positive, default=None, help="validate on the target every N iterations")
    g.add_argument("--save-every", type=positive, default=None, help="write OUT/checkpoint.pth every N iterations")
    g.add_argument("--keep-snapshots", action="store_true", help="also keep OUT/best_model.pth (best validation "
                   "mIoU) and OUT/snapshots/iter_N.pth at every --save-every (off: a run keeps its resumable "
                   "checkpoint.pth and the final model.pth only)")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb (needs tensorboard)")
    return p


def is_toy(args):
    return all(str(d).startswith("toy") for d in (args.source, args.target) if d is not None)


def fill_defaults(args, toy, paper):
    """Unset flags (None) take the toy preset when every domain is a toy one, else the paper's."""
    table = toy if is_toy(args) else paper
    for k, v in table.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.stop_iter is None:
        args.stop_iter = args.iters
    if getattr(args, "init", None) == "toy":  # the toy presets' init: scratch on toy v2 (its published numbers);
        from .toy import toy_version           # on v3 the toy stand-in for ImageNet weights, pre-trained once, cached
        if toy_version() >= 3:
            from .toy_backbone import ensure_toy_backbone
            args.init = str(ensure_toy_backbone())
        else:
            args.init = "scratch"
    clamp_stop(args)
    return args


def clamp_stop(args, iters=None, name="--iters"):
    """A --stop-iter past the end of the poly schedule (e.g. the real-data preset's with --iters 2) would
    drive the learning rate through a negative base: it is clamped to the schedule's end, said in one line."""
    iters = args.iters if iters is None else iters
    if args.stop_iter is not None and iters is not None and args.stop_iter > iters:
        print(f"[config] --stop-iter {args.stop_iter} is past the end of the schedule ({name} {iters}): "
              f"stopping at {iters}", flush=True)
        args.stop_iter = iters
    return args


def default_num_classes(args):
    if args.num_classes is None:
        names = (args.source, args.target)
        args.num_classes = 13 if any("crosscity" in str(n) for n in names) else \
            16 if any("synthia" in str(n) for n in names) else 19
    return args.num_classes
