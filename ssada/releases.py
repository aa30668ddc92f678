"""The BiSeNetV1 models SS-ADA and TUFL released, loaded into common/bisenet.py's BiSeNetV1 (issue 27, item 2).

- ssada: SS-ADA's GTA5 -> Cityscapes models (its README: 50% / 25% / 12.5% of the target labels) and any
  `best.pth` / `latest.pth` of its scripts: `{'model': model.state_dict(), 'optimizer', 'epoch', 'previous_best'}`
  (ss_ada_bisenetv1_single.py:498-506 @ a02e3d8, supervised_bisenetv1_tar.py:366-374; `previous_best` is a numpy
  float, which common.safe_pickle admits) -> BiSeNetV1 `variant="ssada"`.
- tufl: TUFL's BiSeNet pretrained on Cityscapes (`pretrained/cityscapes.pth`) and its adapted
  `model_epoch_2000.pth` (README links): the bare `state_dict()` (unsup/train_paste.py:165-166) -> `variant="tufl"`.
- ours: model.pth / checkpoint.pth of this folder's scripts (`{'model', 'config', ...}`).

Key renaming (module path -> ours; `*` = weight, bias, running_mean, running_var, num_batches_tracked):

    cp.resnet.*                        -> backbone.*
    cp.resnet.layerN.M.downsample_{conv,bn}.* -> backbone.layerN.M.downsample.{0,1}.*  (TUFL's ResNet-18)
    cp.arm{16,32}.conv.{conv,bn}.*     -> arm{16,32}.conv.{0,1}.*
    cp.arm{16,32}.conv_atten.weight    -> arm{16,32}.atten.0.weight;   cp.arm*.bn_atten.* -> arm*.atten.1.*
    cp.{conv_avg,conv_head32,conv_head16}.{conv,bn}.* -> {conv_avg,conv_head32,conv_head16}.{0,1}.*
    sp.{conv1,conv2,conv3,conv_out}.{conv,bn}.*       -> sp.{0,1,2,3}.{0,1}.*
    ffm.convblk.{conv,bn}.*            -> ffm.convblk.{0,1}.*
    ffm.conv.weight, ffm.bn.*          -> ffm.atten.0.weight, ffm.atten.1.*     (SS-ADA: conv-BN attention)
    ffm.conv1.weight, ffm.conv2.weight -> ffm.atten.0.weight, ffm.atten.2.weight (TUFL: two-conv attention)
    conv_out{,16,32}.conv.{conv,bn}.*  -> head_{out,aux16,aux32}.conv.{0,1}.*
    conv_out{,16,32}.conv_out.*        -> head_{out,aux16,aux32}.cls.*          (TUFL: no bias)

TUFL's BN layers are InPlaceABNSync: their affine scale is |weight| + eps, not weight (mapillary/inplace_abn
src/inplace_abn_cpu.cpp forward_cpu: `abs_weight = weight.abs() + eps`), so `from_tufl` stores |w| + 1e-5 as our
BatchNorm2d's weight: the same normalisation, the same outputs. Files of inplace_abn < 1.0 carry no
`num_batches_tracked`: when the file has none they are set to 0 (a step counter that BN with a momentum never reads).
SS-ADA's `aux_conv_out*` heads (a second classifier for a source with another label space) have no place in our
model: such a file is refused, naming the keys. A file of a model built without the two deep-supervision heads
(SS-ADA `aux_mode='eval'`, TUFL `--sup_mode last`) has none of `conv_out16` / `conv_out32`: our `head_aux16` /
`head_aux32` then keep their initial weights, and the load says so (they serve the training loss only; the
evaluation reads `head_out`). One of them half there is an error, as any other missing key.

Not keys but a difference of the forward: SS-ADA's heads upsample their logits inside the model (nn.Upsample x8 /
x16, bilinear, align_corners=False, model/semseg/bisenetv1.py:69-70), ours return them at the head's resolution and
the caller upsamples: ssada/test.py (--align-corners auto) and train_ssada.py (--align-corners 0) with
align_corners=False for an SS-ADA BiSeNet, as SS-ADA; TUFL's heads use True (unsup/model.py:266), and so does the
evaluation of a TUFL file. At the heads' resolution an SS-ADA file gives SS-ADA's logits.

The number of classes comes from the main classifier's shape. The load is strict: every key of the file must map
to a key of the model and every key of the model must be filled, with the same shapes, or the error names the
file and the keys.
"""
import re

import torch

from common import safe_pickle
from common.bisenet import BiSeNetV1, bisenet_from_checkpoint
from common.models import WeightLoadError, _check_and_load, fill_bn_counters, resolve_checkpoint_format


FORMATS = ("auto", "ours", "ssada", "tufl")
FORMAT_HELP = ("format of the file: ours (this folder's model.pth), ssada (SS-ADA's released models and its "
               "best.pth / latest.pth: {'model': BiSeNetV1 state dict, ...}), tufl (TUFL's pretrained cityscapes.pth "
               "and model_epoch_2000.pth: a bare state dict, InPlaceABN); auto: from the file's entries and keys. "
               "Loaded strictly (ssada/releases.py)")
MAIN_CLS = "conv_out.conv_out.weight"        # the key every SS-ADA / TUFL BiSeNet file has
ABN_EPS = 1e-5                               # InPlaceABNSync's default eps (TUFL unsup/model.py builds it so)

_CBR = r"(conv|bn)\.(.+)"                    # an upstream ConvBNReLU: .conv.* / .bn.*
_RULES = [
    (r"cp\.resnet\.(layer\d\.\d)\.downsample_conv\.(.+)", r"backbone.\1.downsample.0.\2"),
    (r"cp\.resnet\.(layer\d\.\d)\.downsample_bn\.(.+)", r"backbone.\1.downsample.1.\2"),
    (r"cp\.resnet\.(.+)", r"backbone.\1"),
    (r"cp\.(arm16|arm32)\.conv\." + _CBR, None),
    (r"cp\.(arm16|arm32)\.conv_atten\.weight", r"\1.atten.0.weight"),
    (r"cp\.(arm16|arm32)\.bn_atten\.(.+)", r"\1.atten.1.\2"),
    (r"cp\.(conv_avg|conv_head32|conv_head16)\." + _CBR, None),
    (r"sp\.(conv1|conv2|conv3|conv_out)\." + _CBR, None),
    (r"ffm\.convblk\." + _CBR, None),
    (r"ffm\.conv\.weight", "ffm.atten.0.weight"),
    (r"ffm\.bn\.(.+)", r"ffm.atten.1.\1"),
    (r"ffm\.conv1\.weight", "ffm.atten.0.weight"),
    (r"ffm\.conv2\.weight", "ffm.atten.2.weight"),
    (r"(conv_out|conv_out16|conv_out32)\.conv\." + _CBR, None),
    (r"(conv_out|conv_out16|conv_out32)\.conv_out\.(.+)", None),
]
_SP = {"conv1": "0", "conv2": "1", "conv3": "2", "conv_out": "3"}
_HEAD = {"conv_out": "head_out", "conv_out16": "head_aux16", "conv_out32": "head_aux32"}


def _rename(k):
    """Our key for an SS-ADA / TUFL key (the table above), or None."""
    for pattern, repl in _RULES:
        m = re.fullmatch(pattern, k)
        if not m:
            continue
        if repl is not None:
            return m.expand(repl)
        g = m.groups()
        cb = {"conv": "0", "bn": "1"}
        if k.startswith("cp.arm"):                       # ARM's ConvBNReLU
            return f"{g[0]}.conv.{cb[g[1]]}.{g[2]}"
        if k.startswith("cp."):                          # conv_avg / conv_head32 / conv_head16
            return f"{g[0]}.{cb[g[1]]}.{g[2]}"
        if k.startswith("sp."):
            return f"sp.{_SP[g[0]]}.{cb[g[1]]}.{g[2]}"
        if k.startswith("ffm."):
            return f"ffm.convblk.{cb[g[0]]}.{g[1]}"
        if ".conv_out." in k:                            # a head's 1x1 classifier
            return f"{_HEAD[g[0]]}.cls.{g[1]}"
        return f"{_HEAD[g[0]]}.conv.{cb[g[1]]}.{g[2]}"   # a head's 3x3 ConvBNReLU
    return None


def bisenet_to_ours(sd, path="state dict"):
    """Rename an SS-ADA / TUFL BiSeNet state dict to common/bisenet.py's keys; a key no rule covers is an error."""
    out, unknown = {}, []
    for k, v in sd.items():
        new = _rename(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise WeightLoadError(f"{path}: keys that are not SS-ADA's / TUFL's BiSeNetV1 layout: "
                              f"{', '.join(unknown[:6])}{f' ... ({len(unknown)} in all)' if len(unknown) > 6 else ''}"
                              f" (SS-ADA's aux_conv_out* heads, for a source of another label space, are not "
                              f"supported; see ssada/releases.py)")
    return out


def _bare(state, path, fmt):
    sd = state.get("model", state) if isinstance(state, dict) and isinstance(state.get("model"), dict) else state
    if isinstance(sd, dict) and sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not isinstance(sd, dict) or MAIN_CLS not in sd or not torch.is_tensor(sd[MAIN_CLS]):
        raise WeightLoadError(f"{path} is not a BiSeNetV1 state dict of the {fmt} format: no {MAIN_CLS}")
    return sd


def _config(sd, variant):
    return {"model": "bisenetv1", "backbone": "resnet18", "num_classes": int(sd[MAIN_CLS].shape[0]),
            "caffe_style": False, "multi_level": False, "two_branch": False, "norm": "imagenet", "variant": variant}


def from_ssada(state, path):
    """SS-ADA's checkpoints ({'model': state dict, ...}, or the bare state dict). Returns (our state dict, config)."""
    sd = _bare(state, path, "ssada")
    return bisenet_to_ours(sd, path), _config(sd, "ssada")


def from_tufl(state, path):
    """TUFL's files (a bare state dict of its InPlaceABN BiSeNet). BN scales become |w| + eps (module docstring).
    Returns (our state dict, config)."""
    sd = _bare(state, path, "tufl")
    out = bisenet_to_ours(sd, path)
    for k in sd:
        if k.endswith(".weight") and k[:-len("weight")] + "running_mean" in sd:   # an InPlaceABN's scale
            out[_rename(k)] = sd[k].abs() + ABN_EPS
    return out, _config(sd, "tufl")


CONVERTERS = {"ssada": from_ssada, "tufl": from_tufl}


def detect_format(state, path):
    """(format, why) from the file's layout, only where it says so unambiguously."""
    if isinstance(state, dict) and "model" in state and "config" in state:
        return "ours", "it has 'model' and 'config' entries"
    sd = _bare(state, path, "ssada or tufl")
    if "ffm.conv1.weight" in sd or any(".downsample_conv." in k for k in sd):
        return "tufl", "TUFL's two-conv FFM attention (ffm.conv1) / downsample_conv keys"
    if "ffm.bn.running_mean" in sd:
        return "ssada", "SS-ADA's conv-BN FFM attention (ffm.conv, ffm.bn)"
    raise WeightLoadError(f"{path}: a BiSeNet state dict, but neither SS-ADA's nor TUFL's FFM: pass "
                          f"--checkpoint-format ssada or tufl")


def load_segmenter(path, fmt="auto", ours=bisenet_from_checkpoint):
    """BiSeNetV1 from `path` in format `fmt` (FORMATS), loaded strictly; a checkpoint of ours through `ours` (test.py:
    any segmenter). Returns (model, config, how), `how` a few words on the format used (and why, when
    auto-detected)."""
    fmt, state, how = resolve_checkpoint_format(
        path, fmt, FORMATS, lambda p: safe_pickle.load_torch(p, "a BiSeNetV1 checkpoint (ours, or SS-ADA's / "
                                                                "TUFL's released files)"), detect_format)
    if fmt == "ours":
        return (*ours(path), how)
    sd, cfg = CONVERTERS[fmt](state, path)
    net = BiSeNetV1(cfg["num_classes"], variant=cfg["variant"])
    fill_bn_counters(net, sd)  # inplace_abn < 1.0: no BN step counters at all (module docstring)
    aux = [k for k in net.state_dict() if k.startswith(("head_aux16.", "head_aux32."))]
    if not any(k in sd for k in aux):  # a model built without deep supervision (module docstring)
        sd.update({k: v for k, v in net.state_dict().items() if k in aux})
        how += "; no aux heads in the file: head_aux16/32 initialised afresh (training-only heads)"
    _check_and_load(net, sd, path, f"BiSeNetV1 of the {fmt} format (variant {cfg['variant']}, renamed as in "
                    "ssada/releases.py)")
    return net, cfg, how
