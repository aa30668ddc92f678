"""MADAN's released segmenters (CycleGTA5_Dynamic_Semantic_Consistency, CycleSYNTHIA_Dynamic_Semantic_Consistency,
Multi_Source_SAD_CCD; pikachusocute/MADAN README "Our Model"), loaded into our FCN8s-VGG16 (common/fcn.py; issue 26).

The files are `net.module.state_dict()` of CyCADA's `VGG16_FCN8s` (cycada/models/fcn8s.py; saved by
scripts/train_fcn.py:191 and scripts/train_fcn_adda.py:410-425), evaluated by tools/eval_templates.sh ->
scripts/eval_fcn.py with `--model fcn8s --num_cls 19`. Its keys map onto ours:

    vgg.{i}.{weight,bias}          ->  features.{i}.{weight,bias}   (the 13 convs, torchvision's VGG16 indices)
    vgg_head.0.{weight,bias}       ->  fc6.{weight,bias}            (7x7 conv 512 -> 4096)
    vgg_head.3.{weight,bias}       ->  fc7.{weight,bias}            (1x1 4096 -> 4096)
    vgg_head.6.{weight,bias}       ->  score_fr.{weight,bias}       (1x1 4096 -> C)
    score_pool4.*, score_pool3.*   ->  the same names
    upscore2.w, upscore_pool4.w, upscore8.w: the fixed bilinear kernels (one `Bilinear(2)` module registered under
        two names, and `Bilinear(8)`); ours are computed, not saved: the file's must equal them, then are dropped.

How upstream loads such a file matters: `VGG16_FCN8s(weights_init=FILE)` (what eval_fcn.py, train_fcn.py and
train_fcn_adda.py all do) calls `load_weights`, which loads `vgg.*` and `vgg_head.*` only: score_pool4 and
score_pool3 keep their zero initialisation, so the released models were evaluated without their trained skip
layers (the scores are fc7's, upsampled). Hence two formats:

| format    | what is loaded                                                                  |
|-----------|---------------------------------------------------------------------------------|
| madan     | as upstream loads it (the default for these files): every key checked, score_pool3/score_pool4 set to zero |
| madan_all | every weight in the file, trained skip layers included (upstream never loads them) |
| ours      | model.pth / checkpoint.pth of this folder's scripts ({'model', 'config', ...})    |

Both MADAN formats are strict: every key of the file must be one of the table's and vice versa, with the right
shape, or the error names the file and the keys. Input: torchvision ImageNet normalisation (VGG16_FCN8s.transform).
Auto-detection (`--checkpoint-format auto`): 'model' + 'config' = ours; `vgg.*` + `vgg_head.*` keys = madan.
"""
import torch

from common.fcn import FCN8s, bilinear_kernel, segmenter_from_checkpoint
from common.models import WeightLoadError, _check_and_load, resolve_checkpoint_format
from common.runtime import read_checkpoint

FORMATS = ("auto", "ours", "madan", "madan_all")
FORMAT_HELP = ("format of the file: ours (this repository's model.pth), madan (MADAN's released FCN8s, loaded as "
               "upstream's VGG16_FCN8s(weights_init=...) loads it: score_pool3/4 left at zero), madan_all (the same "
               "files with every weight, trained skip layers included); auto: ours or madan from the file's layout. "
               "Loaded strictly (madan/releases.py)")
HEAD = {"vgg_head.0.": "fc6.", "vgg_head.3.": "fc7.", "vgg_head.6.": "score_fr."}
KERNELS = {"upscore2.w": 4, "upscore_pool4.w": 4, "upscore8.w": 16}  # fixed bilinear kernel size of each


def fcn8s_to_ours(sd):
    """Rename a VGG16_FCN8s state dict to our FCN8s's keys (the module docstring's table); the fixed upsampling
    kernels are left out (see check_kernels)."""
    out = {}
    for k, v in sd.items():
        if k in KERNELS:
            continue
        if k.startswith("vgg."):
            k = "features." + k[len("vgg."):]
        for old, new in HEAD.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


def check_kernels(sd, num_classes, path):
    """The file's upsampling buffers must be the fixed bilinear kernels our FCN8s computes."""
    missing = [k for k in KERNELS if k not in sd]
    if missing:
        raise WeightLoadError(f"{path} does not match MADAN's VGG16_FCN8s: missing keys: {', '.join(missing)}")
    for k, size in KERNELS.items():
        want = bilinear_kernel(num_classes, size)
        if sd[k].shape != want.shape or not torch.equal(sd[k].float(), want):
            raise WeightLoadError(f"{path}: {k} {tuple(sd[k].shape)} is not the fixed bilinear kernel "
                                  f"{tuple(want.shape)} of VGG16_FCN8s")


def _from_vgg16_fcn8s(state, path, keep_skips):
    """MADAN's VGG16_FCN8s state dict -> (our FCN8s state dict, config)."""
    sd = state
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "vgg_head.6.weight" not in sd or not torch.is_tensor(sd["vgg_head.6.weight"]):
        keys = list(sd)
        raise WeightLoadError(f"{path} is not MADAN's VGG16_FCN8s state dict: no vgg_head.6.weight (it holds "
                              f"{', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    num_classes = int(sd["vgg_head.6.weight"].shape[0])
    check_kernels(sd, num_classes, path)
    out = fcn8s_to_ours(sd)
    if not keep_skips:
        out = {k: torch.zeros_like(v) if k.startswith(("score_pool4.", "score_pool3.")) else v for k, v in out.items()}
    cfg = {"model": "fcn8s", "backbone": "vgg16", "num_classes": num_classes, "caffe_style": False,
           "multi_level": False, "two_branch": False, "norm": "imagenet"}
    return out, cfg


def from_madan(state, path):
    """As upstream loads a released file (VGG16_FCN8s.load_weights): score_pool3/4 zero (module docstring)."""
    return _from_vgg16_fcn8s(state, path, keep_skips=False)


def from_madan_all(state, path):
    """Every weight of a released file, the trained skip layers score_pool3/4 included."""
    return _from_vgg16_fcn8s(state, path, keep_skips=True)


CONVERTERS = {"madan": from_madan, "madan_all": from_madan_all}


def detect_format(state, path):
    """(format, why) from the file's layout; a WeightLoadError when it is none of this folder's."""
    if "model" in state and "config" in state:
        return "ours", "it has 'model' and 'config' entries"
    bare = {k[len("module."):] if k.startswith("module.") else k for k in state}
    if "vgg_head.6.weight" in bare and "vgg.0.weight" in bare:
        return "madan", ("vgg.* and vgg_head.* keys (MADAN's VGG16_FCN8s), loaded as upstream does: score_pool3/4 "
                         "at zero; --checkpoint-format madan_all keeps them")
    keys = list(state)
    raise WeightLoadError(f"{path}: not a format this folder reads (it holds {', '.join(map(str, keys[:4]))}"
                          f"{', ...' if len(keys) > 4 else ''}); expected one of {', '.join(FORMATS[1:])} "
                          "(see madan/releases.py)")


def load_segmenter(path, fmt="auto"):
    """Our segmenter from `path` in format `fmt` (FORMATS), loaded strictly. Returns (model, config, how), `how` a
    few words on the format used (and why, when auto-detected), for the log."""
    fmt, state, how = resolve_checkpoint_format(
        path, fmt, FORMATS, lambda p: read_checkpoint(p, "a segmenter checkpoint of this project (model.pth) or "
                                                         "MADAN's released FCN8s", numpy_scalars=True), detect_format)
    if fmt == "ours":
        return (*segmenter_from_checkpoint(path), how)
    sd, cfg = CONVERTERS[fmt](state, path)
    net = FCN8s(cfg["num_classes"])
    _check_and_load(net, sd, path, f"FCN8s of the {fmt} format (renamed as in madan/releases.py)")
    return net, cfg, how
