"""The model files MADA and MADAv2 released, read into this folder's DeepLabV3+ (common.models.DeepLabV3Plus).

Both repositories (munanning/MADA @ 2356c24, munanning/MADAv2 @ 1c4fb81; the weights are Google Drive downloads
named in their READMEs) save a model as train_active_stage1.py:185-202 does:

    {'DeepLab': {'model_state': net.state_dict(), 'optimizer_state': ..., 'scheduler_state': ...},
     'iter': int, 'best_iou': numpy float64}

and read it back with `checkpoint['DeepLab']['model_state']` (test.py:43-44). The network is CAG_UDA's DeepLabV3+
(models/deeplab.py: ResNet-101 at output stride 16 with multigrid 1/2/4 in layer4, models/backbone/resnet.py;
ASPP 1/6/12/18 + image pooling, models/aspp.py; decoder with the 48-channel projection of layer1,
models/decoder.py), the same in both repositories. Its names, one to one onto ours:

    backbone.*                           -> backbone.*          (torchvision ResNet names; no fc)
    aspp.aspp{1..4}.atrous_conv.weight   -> aspp.branches.{0..3}.0.weight
    aspp.aspp{1..4}.bn.*                 -> aspp.branches.{0..3}.1.*
    aspp.global_avg_pool.{1,2}.*         -> aspp.pool.{1,2}.*   (the pooled branch's conv and BN)
    aspp.conv1.weight / aspp.bn1.*       -> aspp.project.0.0.weight / aspp.project.0.1.*
    decoder.conv1.weight / decoder.bn1.* -> low_proj.0.weight / low_proj.1.*
    decoder.last_conv.{0,1}.*            -> decoder.0.{0,1}.*   (3x3 conv 304 -> 256, BN)
    decoder.last_conv.{4,5}.*            -> decoder.2.{0,1}.*   (3x3 conv 256 -> 256, BN)
    decoder.last_conv.8.*                -> classifier.*        (1x1 conv to the classes, with bias)

Input: upstream feeds RGB / 255 with a zero mean and no std (data/cityscapes_dataset.py:53-56, 224-230;
gta5_dataset.py:68), so a released model is read with the config's `norm` "unit" (common.transforms.to_tensor),
the one its weights mean something with. The depth comes from layer3's block count (23: ResNet-101, 6:
ResNet-50), the classes from the classifier. The load is strict (upstream's own `adaptive_load_nets` silently keeps
what matches): a key that no rule renames, or one the model lacks or misses, is an error naming the file and the
keys. Pickled files are read through common.safe_pickle (torch's weights_only loader with the numpy allow-list
that `best_iou` needs): nothing in a file is run.
"""
import re

from common import safe_pickle
from common.models import (DeepLabV3Plus, WeightLoadError, _check_and_load, fill_bn_counters,
                           resolve_checkpoint_format, segmenter_from_checkpoint)

FORMATS = ("auto", "ours", "mada")
FORMAT_HELP = ("format of the file: ours (model.pth / checkpoint.pth of this folder), mada (MADA's or MADAv2's "
               "released model, e.g. from_gta5_to_cityscapes_on_deeplab101_best_model_stage1.pkl: "
               "{'DeepLab': {'model_state'}}, read with the input norm 'unit' = RGB / 255 as upstream); auto: from "
               "the file's entries. Loaded strictly (mada/releases.py)")
RULES = (
    (re.compile(r"aspp\.aspp([1-4])\.atrous_conv\.(.+)$"), lambda m: f"aspp.branches.{int(m[1]) - 1}.0.{m[2]}"),
    (re.compile(r"aspp\.aspp([1-4])\.bn\.(.+)$"), lambda m: f"aspp.branches.{int(m[1]) - 1}.1.{m[2]}"),
    (re.compile(r"aspp\.global_avg_pool\.([12])\.(.+)$"), lambda m: f"aspp.pool.{m[1]}.{m[2]}"),
    (re.compile(r"aspp\.conv1\.(.+)$"), lambda m: f"aspp.project.0.0.{m[1]}"),
    (re.compile(r"aspp\.bn1\.(.+)$"), lambda m: f"aspp.project.0.1.{m[1]}"),
    (re.compile(r"decoder\.conv1\.(.+)$"), lambda m: f"low_proj.0.{m[1]}"),
    (re.compile(r"decoder\.bn1\.(.+)$"), lambda m: f"low_proj.1.{m[1]}"),
    (re.compile(r"decoder\.last_conv\.([0145])\.(.+)$"),
     lambda m: f"decoder.{0 if m[1] in '01' else 2}.{0 if m[1] in '04' else 1}.{m[2]}"),
    (re.compile(r"decoder\.last_conv\.8\.(.+)$"), lambda m: f"classifier.{m[1]}"),
    (re.compile(r"(backbone\..+)$"), lambda m: m[1]),
)
CLASSIFIER = "decoder.last_conv.8.weight"


def _keys_preview(keys, n=4):
    keys = list(keys)
    return ", ".join(map(str, keys[:n])) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def mada_to_ours(sd, path="state dict"):
    """Rename a MADA / MADAv2 DeepLab state dict to common.models.DeepLabV3Plus's keys (the table above). A key no
    rule covers is an error naming it."""
    out, unknown = {}, []
    for k, v in sd.items():
        for pattern, new in RULES:
            m = pattern.match(k)
            if m:
                out[new(m)] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise WeightLoadError(f"{path}: keys that are not MADA's DeepLab (models/deeplab.py) layout: "
                              f"{_keys_preview(unknown, 6)} (see mada/releases.py)")
    return out


def _backbone(sd, path):
    blocks = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("backbone.layer3.")), default=-1)
    name = {23: "resnet101", 6: "resnet50"}.get(blocks) if "backbone.layer1.0.conv3.weight" in sd else None
    if name is None:
        raise WeightLoadError(f"{path}: a backbone whose layer3 has {blocks} blocks; MADA's DeepLab is a ResNet-101 "
                              f"(23 bottleneck blocks) or ResNet-50 (6)")
    return name


def state_dict_of(state, path):
    """The network's state dict in a MADA file: state['DeepLab']['model_state'] (what upstream's test.py reads), or
    a bare state dict; DataParallel's 'module.' prefix removed."""
    sd = state
    if isinstance(state, dict) and isinstance(state.get("DeepLab"), dict):
        sd = state["DeepLab"].get("model_state")
    if isinstance(sd, dict) and sd and all(str(k).startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not isinstance(sd, dict) or CLASSIFIER not in sd:
        have = _keys_preview(state if isinstance(state, dict) else [])
        raise WeightLoadError(f"{path} is not a MADA / MADAv2 model: no ['DeepLab']['model_state'] (or bare state "
                              f"dict) with {CLASSIFIER} (it holds {have})")
    return sd


def from_mada(state, path):
    """A loaded MADA / MADAv2 file -> (our state dict, our config)."""
    sd = state_dict_of(state, path)
    cfg = {"model": "deeplabv3plus", "backbone": _backbone(sd, path), "num_classes": int(sd[CLASSIFIER].shape[0]),
           "caffe_style": False, "multi_level": False, "two_branch": False, "norm": "unit"}
    return mada_to_ours(sd, path), cfg


def detect_format(state, path):
    """(format, why) from the file's entries; a WeightLoadError when neither."""
    if isinstance(state, dict) and "model" in state and "config" in state:
        return "ours", "it has 'model' and 'config' entries"
    if isinstance(state, dict) and ("DeepLab" in state or CLASSIFIER in state or "module." + CLASSIFIER in state):
        return "mada", "a 'DeepLab' entry (MADA's train_active_stage*.py)" if "DeepLab" in state else \
            f"a bare state dict with {CLASSIFIER}"
    raise WeightLoadError(f"{path}: not a format this folder reads (it holds "
                          f"{_keys_preview(state if isinstance(state, dict) else [])}); expected ours or mada")


def load_segmenter(path, fmt="auto"):
    """mada's segmenter from `path` in format `fmt` (FORMATS), loaded strictly. Returns (model, config, how),
    `how` a few words on the format used (and why, when auto-detected)."""
    fmt, state, how = resolve_checkpoint_format(
        path, fmt, FORMATS, lambda p: safe_pickle.load_torch(p, "a MADA checkpoint (ours, or MADA's / MADAv2's "
                                                                "released model)"), detect_format)
    if fmt == "ours":
        return (*segmenter_from_checkpoint(path), how)
    sd, cfg = from_mada(state, path)
    net = DeepLabV3Plus(cfg["num_classes"], cfg["backbone"])
    fill_bn_counters(net, sd)  # a file of torch < 0.4.1
    _check_and_load(net, sd, path, f"DeepLabV3Plus of the mada format ({cfg['backbone']}, renamed as in "
                    "mada/releases.py)")
    return net, cfg, how
