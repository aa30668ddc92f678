"""MADAN's networks: the CycleGAN generator and PatchGAN discriminator (instance norm), the image pool,
the ADDA discriminator on scores or features, MDAN's per-source domain classifiers, and a gradient
reversal that works on current PyTorch (a static autograd.Function)."""
import random

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_normal(net, gain=0.02):
    """CycleGAN's 'normal' init: conv/linear weights N(0, 0.02), biases 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


class ResnetBlock(nn.Module):
    def __init__(self, dim, dropout):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), nn.InstanceNorm2d(dim), nn.ReLU(True)]
        if dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), nn.InstanceNorm2d(dim)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """Johnson et al.'s ResNet generator as in CycleGAN: c7s1-ngf, two stride-2 downsamplings, n_blocks
    residual blocks, two stride-2 transposed convs, c7s1-3, tanh. Instance norm (no affine), so convs
    carry biases. Images in [-1, 1]."""

    def __init__(self, ngf=64, n_blocks=9, dropout=True, in_ch=3, out_ch=3):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for i in range(2):
            c = ngf * 2 ** i
            layers += [nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, dropout) for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 4 // 2 ** i
            layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(c // 2),
                       nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7), nn.Tanh()]
        self.model = init_normal(nn.Sequential(*layers))

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 4, (-w) % 4  # any input size: reflect-pad to a multiple of 4, crop back
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        return self.model(x)[..., :h, :w]


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (n_layers 3): 4x4 convs 3->ndf (s2, LReLU 0.2), ndf->2ndf (s2, IN), 2ndf->4ndf
    (s2, IN), 4ndf->8ndf (s1, IN), 8ndf->1 (s1). No sigmoid: LSGAN."""

    def __init__(self, ndf=64, n_layers=3, in_ch=3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1), nn.InstanceNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.model = init_normal(nn.Sequential(*layers))

    def forward(self, x):
        return self.model(x)


class ImagePool:
    """Shrivastava et al.'s history of generated images (CycleGAN): until full, return and store the
    new image; then with p 0.5 return a stored one (replaced by the new one), else the new one. Draws
    from its own random.Random so that a resumed run continues the same stream; its state is saved."""

    def __init__(self, size=50, seed=0):
        self.size, self.images, self.rng = size, [], random.Random(seed)

    def query(self, images):
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif self.rng.random() > 0.5:
                k = self.rng.randrange(self.size)
                out.append(self.images[k].clone())
                self.images[k] = img.clone()
            else:
                out.append(img)
        return torch.cat(out, 0)

    def state_dict(self):
        st = self.rng.getstate()
        return {"images": [i.cpu() for i in self.images], "rng": list(st[1]), "rng_pos": st[1][-1]}

    def load_state_dict(self, sd):
        self.images = list(sd["images"])
        self.rng.setstate((3, tuple(sd["rng"]), None))


class AddaDiscriminator(nn.Module):
    """ADDA's fully-convolutional domain classifier (CyCADA/MADAN): 1x1 convs in->d1->d2->2 with
    Dropout2d(0.5) and ReLU; d1 = 1024 on 4096-d fc7 features, else 512; d2 = d1 / 2. Two-way logits
    per position (source = 1, target = 0)."""

    def __init__(self, in_ch, out_ch=2):
        super().__init__()
        d1 = 1024 if in_ch == 4096 else 512
        self.net = nn.Sequential(nn.Conv2d(in_ch, d1, 1), nn.Dropout2d(0.5), nn.ReLU(True),
                                 nn.Conv2d(d1, d1 // 2, 1), nn.Dropout2d(0.5), nn.ReLU(True),
                                 nn.Conv2d(d1 // 2, out_ch, 1))

    def forward(self, x):
        return self.net(x)


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -lambda (Ganin & Lempitsky). Static
    forward/backward with ctx: the old instance-style Function (upstream MDAN.py) no longer runs."""

    @staticmethod
    def forward(ctx, x, lambd=1.0):
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lambd * grad, None


def grad_reverse(x, lambd=1.0):
    return GradReverse.apply(x, lambd)


class DomainClassifier(nn.Module):
    """One MDAN domain head (source j vs target) on a segmenter feature map: 2x2 average pooling, 1x1
    conv to 512 channels, then an MLP 2048 -> 1000 -> 500 -> 100 -> 2 (the sizes of upstream's MDAN).
    The gradient reversal sits in front of it (applied by the caller's `forward`)."""

    def __init__(self, in_ch, hidden=(1000, 500, 100)):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.reduce = nn.Conv2d(in_ch, 512, 1)
        nn.init.xavier_normal_(self.reduce.weight)
        nn.init.constant_(self.reduce.bias, 0.1)
        dims = [512 * 4, *hidden]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(True)]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], 2))

    def forward(self, feat, lambd=1.0):
        x = self.reduce(self.pool(grad_reverse(feat, lambd)))
        return self.mlp(x.flatten(1))


class FeatureHook:
    """The segmenter's last feature map, for ADDA (--discrim feat) and MDAN: FCN8s returns fc7 itself
    ('feat'); for DeepLab models a forward hook keeps the output of backbone.layer4."""

    def __init__(self, model):
        self.model, self.feat = model, None
        self.fcn = getattr(model, "fc7", None) is not None
        if not self.fcn:
            model.backbone.layer4.register_forward_hook(self._keep)

    def _keep(self, module, inp, out):
        self.feat = out

    def __call__(self, net, x):
        """(scores, feature) of `net` (the model or its DDP wrapper) on x."""
        if self.fcn:
            out = net(x, return_feat=True)
            return out["out"], out["feat"]
        out = net(x)
        return out["out"], self.feat

    def channels(self):
        if self.fcn:
            return 4096
        return [m for m in self.model.backbone.layer4.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
