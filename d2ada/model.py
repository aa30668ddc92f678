"""D2ADA's segmenters, as the official code builds them (tsunghan-wu/D2ADA models/segmentation/, which is
VainF's DeepLabV3Plus-Pytorch). Both expose the 256-d feature right before the final 1x1 classifier, which
the density-aware selection averages per region (paper Sec. 3.2, "region feature").

- Backbone (models/segmentation/backbone/resnet.py, modeling.py:8-19): a torchvision ResNet at output
  stride 16 through `replace_stride_with_dilation=[False, False, True]`: layer4 loses its stride, its FIRST
  block keeps dilation 1 and the others get dilation 2 (torchvision's rule; no multi-grid). Output stride
  16 is upstream's default for both models (utils/common.py:111).
- deeplabv3plus (deeplabv3.py:28-57, 145-174): ASPP (1x1; 3x3 at 6/12/18 for OS16, 12/24/36 for OS8; image
  pooling), each conv+BN+ReLU, projected 1280 -> 256 (+BN, ReLU, Dropout 0.1); upsampled (bilinear,
  align_corners=False) to layer1's size and concatenated AFTER the 48-channel layer1 projection; ONE 3x3
  conv 304 -> 256 + BN + ReLU gives the region feature; a 1x1 conv gives the classes. Head convs
  Kaiming-normal, BN 1/0 (deeplabv3.py:59-65).
- deeplabv2 (deeplabv2.py): the four dilated 3x3 convs 6/12/18/24 of DeepLabV2's ASPP, each layer4 -> 256
  channels without bias, SUMMED into the 256-d feature; a 1x1 conv gives the classes (PyTorch's default init).
  The classic DeepLabV2 head maps the ASPP straight to the classes; this is D2ADA's 256-d bottleneck.
- forward (utils.py:13-28): the logits are upsampled (bilinear, align_corners=False) to the INPUT size inside
  the model, as upstream; the feature is returned at the network's resolution and region_stats upsamples it
  (align_corners=False, like upstream's feat_forward) to the superpixel map.
Checkpoints carry config["model"] = "deeplabv3plus_d2ada" / "deeplabv2_d2ada" and "output_stride";
`from_checkpoint` rebuilds those, older d2ada checkpoints (common's DeepLabV3+, the earlier OS8 DeepLabV2
variant) and any other segda segmenter.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.models import (BACKBONES, WeightLoadError, _check_and_load, load_backbone_weights, resnet_backbone,
                           read_segmenter_checkpoint, segmenter_from_checkpoint)

MODELS = ("deeplabv3plus", "deeplabv2")


def vainf_resnet(name, output_stride=16):
    """torchvision ResNet without fc/avgpool, converted like replace_stride_with_dilation: at OS16 layer4
    (at OS8 layer3 and layer4) runs at stride 1, its first block with the previous dilation, the rest with
    twice it. Written out (not via torchvision's flag) so that ResNet-18/34, whose BasicBlock refuses the
    flag, get the same rule for the toy preset."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    if output_stride not in (8, 16):
        raise ValueError("output_stride must be 8 or 16")
    net = getattr(torchvision.models, name)(weights=None)
    del net.fc, net.avgpool
    dilation = 1
    for layer in ([net.layer3, net.layer4] if output_stride == 8 else [net.layer4]):
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(layer):
            for m in block.modules():
                if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                    m.stride = (1, 1)  # the strided 3x3 conv and the downsample 1x1 conv
            convs = [m for n, m in block.named_children() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
            for j, conv in enumerate(convs):
                # torchvision: block 0 gets previous_dilation for its 3x3 conv; BasicBlock's conv2 always 1
                # in block 0 (torchvision's BasicBlock(dilation=d) would dilate both convs of later blocks)
                d = previous if i == 0 else dilation
                conv.dilation, conv.padding = (d, d), (d, d)
    return net


def _run(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    l1 = net.layer1(x)
    return l1, net.layer4(net.layer3(net.layer2(l1)))


def _cbr(cin, cout, k, d=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _ASPPPool(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))

    def forward(self, x):
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class DeepLabV3PlusD2ADA(nn.Module):
    """VainF's DeepLabV3+ (D2ADA's default model): one 3x3 decoder conv, its output is the region feature."""
    align_corners = False

    def __init__(self, num_classes=19, backbone="resnet101", output_stride=16):
        super().__init__()
        self.backbone = vainf_resnet(backbone, output_stride)
        c1, c4 = (64, 512) if backbone in ("resnet18", "resnet34") else (256, 2048)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = nn.ModuleList([_cbr(c4, 256, 1)] + [_cbr(c4, 256, 3, r) for r in rates] + [_ASPPPool(c4, 256)])
        self.aspp_project = nn.Sequential(nn.Conv2d(5 * 256, 256, 1, bias=False), nn.BatchNorm2d(256),
                                          nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.project = _cbr(c1, 48, 1)
        self.decoder = _cbr(48 + 256, 256, 3)
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.multi_level = False
        for m in [self.aspp, self.aspp_project, self.project, self.decoder, self.classifier]:
            for mm in m.modules():
                if isinstance(mm, nn.Conv2d):
                    nn.init.kaiming_normal_(mm.weight)
                elif isinstance(mm, nn.BatchNorm2d):
                    nn.init.constant_(mm.weight, 1)
                    nn.init.constant_(mm.bias, 0)

    def forward(self, x, return_feat=False):
        l1, l4 = _run(self.backbone, x)
        low = self.project(l1)
        a = self.aspp_project(torch.cat([b(l4) for b in self.aspp], 1))
        a = F.interpolate(a, size=low.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.decoder(torch.cat([low, a], 1))
        out = {"out": F.interpolate(self.classifier(feat), size=x.shape[-2:], mode="bilinear", align_corners=False)}
        if return_feat:
            out["feat"] = feat
        return out

    def param_groups(self):
        heads = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return list(self.backbone.parameters()), heads


class DeepLabV2Feat(nn.Module):
    """ResNet + summed 4-branch atrous convs to a 256-d feature + 1x1 classifier (D2ADA's DeepLabV2).
    legacy_os8: the earlier variant of this repository (common's DeepLab-style OS8 backbone), only to
    rebuild old checkpoints."""
    align_corners = False

    def __init__(self, num_classes=19, backbone="resnet101", output_stride=16, dilations=(6, 12, 18, 24),
                 legacy_os8=False):
        super().__init__()
        self.backbone = resnet_backbone(backbone, 8) if legacy_os8 else vainf_resnet(backbone, output_stride)
        self.align_corners = True if legacy_os8 else False
        c4 = 512 if backbone in ("resnet18", "resnet34") else 2048
        self.aspp = nn.ModuleList(nn.Conv2d(c4, 256, 3, padding=d, dilation=d, bias=False) for d in dilations)
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.multi_level, self.legacy = False, legacy_os8

    def forward(self, x, return_feat=False):
        _, l4 = _run(self.backbone, x)
        feat = sum(conv(l4) for conv in self.aspp)
        out = self.classifier(feat)
        if not self.legacy:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = {"out": out}
        if return_feat:
            out["feat"] = feat
        return out

    def param_groups(self):
        heads = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return list(self.backbone.parameters()), heads


def make_model(model, backbone, num_classes, init="scratch", init_format="torchvision", output_stride=16):
    """(net, config) for --model deeplabv3plus | deeplabv2 (D2ADA's variants, upstream's architecture).
    Backbone weights: a torchvision ImageNet ResNet file (upstream's pretrained_backbone)."""
    if model not in MODELS:
        raise ValueError(f"--model must be one of {MODELS}, got {model!r}")
    if init_format == "caffe":
        raise ValueError("D2ADA's models take torchvision ImageNet weights (upstream's pretrained_backbone); "
                         "--init-format caffe is not supported for d2ada")
    net = (DeepLabV3PlusD2ADA if model == "deeplabv3plus" else DeepLabV2Feat)(num_classes, backbone, output_stride)
    if init not in (None, "scratch"):
        load_backbone_weights(net, init)
    cfg = {"model": f"{model}_d2ada", "backbone": backbone, "num_classes": num_classes, "caffe_style": False,
           "multi_level": False, "two_branch": False, "norm": "imagenet", "output_stride": output_stride}
    return net, cfg


def from_checkpoint(path):
    """Rebuild a model saved by a d2ada script (any kind) and load its weights strictly."""
    state = read_segmenter_checkpoint(path, ("deeplabv3plus_d2ada", "deeplabv2_d2ada", "deeplabv2", "deeplabv3plus"))
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise WeightLoadError(f"{path} is not a segda checkpoint (needs 'model' and 'config' entries)")
    c = state["config"]
    if c["model"] == "deeplabv3plus_d2ada":
        net = DeepLabV3PlusD2ADA(c["num_classes"], c["backbone"], c["output_stride"])
    elif c["model"] == "deeplabv2_d2ada":
        legacy = "output_stride" not in c  # saved before the OS16 upstream variant: common's OS8 backbone
        net = DeepLabV2Feat(c["num_classes"], c["backbone"], c.get("output_stride", 8), legacy_os8=legacy)
    else:
        return segmenter_from_checkpoint(path)
    _check_and_load(net, {k[7:] if k.startswith("module.") else k: v for k, v in state["model"].items()},
                    path, f"model {type(net).__name__}")
    return net, dict(c)
