"""BiSeNetV1 (Yu et al., ECCV 2018) with a ResNet-18 context path: the real-time segmenter of TUFL
and SS-ADA (the CoinCheung/BiSeNet layout they build on).

- Context path: torchvision ResNet-18 (no download; `backbone`), features at 1/8, 1/16, 1/32;
  attention refinement modules (ARM) on 1/16 and 1/32, global-average context, 2x NEAREST upsampling
  steps (nn.Upsample(scale_factor=2.) in SS-ADA model/semseg/bisenetv1.py:168-169; F.interpolate
  mode='nearest' in TUFL unsup/model.py:122-131).
- Spatial path: three stride-2 conv-BN-ReLU (7x7, 3x3, 3x3, 64 ch) and a 1x1 to 128 ch (1/8).
- Feature fusion module (FFM): concat, 1x1 conv-BN-ReLU to 256, channel attention, residual.
  Two variants, as the two upstreams differ (`variant`):
  'ssada' (SS-ADA bisenetv1.py:261-300): attention = sigmoid(BN(conv1x1 256->256(avg))); ReLU after BN;
          classifiers with a bias.
  'tufl'  (TUFL unsup/model.py:188-218): attention = sigmoid(conv 64->256(ReLU(conv 256->64(avg)))), no BN;
          every conv-BN is an InPlaceABN with its default leaky ReLU (slope 0.01), in the ResNet-18 too
          (after the stem's and each block's first BN: `_layer`), and the 1x1
          classifiers have no bias (model.py:45).
- Three heads: "out" (FFM, 1/8), "aux16" (context feature at 1/8), "aux32" (context feature at 1/16);
  the two aux heads are returned in training mode only (deep supervision).
- UniMatch's feature perturbation (`need_fp=True`): the FFM and the main head also run on
  Dropout(0.5)(spatial feature) and Dropout2d(0.5)(context feature); returned as "fp".
Outputs are logits at the head's own resolution (house convention: the caller upsamples).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, slope=0.0):
        act = nn.ReLU(inplace=True) if slope == 0 else nn.LeakyReLU(slope, inplace=True)
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), act)
        nn.init.kaiming_normal_(self[0].weight, a=1)


class AttentionRefinement(nn.Module):
    """ARM: 3x3 conv-BN-ReLU, then a channel attention from the global average (1x1 conv, BN, sigmoid)."""

    def __init__(self, cin, cout, slope=0.0):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3, slope=slope)
        self.atten = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Sigmoid())
        nn.init.kaiming_normal_(self.atten[0].weight, a=1)

    def forward(self, x):
        feat = self.conv(x)
        return feat * self.atten(feat.mean((2, 3), keepdim=True))


class FeatureFusion(nn.Module):
    """FFM: concat(spatial, context) -> 1x1 conv-BN-ReLU; feat + feat * attention(avg(feat)), attention
    sigmoid(BN(conv1x1)) ('ssada') or sigmoid(conv1x1(ReLU(conv1x1 to cout/4))) ('tufl')."""

    def __init__(self, cin, cout, variant="ssada", slope=0.0):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1, slope=slope)
        if variant == "tufl":
            self.atten = nn.Sequential(nn.Conv2d(cout, cout // 4, 1, bias=False), nn.ReLU(inplace=True),
                                       nn.Conv2d(cout // 4, cout, 1, bias=False), nn.Sigmoid())
            nn.init.kaiming_normal_(self.atten[2].weight, a=1)
        else:
            self.atten = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Sigmoid())
        nn.init.kaiming_normal_(self.atten[0].weight, a=1)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], 1))
        return feat + feat * self.atten(feat.mean((2, 3), keepdim=True))


class Head(nn.Module):
    """BiSeNetOutput: 3x3 conv-BN-ReLU then a 1x1 classifier (upsampling is left to the caller)."""

    def __init__(self, cin, mid, num_classes, bias=True, slope=0.0):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3, slope=slope)
        self.cls = nn.Conv2d(mid, num_classes, 1, bias=bias)
        nn.init.kaiming_normal_(self.cls.weight, a=1)
        if bias:
            nn.init.zeros_(self.cls.bias)

    def forward(self, x):
        return self.cls(self.conv(x))


def _up(x, ref):
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


def _up_nearest(x, ref):
    """Context-path upsampling: nearest, as both upstreams (exactly 2x when the size is even)."""
    return F.interpolate(x, size=ref.shape[-2:], mode="nearest")


class BiSeNetV1(nn.Module):
    def __init__(self, num_classes=19, backbone="resnet18", variant="ssada"):
        super().__init__()
        if backbone != "resnet18":
            raise ValueError("BiSeNetV1 here has a ResNet-18 context path (backbone='resnet18')")
        if variant not in VARIANTS:
            raise ValueError(f"BiSeNetV1 variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        s = 0.01 if variant == "tufl" else 0.0  # TUFL: InPlaceABN(Sync), default leaky ReLU 0.01
        bias = variant != "tufl"
        net = torchvision.models.resnet18(weights=None)
        del net.fc, net.avgpool
        self.backbone = net  # context path's ResNet-18 (load_backbone_weights fills it)
        self.arm16, self.arm32 = AttentionRefinement(256, 128, s), AttentionRefinement(512, 128, s)
        self.conv_avg = ConvBNReLU(512, 128, 1, slope=s)
        self.conv_head32, self.conv_head16 = ConvBNReLU(128, 128, 3, slope=s), ConvBNReLU(128, 128, 3, slope=s)
        self.sp = nn.Sequential(ConvBNReLU(3, 64, 7, 2, s), ConvBNReLU(64, 64, 3, 2, s),
                                ConvBNReLU(64, 64, 3, 2, s), ConvBNReLU(64, 128, 1, slope=s))
        self.ffm = FeatureFusion(256, 256, variant, s)
        self.head_out = Head(256, 256, num_classes, bias, s)
        self.head_aux16 = Head(128, 64, num_classes, bias, s)
        self.head_aux32 = Head(128, 64, num_classes, bias, s)
        self.multi_level = False
        self.num_classes = num_classes

    def context(self, x):
        """Context path: (feature at 1/8, feature at 1/16), 128 channels each."""
        n = self.backbone
        if self.variant == "tufl":  # TUFL's ResNet-18 (unsup/resnet.py:40-90): InPlaceABN's leaky ReLU after bn1
            x = n.maxpool(F.leaky_relu(n.bn1(n.conv1(x)), 0.01))
        else:
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        f8 = self._layer(n.layer2, self._layer(n.layer1, x))
        f16 = self._layer(n.layer3, f8)
        f32 = self._layer(n.layer4, f16)
        avg = self.conv_avg(f32.mean((2, 3), keepdim=True))
        up32 = self.conv_head32(_up_nearest(self.arm32(f32) + avg, f16))
        up16 = self.conv_head16(_up_nearest(self.arm16(f16) + up32, f8))
        return up16, up32

    def _layer(self, layer, x):
        """A ResNet stage; 'tufl': TUFL's BasicBlock (unsup/resnet.py:40-55), leaky ReLU (0.01, InPlaceABN's default)
        after bn1 where torchvision's block has ReLU; bn2 and the downsample's BN without activation; ReLU after the
        sum, as torchvision's."""
        if self.variant != "tufl":
            return layer(x)
        for b in layer:
            out = b.bn2(b.conv2(F.leaky_relu(b.bn1(b.conv1(x)), 0.01)))
            x = F.relu(out + (b.downsample(x) if b.downsample is not None else x))
        return x

    def forward(self, x, need_fp=False):
        cp8, cp16 = self.context(x)
        sp = self.sp(x)
        if cp8.shape[-2:] != sp.shape[-2:]:  # odd input sizes: align the context feature to the spatial one
            cp8 = _up(cp8, sp)
        if need_fp:  # UniMatch feature perturbation: one pass on clean and dropped-out features
            fuse = self.ffm(torch.cat([sp, F.dropout(sp, 0.5, True)]),
                            torch.cat([cp8, F.dropout2d(cp8, 0.5, True)]))
            out, out_fp = self.head_out(fuse).chunk(2)
        else:
            out = self.head_out(self.ffm(sp, cp8))
        res = {"out": out}
        if need_fp:
            res["fp"] = out_fp
        if self.training:
            res["aux16"] = self.head_aux16(cp8)
            res["aux32"] = self.head_aux32(cp16)
        return res

    def param_groups(self):
        """(context + spatial path params, FFM + head params): as upstream, the FFM and heads train at
        10x the learning rate."""
        heads = [p for n, p in self.named_parameters() if n.startswith(("ffm.", "head_"))]
        ids = {id(p) for p in heads}
        return [p for p in self.parameters() if id(p) not in ids], heads


VARIANTS = ("ssada", "tufl")


def make_bisenet(num_classes=19, init="scratch", variant="ssada"):
    """Build BiSeNetV1-R18 ('ssada' or 'tufl' layout) and load an ImageNet ResNet-18 file (torchvision
    format) into its context path. Returns (model, config); config is what a checkpoint stores."""
    net = BiSeNetV1(num_classes, variant=variant)
    if init not in (None, "scratch"):
        from .models import load_backbone_weights
        load_backbone_weights(net, init)
    cfg = {"model": "bisenetv1", "backbone": "resnet18", "num_classes": num_classes, "caffe_style": False,
           "multi_level": False, "two_branch": False, "norm": "imagenet", "variant": variant}
    return net, cfg


def bisenet_from_checkpoint(path):
    """Rebuild a BiSeNetV1 checkpoint of ours (strict load). Returns (model, config)."""
    from .models import WeightLoadError, _check_and_load, read_segmenter_checkpoint
    state = read_segmenter_checkpoint(path, ("bisenetv1",))
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise WeightLoadError(f"{path} is not a segda checkpoint (needs 'model' and 'config' entries)")
    c = state["config"]
    if c.get("model") != "bisenetv1":
        raise WeightLoadError(f"{path} holds a {c.get('model')} model, not bisenetv1")
    net = BiSeNetV1(c["num_classes"], variant=c.get("variant", "ssada"))
    _check_and_load(net, {k[7:] if k.startswith("module.") else k: v for k, v in state["model"].items()},
                    path, "model BiSeNetV1")
    return net, dict(c)


def any_segmenter_from_checkpoint(path):
    """BiSeNetV1 or one of common.models' segmenters, whichever the checkpoint holds."""
    from .models import read_segmenter_checkpoint, segmenter_from_checkpoint
    state = read_segmenter_checkpoint(path, ("bisenetv1", "deeplabv2", "deeplabv3plus"))
    if isinstance(state, dict) and isinstance(state.get("config"), dict) and state["config"].get("model") == "bisenetv1":
        return bisenet_from_checkpoint(path)
    return segmenter_from_checkpoint(path)
