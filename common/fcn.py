"""FCN8s-VGG16 (Long et al., CVPR 2015; the "at-once" variant CyCADA and MADAN train), and the
builders that know it next to the DeepLab models of common.models.

- Backbone: torchvision's VGG16 `features` (13 convs, ReLU, no BN) with ceil-mode max-pools; the
  input is zero-padded by 99 pixels, which with conv1_1's own padding of 1 makes caffe FCN's 100
  (its conv1_1 has pad 100; cycada/models/fcn8s.py pads 99 the same way), so the 7x7 fc6 sees every
  position and the crop offsets 5, 9, 31 (computed by caffe for pad 100) align the output with the input.
- fc6 (7x7 conv 512->4096) and fc7 (1x1 4096->4096) are VGG16's classifier.0 / classifier.3 reshaped
  to convolutions; each followed by ReLU and Dropout2d(0.5). score_fr: 1x1 4096->C.
- Skips: score_pool4 on 0.01 * pool4 and score_pool3 on 1e-4 * pool3 (zero-initialised 1x1 convs,
  the "at-once" scaling), fused after fixed bilinear x2, x2 upsampling; a fixed bilinear x8 gives
  scores at the input resolution (crop offsets 5, 9, 31 as in the caffe model).
- Input normalisation: torchvision ImageNet ('imagenet'), the convention of torchvision's VGG16.
Returns {"out": scores at input resolution, "feat": fc7 activations (4096-d), when asked}.
Nothing is downloaded: `load_vgg16_weights` reads a local torchvision VGG16 file strictly.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from . import models as M


def bilinear_kernel(channels, size):
    """Fixed (channels, channels, size, size) bilinear upsampling kernel for conv_transpose2d."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt = (1 - (og - center).abs() / factor)
    filt = filt[:, None] * filt[None, :]
    w = torch.zeros(channels, channels, size, size)
    w[range(channels), range(channels)] = filt
    return w


class FCN8s(nn.Module):
    def __init__(self, num_classes=19):
        super().__init__()
        self.features = torchvision.models.vgg16(weights=None).features
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop6, self.drop7 = nn.Dropout2d(0.5), nn.Dropout2d(0.5)
        self.score_fr = nn.Conv2d(4096, num_classes, 1)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        for m in (self.score_pool4, self.score_pool3):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.register_buffer("up2", bilinear_kernel(num_classes, 4), persistent=False)
        self.register_buffer("up8", bilinear_kernel(num_classes, 16), persistent=False)
        self.multi_level = False

    def forward(self, x, return_feat=False):
        h, w = x.shape[-2:]
        y = F.pad(x, (99, 99, 99, 99))  # + conv1_1's padding 1 = caffe's pad 100 (the crop offsets assume it)
        pools = {}
        for i, m in enumerate(self.features):
            y = m(y)
            if i in (16, 23):  # pool3, pool4
                pools[i] = y
        feat = self.drop7(F.relu(self.fc7(self.drop6(F.relu(self.fc6(y))))))
        score = self.score_fr(feat)
        up = F.conv_transpose2d(score, self.up2.to(score.dtype), stride=2)
        s4 = self.score_pool4(0.01 * pools[23])
        up = up + s4[:, :, 5:5 + up.shape[2], 5:5 + up.shape[3]]
        up = F.conv_transpose2d(up, self.up2.to(up.dtype), stride=2)
        s3 = self.score_pool3(1e-4 * pools[16])
        up = up + s3[:, :, 9:9 + up.shape[2], 9:9 + up.shape[3]]
        up = F.conv_transpose2d(up, self.up8.to(up.dtype), stride=8)
        out = {"out": up[:, :, 31:31 + h, 31:31 + w].contiguous()}
        if return_feat:
            out["feat"] = feat
        return out

    def param_groups(self):
        """(VGG params incl. fc6/fc7, score layers): the score layers train at 10x with sgd_10x."""
        heads = [p for n, p in self.named_parameters() if n.startswith("score_")]
        backbone = [p for n, p in self.named_parameters() if not n.startswith("score_")]
        return backbone, heads


def load_vgg16_weights(model, path):
    """Initialise FCN8s from a local torchvision VGG16 ImageNet file (`features.*`, `classifier.0/3/6.*`).
    classifier.0/3 become fc6/fc7 (reshaped to convolutions), classifier.6 (the 1000-way layer) is
    dropped; every other key must be there with the right shape, or the error names it."""
    sd = M._read_state(path)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if "classifier.0.weight" in sd and sd["classifier.0.weight"].dim() == 2:
        sd["fc6.weight"] = sd.pop("classifier.0.weight").reshape(4096, 512, 7, 7)
        sd["fc7.weight"] = sd.pop("classifier.3.weight").reshape(4096, 4096, 1, 1)
        sd["fc6.bias"] = sd.pop("classifier.0.bias")
        sd["fc7.bias"] = sd.pop("classifier.3.bias")
    sd = {k: v for k, v in sd.items() if not k.startswith("classifier.6.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("score_")}

    class _Part(nn.Module):  # the VGG part of the model, so the strict check names exactly its keys
        def __init__(self):
            super().__init__()
            self.features, self.fc6, self.fc7 = model.features, model.fc6, model.fc7
    part = _Part()
    assert set(part.state_dict()) == set(own)
    M._check_and_load(part, sd, path, "VGG16 part of FCN8s (torchvision vgg16 file expected)")


def make_segmenter(model="deeplabv2", backbone="resnet101", num_classes=19, init="scratch",
                   init_format="torchvision", multi_level=True, two_branch=False):
    """common.models.make_segmenter, plus model='fcn8s' (backbone vgg16, torchvision VGG16 init).
    Returns (model, config); config["norm"] is the input normalisation that matches the init."""
    if model != "fcn8s":
        return M.make_segmenter(model, backbone, num_classes, init, init_format, multi_level, two_branch)
    if init_format == "caffe":
        raise ValueError("fcn8s takes torchvision VGG16 weights (--init-format torchvision)")
    net = FCN8s(num_classes)
    if init not in (None, "scratch"):
        load_vgg16_weights(net, init)
    cfg = {"model": "fcn8s", "backbone": "vgg16", "num_classes": num_classes, "caffe_style": False,
           "multi_level": False, "two_branch": False, "norm": "imagenet"}
    return net, cfg


def segmenter_from_checkpoint(path):
    """common.models.segmenter_from_checkpoint, plus FCN8s checkpoints. Returns (model, config)."""
    state = M.read_segmenter_checkpoint(path, ("fcn8s", "deeplabv2", "deeplabv3plus"))
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise M.WeightLoadError(f"{path} is not a segda checkpoint (needs 'model' and 'config' entries)")
    if state["config"].get("model") != "fcn8s":
        return M.segmenter_from_checkpoint(path)
    net = FCN8s(state["config"]["num_classes"])
    M._check_and_load(net, {k[7:] if k.startswith("module.") else k: v for k, v in state["model"].items()},
                      path, "model FCN8s")
    return net, dict(state["config"])
