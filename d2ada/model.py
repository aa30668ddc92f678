"""D2ADA's segmenters: both must expose the 256-d feature right before the final classifier, which
the density-aware selection averages per region (paper Sec. 3.2, "region feature").

- deeplabv3plus: common.models.DeepLabV3Plus(return_feat=True): the 256-d decoder feature.
- deeplabv2 (D2ADA's DeepLabV2 variant, as in the official models/segmentation/deeplabv2.py): the
  ResNet (OS8) layer4 goes through the four dilated 3x3 convs 6/12/18/24 of DeepLabV2's ASPP, each
  to 256 channels (no bias), SUMMED into a 256-d feature; a 1x1 conv maps it to the classes. This
  differs from the classic DeepLabV2 head (ASPP straight to the classes, common.models.DeepLabV2), which
  has no feature of the classifier's input width; it is a 256-d bottleneck added for D2ADA. Single
  level (no aux head), as upstream.
Checkpoints carry config["model"] = "deeplabv2_d2ada" for the variant; `from_checkpoint` rebuilds
either kind.
"""
import torch
import torch.nn as nn

from common.models import (WeightLoadError, _check_and_load, _run_backbone, load_backbone_weights,
                           make_segmenter, resnet_backbone, segmenter_from_checkpoint)

MODELS = ("deeplabv3plus", "deeplabv2")


class DeepLabV2Feat(nn.Module):
    """ResNet OS8 + summed 4-branch atrous convs to a 256-d feature + 1x1 classifier (D2ADA's V2)."""

    def __init__(self, num_classes=19, backbone="resnet101", caffe_style=False, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.backbone = resnet_backbone(backbone, 8, caffe_style)
        c4 = 512 if backbone in ("resnet18", "resnet34") else 2048
        self.aspp = nn.ModuleList(nn.Conv2d(c4, 256, 3, padding=d, dilation=d, bias=False) for d in dilations)
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.multi_level = False

    def forward(self, x, return_feat=False):
        _, _, l4 = _run_backbone(self.backbone, x)
        feat = sum(conv(l4) for conv in self.aspp)
        out = {"out": self.classifier(feat)}
        if return_feat:
            out["feat"] = feat
        return out

    def param_groups(self):
        heads = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return list(self.backbone.parameters()), heads


def make_model(model, backbone, num_classes, init="scratch", init_format="torchvision"):
    """(net, config) for --model deeplabv3plus | deeplabv2 (D2ADA's variant with a 256-d feature)."""
    if model == "deeplabv3plus":
        return make_segmenter("deeplabv3plus", backbone, num_classes, init, init_format, multi_level=False)
    if model != "deeplabv2":
        raise ValueError(f"--model must be one of {MODELS}, got {model!r}")
    caffe = init_format == "caffe"
    net = DeepLabV2Feat(num_classes, backbone, caffe)
    if init not in (None, "scratch"):
        load_backbone_weights(net, init)
    cfg = {"model": "deeplabv2_d2ada", "backbone": backbone, "num_classes": num_classes, "caffe_style": caffe,
           "multi_level": False, "two_branch": False, "norm": "caffe" if caffe else "imagenet"}
    return net, cfg


def from_checkpoint(path):
    """Rebuild a model saved by a d2ada script (either kind) and load its weights strictly."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise WeightLoadError(f"{path} is not a segda checkpoint (needs 'model' and 'config' entries)")
    c = state["config"]
    if c["model"] != "deeplabv2_d2ada":
        return segmenter_from_checkpoint(path)
    net = DeepLabV2Feat(c["num_classes"], c["backbone"], c["caffe_style"])
    _check_and_load(net, {k[7:] if k.startswith("module.") else k: v for k, v in state["model"].items()},
                    path, "model DeepLabV2Feat")
    return net, dict(c)
