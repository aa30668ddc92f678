"""Segmentation models shared by the method folders, and strict weight loading.

- DeepLabV2 (multi-level): ResNet backbone at output stride 8 (layer3 dilation 2, layer4 dilation 4),
  aux head on layer3 and main head on layer4; each head sums four 3x3 convs with dilations
  6/12/18/24 (ADVENT's fixed version; `two_branch=True` reproduces the upstream AdaptSegNet/MaxSquare
  bug that returns after two branches).
- DeepLabV3+: ResNet at output stride 16 (multigrid 1/2/4 in layer4), ASPP with image pooling, decoder
  with a 48-channel low-level projection; can also return its 256-d decoder feature.
- FCDiscriminator: AdaptSegNet/ADVENT's fully-convolutional discriminator.
Models return dicts, torchvision style: {"out": main logits, "aux": aux logits (multi-level only),
"feat": 256-d decoder feature (DeepLabV3+, when asked)}, at the network's output resolution; the
caller upsamples. Nothing is downloaded: initial weights come from a local file (load_backbone_weights).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .runtime import InputError, read_checkpoint

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def _dilate(layer, dilation, multigrid=None):
    """Turn a ResNet stage into a dilated, stride-1 stage (every block gets the dilation, as in
    DeepLab; with multigrid, block i gets dilation * multigrid[i])."""
    for i, block in enumerate(layer):
        d = dilation * (multigrid[i % len(multigrid)] if multigrid else 1)
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation, m.padding = (d, d), (d, d)


def resnet_backbone(name, output_stride=8, caffe_style=False, multigrid=None):
    """A torchvision ResNet (no classifier) converted to output stride 8 or 16.
    caffe_style: stride on the bottleneck's 1x1 conv1 and ceil-mode max-pool, as in DeepLab's caffe
    ResNet-101 (needed for DeepLab's converted weights to mean what they meant)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    net = getattr(torchvision.models, name)(weights=None)
    del net.fc, net.avgpool
    if output_stride == 8:
        _dilate(net.layer3, 2)
        _dilate(net.layer4, 4)
    elif output_stride == 16:
        _dilate(net.layer4, 2, multigrid)
    else:
        raise ValueError("output_stride must be 8 or 16")
    if caffe_style:
        net.maxpool.ceil_mode = True
        for layer in (net.layer2, net.layer3, net.layer4):
            b = layer[0]
            if isinstance(b, torchvision.models.resnet.Bottleneck) and b.conv2.stride == (2, 2):
                b.conv1.stride, b.conv2.stride = (2, 2), (1, 1)
    return net


def _run_backbone(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    l1 = net.layer1(x)
    l3 = net.layer3(net.layer2(l1))
    return l1, l3, net.layer4(l3)


def _channels(name):
    return (64, 256, 512) if name in ("resnet18", "resnet34") else (256, 1024, 2048)


class ASPPClassifierV2(nn.Module):
    """DeepLabV2 classifier: sum of four 3x3 convs (dilation = padding = 6, 12, 18, 24), N(0, 0.01)."""

    def __init__(self, in_ch, num_classes, dilations=(6, 12, 18, 24), two_branch=False):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_ch, num_classes, 3, padding=d, dilation=d, bias=True)
                                   for d in dilations)
        self.n_used = 2 if two_branch else len(dilations)  # upstream bug: `return` inside the loop
        for c in self.convs:
            nn.init.normal_(c.weight, 0, 0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x):
        out = self.convs[0](x)
        for conv in self.convs[1:self.n_used]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    def __init__(self, num_classes=19, backbone="resnet101", multi_level=True, caffe_style=False,
                 two_branch=False):
        super().__init__()
        self.backbone = resnet_backbone(backbone, 8, caffe_style)
        _, c3, c4 = _channels(backbone)
        self.multi_level = multi_level
        self.head_aux = ASPPClassifierV2(c3, num_classes, two_branch=two_branch) if multi_level else None
        self.head_main = ASPPClassifierV2(c4, num_classes, two_branch=two_branch)

    def forward(self, x):
        _, l3, l4 = _run_backbone(self.backbone, x)
        out = {"out": self.head_main(l4)}
        if self.multi_level:
            out["aux"] = self.head_aux(l3)
        return out

    def param_groups(self):
        """(backbone params, head params): heads train at 10x the learning rate."""
        heads = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return list(self.backbone.parameters()), heads


def _cbr(cin, cout, k, d=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPV3(nn.Module):
    """DeepLabV3 ASPP: 1x1, three 3x3 atrous convs, image pooling; 256 channels each; projection."""

    def __init__(self, in_ch, dilations=(6, 12, 18), ch=256):
        super().__init__()
        self.branches = nn.ModuleList([_cbr(in_ch, ch, 1)] + [_cbr(in_ch, ch, 3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, ch, 1, bias=False),
                                  nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_cbr(ch * (len(dilations) + 2), ch, 1), nn.Dropout(0.5))

    def forward(self, x):
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (OS16, multigrid [1, 2, 4], ASPP [1, 6, 12, 18] + pooling, 48-ch low-level decoder)."""

    def __init__(self, num_classes=19, backbone="resnet101", caffe_style=False):
        super().__init__()
        self.backbone = resnet_backbone(backbone, 16, caffe_style, multigrid=(1, 2, 4))
        c1, _, c4 = _channels(backbone)
        self.aspp = ASPPV3(c4)
        self.low_proj = _cbr(c1, 48, 1)
        self.decoder = nn.Sequential(_cbr(256 + 48, 256, 3), nn.Dropout(0.5), _cbr(256, 256, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.multi_level = False

    def forward(self, x, return_feat=False):
        l1, _, l4 = _run_backbone(self.backbone, x)
        a = F.interpolate(self.aspp(l4), size=l1.shape[-2:], mode="bilinear", align_corners=True)
        feat = self.decoder(torch.cat([a, self.low_proj(l1)], 1))
        out = {"out": self.classifier(feat)}
        if return_feat:
            out["feat"] = feat
        return out

    def param_groups(self):
        heads = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return list(self.backbone.parameters()), heads


class FCDiscriminator(nn.Module):
    """AdaptSegNet/ADVENT discriminator: 4x4 stride-2 convs C->64->128->256->512->1, LeakyReLU 0.2,
    no normalisation, no sigmoid (the loss takes logits)."""

    def __init__(self, in_ch, ndf=64):
        super().__init__()
        chans = [in_ch, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(chans[-1], 1, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def build_model(name, num_classes, backbone, multi_level=True, caffe_style=False, two_branch=False):
    if name == "deeplabv2":
        return DeepLabV2(num_classes, backbone, multi_level, caffe_style, two_branch)
    if name == "deeplabv3plus":
        return DeepLabV3Plus(num_classes, backbone, caffe_style)
    raise ValueError(f"unknown model {name!r}; expected deeplabv2 or deeplabv3plus")


# ------------------------------------------------------------------------------------------------
# Strict weight loading
# ------------------------------------------------------------------------------------------------
class WeightLoadError(InputError):
    pass


# Which scripts read a checkpoint of each model (config["model"]): named when a script is given another's.
MODEL_READERS = {
    "deeplabv2": "advent_maxsquare's and mada's scripts (e.g. advent_maxsquare/test.py)",
    "deeplabv3plus": "mada's scripts (e.g. mada/test.py)",
    "deeplabv2_d2ada": "d2ada's scripts (d2ada/train_ada.py --init-from, d2ada/test.py)",
    "deeplabv3plus_d2ada": "d2ada's scripts (d2ada/train_ada.py --init-from, d2ada/test.py)",
    "fcn8s": "madan's scripts (e.g. madan/test.py)",
    "bisenetv1": "ssada's scripts (e.g. ssada/test.py)",
}


def read_segmenter_checkpoint(path, expected=("deeplabv2", "deeplabv3plus")):
    """A segmenter checkpoint of ours ({'model', 'config', ...}) through runtime.read_checkpoint, whose
    config names one of the expected models; another folder's model names the scripts that read it."""
    state = read_checkpoint(path, "a segmenter checkpoint of this project (model.pth / checkpoint.pth)",
                            need=("model", "config"))
    name = state["config"].get("model") if isinstance(state["config"], dict) else None
    if name not in expected:
        readers = MODEL_READERS.get(name, "no script of this project")
        raise WeightLoadError(f"{path} holds a {name} model, which {readers} read; this script reads "
                              + " / ".join(expected) + " checkpoints")
    return state


def _read_state(path):
    try:
        sd = read_checkpoint(path, "a state dict of weights")
    except InputError as e:
        raise WeightLoadError(str(e)) from None
    for k in ("model", "state_dict"):
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    if not isinstance(sd, dict):
        raise WeightLoadError(f"{path} does not hold a state dict")
    return sd


def _strip(sd, prefixes=("module.", "Scale.")):
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _check_and_load(module, sd, path, what):
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shape:
        def show(keys):
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shape:
            parts.append("shape mismatch: " + show([f"{k} {tuple(sd[k].shape)} (file) vs {tuple(own[k].shape)} "
                                                     "(expected)" for k in shape]))
        raise WeightLoadError(f"{path} does not match the {what}: " + "; ".join(parts))
    module.load_state_dict(sd, strict=True)


def resolve_checkpoint_format(path, fmt, formats, read, detect):
    """The format dispatch of every folder's releases.load_segmenter (the converters themselves stay in the folders).
    fmt: one of `formats` ('auto', 'ours', then the folder's release formats); read(path): the loaded file (through
    common.safe_pickle / read_checkpoint); detect(state, path): (format, why) from its entries. Returns (format,
    state, how): state is None for 'ours' (the caller reads its own checkpoints with its strict reader), how a few
    words on the format used (and why, when auto-detected), for the log."""
    if fmt not in formats:
        raise InputError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(formats)}")
    if fmt == "ours":
        return "ours", None, "ours"
    state = read(path)
    if fmt != "auto":
        return fmt, state, fmt
    fmt, why = detect(state, path)
    return fmt, None if fmt == "ours" else state, f"{fmt} (auto-detected: {why})"


def fill_bn_counters(module, sd):
    """A released state dict with no BN step counters at all (torch < 0.4.1, inplace_abn < 1.0) gets the module's
    num_batches_tracked at 0 (evaluation never reads them); one that has some keeps them, so that a partly missing
    file stays an error of the strict load."""
    counters = [k for k in module.state_dict() if k.endswith("num_batches_tracked")]
    if not any(k in sd for k in counters):
        sd.update({k: torch.zeros((), dtype=torch.long) for k in counters})
    return sd


def load_backbone_weights(model, path):
    """Initialise model.backbone from an ImageNet(/COCO) ResNet file: torchvision's (`conv1.weight`,
    `layer1.0.conv1.weight`, ..., `fc.*`) or DeepLab's caffe-converted ones (same names under `Scale.`,
    classifier `layer5.*`). Classifier keys are dropped; every other key must match exactly."""
    sd = {k: v for k, v in _strip(_read_state(path)).items()
          if not k.startswith(("fc.", "layer5.", "layer6.", "layer7."))}
    own = model.backbone.state_dict()
    for k in own:  # caffe conversions carry no BN step counter
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    _check_and_load(model.backbone, sd, path, "backbone")


def load_model_weights(model, path):
    """Load a whole model (a checkpoint of ours, or a state dict) strictly; mismatches name the keys."""
    sd = _read_state(path)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    _check_and_load(model, sd, path, f"model {type(model).__name__}")


# ------------------------------------------------------------------------------------------------
# Building a segmenter from flags, and back from a checkpoint
# ------------------------------------------------------------------------------------------------
def make_segmenter(model="deeplabv2", backbone="resnet101", num_classes=19, init="scratch",
                   init_format="torchvision", multi_level=True, two_branch=False):
    """Build a segmenter and load its backbone init. Returns (model, config); config["norm"] is the
    input normalisation that matches the init ('caffe' only with DeepLab's caffe-converted weights)."""
    caffe = init_format == "caffe"
    net = build_model(model, num_classes, backbone, multi_level, caffe, two_branch)
    if init not in (None, "scratch"):
        load_backbone_weights(net, init)
    cfg = {"model": model, "backbone": backbone, "num_classes": num_classes, "caffe_style": caffe,
           "multi_level": bool(getattr(net, "multi_level", False)), "two_branch": two_branch,
           "norm": "caffe" if caffe else "imagenet"}
    return net, cfg


def segmenter_from_checkpoint(path, num_classes=None):
    """Rebuild the model a checkpoint of ours was trained with and load its weights strictly.
    num_classes: when given, a checkpoint with another class count is refused. Returns (model, config)."""
    state = read_segmenter_checkpoint(path)
    c = state["config"]
    if num_classes is not None and c["num_classes"] != num_classes:
        raise WeightLoadError(f"{path} holds a {c['num_classes']}-class {c['model']}; expected {num_classes} classes")
    net = build_model(c["model"], c["num_classes"], c["backbone"], c["multi_level"], c["caffe_style"],
                      c["two_branch"])
    _check_and_load(net, {k[7:] if k.startswith("module.") else k: v for k, v in state["model"].items()},
                    path, f"model {type(net).__name__}")
    return net, dict(c)
