"""The officially released models of AdaptSegNet, ADVENT and MaxSquare, loaded into our DeepLabV2 (issue 26).

All three release DeepLab's `ResNetMulti`: a caffe-style ResNet (stride on each bottleneck's 1x1 conv1, ceil-mode
max-pool, layer3/layer4 dilated 2/4), an aux classifier `layer5` on layer3 and the main classifier `layer6` on
layer4, each a list of four 3x3 convs (dilation 6/12/18/24). Its keys map one to one onto ours:

    layer5.conv2d_list.{0..3}.{weight,bias}  ->  head_aux.convs.{0..3}.{weight,bias}
    layer6.conv2d_list.{0..3}.{weight,bias}  ->  head_main.convs.{0..3}.{weight,bias}
    every other key (conv1, bn1, layer1..4)  ->  backbone.<the same name>

The formats differ in how the file wraps the weights and in the classifier's forward:

| format      | released files                                     | file holds                          | classifier   |
|-------------|----------------------------------------------------|-------------------------------------|--------------|
| advent      | gta2cityscapes_advent.pth, gta2cityscapes_minent_ER.pth, gta2cityscapes_minent.pth (valeoai/ADVENT releases) | model.state_dict() (advent/domain_adaptation/train_UDA.py:184) | sums the 4 branches (advent/model/deeplabv2.py ClassifierModule) |
| adaptsegnet | GTA2Cityscapes_multi-ed35151c.pth (wasidennis/AdaptSegNet README) | model.state_dict() (train_gta2cityscapes_multi.py; written with PyTorch 0.3/0.4: BN step counters only from 0.4.1 on) | returns after 2 branches (model/deeplab_multi.py Classifier_Module: `return` inside the loop) |
| maxsquare   | GTA5_source.pth and the MS / MS+IW / MS+IW+Multi checkpoints (ZJULearning/MaxSquareLoss README) | {'state_dict': DataParallel's ('module.' prefixes), 'optimizer', 'epoch', 'iteration', 'best_MIou'} (tools/train_source.py:465-481), or a bare state dict | 2 branches (graphs/models/deeplab_multi.py) |
| ours        | model.pth / checkpoint.pth / snapshots of this folder's scripts | {'model', 'config', ...} | config['two_branch'] |

So a release becomes DeepLabV2(caffe_style=True, two_branch = format != 'advent'), multi-level when the file has
`layer5`, with caffe input normalisation (BGR, 0..255, minus the BGR mean, as all three feed it); the number of
classes and the depth (ResNet-50/101) come from the shapes and block counts in the file.

The load is strict: every key of the file must be a key of the model and vice versa, with the same shape, or the
error names the file and the keys. One exception, said here: a file written before PyTorch 0.4.1 (as AdaptSegNet's
may be) has no BN `num_batches_tracked` counters; when the file holds none they are set to 0 (a step counter that BN,
which has a momentum, never reads).

Auto-detection (`--checkpoint-format auto`, the default) only where the layout says it unambiguously:
'model' + 'config' entries = ours; a 'state_dict' entry holding ResNetMulti keys = MaxSquare's trainer checkpoint.
A bare ResNetMulti state dict is ADVENT's, AdaptSegNet's or a bare MaxSquare one, whose keys are identical but whose
classifiers are not (4 vs 2 branches): auto refuses and asks for the format.
"""
import torch

from common.models import (WeightLoadError, _check_and_load, build_model, fill_bn_counters, resolve_checkpoint_format,
                           segmenter_from_checkpoint)
from common.runtime import read_checkpoint

FORMATS = ("auto", "ours", "advent", "adaptsegnet", "maxsquare")
FORMAT_HELP = ("format of the file: ours (this repository's model.pth), advent (ADVENT's released "
               "gta2cityscapes_{advent,minent_ER,minent}.pth), adaptsegnet (GTA2Cityscapes_multi-ed35151c.pth), "
               "maxsquare (GTA5_source.pth and MaxSquare's adapted checkpoints); auto: ours or maxsquare from the "
               "file's layout (a bare ResNetMulti state dict, ADVENT's or AdaptSegNet's, needs the format named). "
               "Loaded strictly (advent_maxsquare/releases.py)")
RESNETMULTI_MAIN = "layer6.conv2d_list.0.weight"  # the key every ResNetMulti file has


def resnetmulti_to_ours(sd):
    """Rename a ResNetMulti state dict to our DeepLabV2's keys (the table in the module docstring)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("layer5.conv2d_list."):
            out["head_aux.convs." + k[len("layer5.conv2d_list."):]] = v
        elif k.startswith("layer6.conv2d_list."):
            out["head_main.convs." + k[len("layer6.conv2d_list."):]] = v
        else:
            out["backbone." + k] = v
    return out


def _bare_state_dict(state):
    """The state dict inside a file: the 'state_dict' entry when there is one (MaxSquare), without the
    'module.' prefix that DataParallel adds when every key carries it."""
    sd = state["state_dict"] if isinstance(state.get("state_dict"), dict) else state
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _keys_preview(sd, n=4):
    keys = list(sd)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def _resnetmulti_config(sd, path, fmt):
    """The DeepLabV2 a ResNetMulti state dict implies: classes from the main classifier's shape, depth from the
    number of bottlenecks in layer3 (6: ResNet-50, 23: ResNet-101), multi-level when layer5 is there."""
    if RESNETMULTI_MAIN not in sd or not torch.is_tensor(sd[RESNETMULTI_MAIN]):
        raise WeightLoadError(f"{path} is not a ResNetMulti state dict ({fmt} format): no {RESNETMULTI_MAIN} "
                              f"(it holds {_keys_preview(sd)})")
    if "layer1.0.conv3.weight" not in sd:
        raise WeightLoadError(f"{path}: ResNetMulti has bottleneck blocks, but the file has no layer1.0.conv3.weight")
    blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layer3.") and k.split(".")[1].isdigit())
    backbone = {6: "resnet50", 23: "resnet101"}.get(blocks)
    if backbone is None:
        raise WeightLoadError(f"{path}: layer3 has {blocks} blocks; expected 23 (ResNet-101) or 6 (ResNet-50)")
    return {"model": "deeplabv2", "backbone": backbone, "num_classes": int(sd[RESNETMULTI_MAIN].shape[0]),
            "caffe_style": True, "multi_level": "layer5.conv2d_list.0.weight" in sd,
            "two_branch": fmt != "advent", "norm": "caffe"}


def _from_resnetmulti(state, path, fmt):
    sd = _bare_state_dict(state)
    cfg = _resnetmulti_config(sd, path, fmt)
    return resnetmulti_to_ours(sd), cfg


def from_advent(state, path):
    """ADVENT's released models: ResNetMulti state dict, the classifiers sum all four branches."""
    return _from_resnetmulti(state, path, "advent")


def from_adaptsegnet(state, path):
    """AdaptSegNet's GTA2Cityscapes_multi: ResNetMulti state dict, classifiers return after two branches."""
    return _from_resnetmulti(state, path, "adaptsegnet")


def from_maxsquare(state, path):
    """MaxSquare's checkpoints: {'state_dict': 'module.'-prefixed ResNetMulti keys, ...} or the bare state dict;
    classifiers return after two branches."""
    return _from_resnetmulti(state, path, "maxsquare")


CONVERTERS = {"advent": from_advent, "adaptsegnet": from_adaptsegnet, "maxsquare": from_maxsquare}


def detect_format(state, path):
    """(format, why) from the file's layout, only where unambiguous; otherwise a WeightLoadError saying why."""
    if "model" in state and "config" in state:
        return "ours", "it has 'model' and 'config' entries"
    if isinstance(state.get("state_dict"), dict) and RESNETMULTI_MAIN in _bare_state_dict(state):
        return "maxsquare", "a 'state_dict' entry holding ResNetMulti keys (MaxSquare's tools/train_source.py)"
    if RESNETMULTI_MAIN in _bare_state_dict(state):
        raise WeightLoadError(
            f"{path} is a bare ResNetMulti state dict ({RESNETMULTI_MAIN}, ...): ADVENT's, AdaptSegNet's and a bare "
            "MaxSquare file share these keys but not the classifier (ADVENT sums 4 branches, AdaptSegNet and MaxSquare "
            "2), so it is not guessed: pass --checkpoint-format advent, adaptsegnet or maxsquare")
    raise WeightLoadError(f"{path}: not a format this folder reads (it holds {_keys_preview(state)}); expected "
                          f"one of {', '.join(FORMATS[1:])} (see advent_maxsquare/releases.py)")


def load_segmenter(path, fmt="auto"):
    """Our segmenter from `path` in format `fmt` (FORMATS), loaded strictly. Returns (model, config, how), `how` a
    few words on the format used (and why, when auto-detected), for the log."""
    fmt, state, how = resolve_checkpoint_format(
        path, fmt, FORMATS, lambda p: read_checkpoint(p, "a segmenter checkpoint of this project (model.pth) or an "
                                                         "official ADVENT / AdaptSegNet / MaxSquare release",
                                                      numpy_scalars=True), detect_format)
    if fmt == "ours":
        return (*segmenter_from_checkpoint(path), how)
    sd, cfg = CONVERTERS[fmt](state, path)
    net = build_model(cfg["model"], cfg["num_classes"], cfg["backbone"], cfg["multi_level"], cfg["caffe_style"],
                      cfg["two_branch"])
    fill_bn_counters(net, sd)  # pre-0.4.1 file: no BN step counters at all (module docstring)
    _check_and_load(net, sd, path, f"DeepLabV2 of the {fmt} format ({cfg['backbone']}, renamed as in "
                    "advent_maxsquare/releases.py)")
    return net, cfg, how
