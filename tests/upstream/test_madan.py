"""madan/ against the official MADAN code (pikachusocute/MADAN at 7a2918da44f5203b72652bc4cba0e70057482114, the
folder MADAN under $SEGDA_UPSTREAM): the CycleGAN generator and PatchGAN discriminator on the same weights, every
translation loss (GAN, cycle, DSC, SAD, CCD, the discriminators') and its gradient, one full translation iteration
(CycleGANSemanticModel.optimize_parameters beside our train_translation.py: every weight and Adam buffer), the FCN8s
segmenter after madan/releases.py's converter, ADDA's losses and one iteration (scripts/train_fcn_adda.py's main()
itself, driven), MDAN's losses and one iteration (scripts/train_fcn_mdan.py's main(), driven). CPU, fp32.
Run: SEGDA_UPSTREAM=DIR python -m pytest -q tests/upstream/test_madan.py -m upstream

MDAN: the reference is MADAN's own segmentation MDAN (cycada/models/MDAN.py, scripts/train_fcn_mdan.py), the
baseline of the MADAN paper; the original MDAN code (Zhao et al., NeurIPS 2018) is not part of the pinned checkouts.

Driving shims used here (each named where used; none changes what upstream computes): fake loaders/datasets in
place of upstream's, instance-level `.to(gpu)` no-ops and a module-level `torch` whose `cuda.is_available()` says
True (the scripts assert a GPU, then wrap in DataParallel, which on a CPU-only machine passes through), `Tensor.to(gpu
index)` staying on the CPU, `config_logging` (PyYAML >= 6 rejects its `yaml.load` call) and `SummaryWriter` as
no-ops, dropout p = 0 where two codes draw masks in a different order, and `Tensor.backward(retain_graph=True)` to
read per-term gradients after upstream's own backward.
"""
import copy
import importlib
import re
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from upstream import harness as H
from madan import losses as Lm
from madan import models as Mm
from madan import releases as MR

REPO = "MADAN"
C = 5  # classes of the small DSC classifiers / segmenters


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _gan_image(*shape, seed=0):
    return torch.tanh(_rand(*shape, seed=seed))  # generator-range images in (-1, 1)


def up_networks():
    return H.load(REPO, "models.networks", "cyclegan")


def gen_to_ours(sd):
    """ResnetGenerator keys: upstream's ResnetBlock holds `conv_block`, ours `block`; the rest is identical."""
    return {re.sub(r"\.conv_block\.", ".block.", k): v for k, v in sd.items()}


def gen_key(k):
    return gen_to_ours({k: 0}).popitem()[0]


def up_generator(N, ngf=8, dropout=False, blocks="resnet_6blocks"):
    return N.define_G(3, 3, ngf, blocks, "instance", dropout, "normal", [])


def up_discriminator(N, ndf=8):
    return N.define_D(3, ndf, "n_layers", 3, "instance", False, "normal", [])


def ours_generator(theirs, ngf=8, n_blocks=6, dropout=False):
    return H.load_strict(Mm.ResnetGenerator(ngf, n_blocks, dropout), gen_to_ours(theirs.state_dict()))


def ours_discriminator(theirs, ndf=8):
    return H.load_strict(Mm.PatchDiscriminator(ndf, 3), theirs.state_dict())


# ------------------------------------------------------------------------------------------------
# Networks: the CycleGAN generator and the PatchGAN discriminator on the same weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [False, True])
def test_generator_outputs(dropout):
    N = up_networks()
    theirs = H.randomize(up_generator(N, 8, dropout, "resnet_9blocks"), seed=1)
    ours = ours_generator(theirs, 8, 9, dropout)
    off = "cyclegan/models/networks.py:ResnetGenerator.forward"
    for i, size in enumerate([(32, 48), (64, 64)]):
        x = _gan_image(2, 3, *size, seed=10 + i)
        for mode in ("eval", "train"):  # train: the same dropout masks (same module order, same RNG draws)
            theirs.train(mode == "train"), ours.train(mode == "train")
            torch.manual_seed(3)
            out_t = theirs(x)
            torch.manual_seed(3)
            out_o = ours(x)
            H.compare(f"G (dropout {dropout}) {size[0]}x{size[1]} {mode}", out_o, out_t, official=off)
    # gradient with respect to the input (what the cycle and GAN losses send back through G)
    theirs.eval(), ours.eval()
    x = _gan_image(1, 3, 32, 48, seed=20)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (theirs(xt) ** 2).mean().backward()
    (ours(xo) ** 2).mean().backward()
    H.compare(f"G (dropout {dropout}) input gradient", xo.grad, xt.grad, official=off)


def test_generator_on_sizes_not_divisible_by_4():
    """Listed deviation (madan/README.md): upstream's output is not the input's size when H or W is not a multiple
    of 4 (GTA5's 1914 width gives 1916); ours reflect-pads to a multiple of 4 and crops back. Exactly that: ours =
    upstream on the reflect-padded input, cropped."""
    N = up_networks()
    theirs = H.randomize(up_generator(N), seed=2).eval()
    ours = ours_generator(theirs).eval()
    x = _gan_image(1, 3, 30, 46, seed=5)
    with torch.no_grad():
        out_t = theirs(x)
        assert out_t.shape[-2:] == (32, 48)  # upstream: not the input size
        padded = theirs(F.pad(x, (0, 2, 0, 2), mode="reflect"))[..., :30, :46]
        H.compare("G on 30x46: ours vs upstream on the reflect-padded input, cropped", ours(x), padded,
                  official="cyclegan/models/networks.py:ResnetGenerator.forward",
                  note="listed deviation: any input size")


def test_discriminator_outputs_and_input_gradients():
    N = up_networks()
    theirs = H.randomize(up_discriminator(N), seed=3)
    ours = ours_discriminator(theirs)
    for i, size in enumerate([(32, 32), (64, 96)]):
        x = _gan_image(2, 3, *size, seed=30 + i)
        xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_t, out_o = theirs(xt), ours(xo)
        H.compare(f"PatchGAN D {size[0]}x{size[1]}", out_o, out_t,
                  official="cyclegan/models/networks.py:NLayerDiscriminator.forward")
        out_t.square().mean().backward()
        out_o.square().mean().backward()
        H.compare(f"PatchGAN D {size[0]}x{size[1]} input gradient", xo.grad, xt.grad,
                  official="cyclegan/models/networks.py:NLayerDiscriminator.forward")


# ------------------------------------------------------------------------------------------------
# The multi-source CycleGAN model of upstream, small: 2 sources (1 = SYNTHIA, 2 = GTA5), shared target D, DSC,
# SAD and CCD on, their epoch thresholds passed (current_epoch 1 > 0)
# ------------------------------------------------------------------------------------------------
NGF, NDF, HW = 8, 8, (32, 32)


class TinyClassifier(nn.Module):
    """A small per-pixel classifier standing in for the DSC classifiers (upstream: DRN-26; no BN and no dropout,
    so train mode (upstream) and eval mode (ours) are the same function)."""

    def __init__(self, c=C):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, c, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class AsOurs(nn.Module):
    """Our scripts read segmenters that return {'out': logits}."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"out": self.net(x)}


def madan_opt(**kw):
    """The options CycleGANSemanticModel.initialize / forward / backward_G / optimize_parameters read, at the
    official multi-source script's values (scripts/CycleGAN/cyclegan_gta_synthia2cityscapes.sh) but small; the
    SAD/CCD thresholds passed. D1D2_weight: upstream's CCD weight attribute, which no option defines (listed
    deviation: our --ccd-weight, CCD_weight 0.2)."""
    o = dict(gpu_ids=[], isTrain=True, checkpoints_dir="/nonexistent", name="t", resize_or_crop="scale_width_and_crop",
             semantic_loss=True, SAD=True, CCD=True, HF_CCD=False, lambda_identity=0.0, lambda_A=1.0, lambda_B=1.0,
             Shared_DT=True, input_nc=3, output_nc=3, ngf=NGF, ndf=NDF, which_model_netG="resnet_6blocks",
             which_model_netD="n_layers", n_layers_D=3, norm="instance", no_dropout=True, init_type="normal",
             no_lsgan=False, pool_size=50, lr=2e-4, beta1=0.5, weights_model_type="tiny", num_cls=C, weights_syn="syn",
             weights_gta="gta", SAD_frozen_epoch=0, CCD_frozen_epoch=0, CCD_weight=0.2, D1D2_weight=0.2,
             current_epoch=1, dynamic_weight=10.0, general_semantic_weight=20.0)
    o.update(kw)
    return types.SimpleNamespace(**o)


# upstream network attribute -> ours (ModuleDicts G, F, D of train_translation.py; source index 0 = SYNTHIA = 1)
NETS = {"G_A_1": ("G", "G_0"), "G_A_2": ("G", "G_1"), "G_B_1": ("F", "F_0"), "G_B_2": ("F", "F_1"),
        "D_B_1": ("D", "D_0"), "D_B_2": ("D", "D_1"), "D_A": ("D", "D_T"), "D_3": ("D", "D_3"),
        "D_21": ("D", "D_01"), "D_12": ("D", "D_10")}


def up_madan_model(monkeypatch, opt, seed=0):
    """Upstream's CycleGANSemanticModel, initialised with `opt`, every network randomised; the DSC classifiers
    (get_model) are two TinyClassifiers. Returns (model, {'syn': clf, 'gta': clf})."""
    with H.upstream(REPO, "cyclegan"):
        mcg = importlib.import_module("models.multi_cycle_gan_semantic_model")
    clfs = {"syn": TinyClassifier(), "gta": TinyClassifier()}
    for k, c in clfs.items():
        H.randomize(c, seed=seed + (1 if k == "syn" else 2))
    with monkeypatch.context() as m:
        m.setattr(mcg, "get_model", lambda name, num_cls, pretrained, weights_init: clfs[weights_init])
        model = mcg.CycleGANSemanticModel()
        model.initialize(opt)
    for i, name in enumerate(NETS):
        H.randomize(getattr(model, "net" + name), seed=seed + 10 + i)
    return model, clfs


def ours_nets(model, dropout=False):
    """Our G / F / D ModuleDicts holding the upstream model's current weights."""
    G, F_, D = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
    dicts = {"G": G, "F": F_, "D": D}
    for name, (d, key) in NETS.items():
        net = getattr(model, "net" + name)
        dicts[d][key] = (ours_generator(net, NGF, 6, dropout) if d in "GF" else ours_discriminator(net, NDF))
    return G, F_, D


def _inputs(seed=40):
    return {"A_1": _gan_image(1, 3, *HW, seed=seed), "A_2": _gan_image(1, 3, *HW, seed=seed + 1),
            "B": _gan_image(1, 3, *HW, seed=seed + 2), "A_paths_1": ["a1.png"], "A_paths_2": ["a2.png"]}


def test_translation_losses_and_gradients(monkeypatch):
    """Every term of backward_G and of the discriminators' backward_D_* (their values, read from the upstream
    model's loss_* attributes after its own forward/backward), and each generator term's gradient with respect
    to the image it scores, against madan/losses.py on the same tensors and weights."""
    opt = madan_opt()
    model, clfs = up_madan_model(monkeypatch, opt)
    G, F_, D = ours_nets(model)
    model.set_input(_inputs())
    real_backward = torch.Tensor.backward
    off = "cyclegan/models/multi_cycle_gan_semantic_model.py:"
    with monkeypatch.context() as m:  # shim: keep the graph, to read per-term gradients after upstream's backward
        m.setattr(torch.Tensor, "backward", lambda self, *a, **k: real_backward(self, *a, **{**k, "retain_graph": True}))
        model.forward(opt)
        model.backward_G(opt)

    def grad_of(term, wrt):
        return torch.autograd.grad(term, wrt, retain_graph=True)[0]

    def leaf(t):
        return t.detach().clone().requires_grad_()

    D_T = D["D_T"]
    checks = []  # (name, upstream term, upstream input tensor, our function of a leaf copy)
    for i, s in ((0, "1"), (1, "2")):
        checks += [
            (f"G_A_{s}: 2 LSGAN(D_T(G_{s}(x_{s})), real)", model.__dict__[f"loss_G_A_{s}"], model.__dict__[f"fake_B_{s}"],
             lambda x: 2 * Lm.lsgan(D_T(x), True)),
            (f"G_B_{s}: LSGAN(D_{s}(F_{s}(x_T)), real)", model.__dict__[f"loss_G_B_{s}"], model.__dict__[f"fake_A_{s}"],
             lambda x, i=i: Lm.lsgan(D[f"D_{i}"](x), True)),
            (f"cycle_A_{s}: |F(G(x_{s})) - x_{s}|_1", model.__dict__[f"loss_cycle_A_{s}"], model.__dict__[f"rec_A_{s}"],
             lambda x, s=s: Lm.cycle(x, model.__dict__[f"real_A_{s}"])),
            (f"cycle_B_{s}: |G(F(x_T)) - x_T|_1", model.__dict__[f"loss_cycle_B_{s}"], model.__dict__[f"rec_B_{s}"],
             lambda x: Lm.cycle(x, model.real_B)),
        ]
    checks += [
        ("SAD G: LSGAN(D_3(G_1(x_1)), real)", model.loss_G_s1s2, model.fake_B_1, lambda x: Lm.sad_generator(D["D_3"], x)),
        ("CCD G: LSGAN(D_21(F_1(G_2(x_2))), real) (unweighted)", model.loss_G_s1s21, model.fake_A_21,
         lambda x: Lm.ccd_generator(D["D_01"], x)),
        ("CCD G: LSGAN(D_12(F_2(G_1(x_1))), real) (unweighted)", model.loss_G_s2s12, model.fake_A_12,
         lambda x: Lm.ccd_generator(D["D_10"], x)),
    ]
    # DSC: upstream adds general_semantic_weight * loss_sem / (C*H*W), loss_sem = dynamic_weight * KL batchmean
    chw = model.pred_fake_B_SYN[0].numel()
    for tag, real, fake, loss in (("SYN", model.pred_real_A_SYN, model.pred_fake_B_SYN, model.loss_sem_syn),
                                  ("GTA", model.pred_real_A_GTA, model.pred_fake_B_GTA, model.loss_sem_gta)):
        checks.append((f"DSC {tag}: its share of loss_G", opt.general_semantic_weight * loss / chw, fake,
                       lambda x, real=real: opt.dynamic_weight * opt.general_semantic_weight * Lm.dsc(real.detach(), x)))
    for name, term, inp, ours_fn in checks:
        x = leaf(inp)
        val = ours_fn(x)
        H.compare(f"{name}: value", val, term, official=off + "backward_G")
        H.compare(f"{name}: gradient w.r.t. its input", grad_of(val, x), grad_of(term, inp), official=off + "backward_G")
    # the total generator loss (what is backpropagated): ours with --ccd-weight = the D1D2_weight given here
    total = sum(2 * Lm.lsgan(D_T(model.__dict__[f"fake_B_{s}"]), True) + Lm.lsgan(D[f"D_{i}"](model.__dict__[f"fake_A_{s}"]), True)
                + Lm.cycle(model.__dict__[f"rec_A_{s}"], model.__dict__[f"real_A_{s}"])
                + Lm.cycle(model.__dict__[f"rec_B_{s}"], model.real_B) for i, s in ((0, "1"), (1, "2")))
    total = total + Lm.sad_generator(D["D_3"], model.fake_B_1) + 0.2 * (
        Lm.ccd_generator(D["D_01"], model.fake_A_21) + Lm.ccd_generator(D["D_10"], model.fake_A_12))
    total = total + sum(200 * Lm.dsc(r.detach(), f) for r, f in ((model.pred_real_A_SYN, model.pred_fake_B_SYN),
                                                                 (model.pred_real_A_GTA, model.pred_fake_B_GTA)))
    H.compare("loss_G, every term", total, model.loss_G, official=off + "backward_G")

    # discriminators: upstream's backward_D_B, backward_D_A (shared D_A), backward_D('SAD'|'CCD_21'|'CCD_12')
    fakes = {k: model.__dict__[k].detach().clone() for k in ("fake_A_1", "fake_A_2", "fake_B_1", "fake_B_2",
                                                             "fake_A_21", "fake_A_12")}
    for name, (d, _) in NETS.items():  # as optimize_parameters: the D optimisers' zero_grad before backward_D_*
        if d == "D":
            getattr(model, "net" + name).zero_grad(set_to_none=True)
    model.backward_D_B()
    model.backward_D_A(True)
    for which in ("SAD", "CCD_21", "CCD_12"):
        model.backward_D(which)
    ours_d = {"loss_D_B_1": Lm.d_loss(D["D_0"], model.real_A_1, fakes["fake_A_1"]),
              "loss_D_B_2": Lm.d_loss(D["D_1"], model.real_A_2, fakes["fake_A_2"]),
              "loss_D_A_1": Lm.d_loss(D_T, model.real_B, fakes["fake_B_1"]),
              "loss_D_A_2": Lm.d_loss(D_T, model.real_B, fakes["fake_B_2"]),
              "loss_D_3_1": Lm.sad_discriminator(D["D_3"], fakes["fake_B_2"], fakes["fake_B_1"]),
              "loss_D_21": Lm.ccd_discriminator(D["D_01"], model.real_A_1, fakes["fake_A_21"]),
              "loss_D_12": Lm.ccd_discriminator(D["D_10"], model.real_A_2, fakes["fake_A_12"])}
    for k, v in ours_d.items():
        H.compare(f"{k}: 0.5 (LSGAN(D(real), 1) + LSGAN(D(pool(fake)), 0))", v, model.__dict__[k],
                  official=off + ("backward_D" if k[7] in "32" else "backward_D_basic"))
    D.zero_grad(set_to_none=True)
    sum(ours_d.values()).backward()
    for name, (d, key) in NETS.items():
        if d == "D":
            theirs = getattr(model, "net" + name)
            H.compare_states(f"{name} parameter gradients", {n: p.grad for n, p in D[key].named_parameters()},
                             {n: p.grad for n, p in theirs.named_parameters()}, official=off + "backward_D_basic")


def test_ccd_weight_attribute_is_undefined_upstream(monkeypatch):
    """Listed deviation: backward_G multiplies the CCD terms by opt.D1D2_weight, which no option defines (the
    official script passes --CCD_weight 0.2): upstream stops with an AttributeError; ours reads --ccd-weight."""
    opt = madan_opt()
    del opt.D1D2_weight
    model, _ = up_madan_model(monkeypatch, opt)
    model.set_input(_inputs())
    model.forward(opt)
    with pytest.raises(AttributeError, match="D1D2_weight"):
        model.backward_G(opt)
    H.record("CCD weight: upstream opt.D1D2_weight undefined", 1, 1, True,
             official="cyclegan/models/multi_cycle_gan_semantic_model.py:backward_G",
             note="listed deviation: AttributeError upstream; ours --ccd-weight (CCD_weight 0.2)")


# ------------------------------------------------------------------------------------------------
# One translation iteration: upstream's optimize_parameters beside our train_translation.py main(), same weights
# and batch; every G/F/D weight and Adam buffer after the step
# ------------------------------------------------------------------------------------------------
def stub_script_io(m, script, loaders):
    """Driving shims for one of our scripts run in-process: its loaders serve `loaders` (in the order it builds
    them), no dataset on disk (resolve_domain / train_set / eval_set), no evaluation, no checkpoint written."""
    from common import runtime as rt
    m.setattr(script, "resolve_domain", lambda name, root, role: (name, "real", root))
    m.setattr(script, "train_set", lambda *a, **k: None)
    m.setattr(script, "infinite_loader", lambda *a, **k: next(loaders))
    for name, value in (("eval_set", None), ("evaluate", {"mIoU": 0.0, "per_class": {}})):
        if hasattr(script, name):
            m.setattr(script, name, lambda *a, _v=value, **k: _v)
    m.setattr(rt, "check_inputs", lambda *a, **k: None)
    m.setattr(rt, "save_checkpoint", lambda *a, **k: None)


def run_translation_ours(monkeypatch, tmp_path, G, F_, D, clfs, inputs):
    """Our train_translation.main() for one iteration, its networks built from G/F/D (in its construction order),
    its loaders serving `inputs` (generator-range images: norm_to_gan is the identity here), the DSC classifiers
    `clfs`. gan_to_norm is the identity too: upstream feeds the classifiers the GAN's [-1, 1] images (listed
    deviation; ours converts to the classifier's own normalisation). Returns the record_steps records."""
    tt = importlib.import_module("madan.train_translation")
    order = {"gen": [G["G_0"], G["G_1"], F_["F_0"], F_["F_1"]],
             "disc": [D["D_0"], D["D_1"], D["D_T"], D["D_3"], D["D_01"], D["D_10"]]}
    batches = iter([iter(lambda x=inputs["A_1"]: {"image": x}, None), iter(lambda x=inputs["A_2"]: {"image": x}, None),
                    iter(lambda x=inputs["B"]: {"image": x}, None)])
    clf_iter = iter([(AsOurs(copy.deepcopy(clfs["syn"])), {"norm": "imagenet"}),
                     (AsOurs(copy.deepcopy(clfs["gta"])), {"norm": "imagenet"})])
    args = tt.parse_args(["--source", "synthia,gta5", "--source-root", f"{tmp_path},{tmp_path}", "--target", "cityscapes",
                          "--target-root", str(tmp_path), "--classifiers", "syn.pth,gta.pth", "--ngf", str(NGF),
                          "--ndf", str(NDF), "--n-blocks", "6", "--no-dropout", "--batch-size", "1", "--epoch-iters", "1",
                          "--max-epoch", "1", "--sad-frozen-epoch", "0", "--ccd-frozen-epoch", "0", "--amp", "off",
                          "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "ours")])
    with monkeypatch.context() as m:
        m.setattr(tt, "ResnetGenerator", lambda *a, **k: order["gen"].pop(0))
        m.setattr(tt, "PatchDiscriminator", lambda *a, **k: order["disc"].pop(0))
        m.setattr(tt, "segmenter_from_checkpoint", lambda path: next(clf_iter))
        stub_script_io(m, tt, batches)
        m.setattr(tt, "norm_to_gan", lambda x, norm: x)
        m.setattr(tt, "gan_to_norm", lambda x, norm: x)  # listed deviation, see the docstring
        m.setattr(tt, "save_grid", lambda *a, **k: None)
        records = H.record_steps(m)
        tt.main(args)
    assert not order["gen"] and not order["disc"]
    return records


def test_translation_iteration(monkeypatch, tmp_path):
    """One iteration of CycleGANSemanticModel.optimize_parameters (G step of both sources with GAN, cycle, DSC,
    SAD and CCD terms; then D_A + D_B_i, D_3, D_21, D_12 steps) vs our train_translation.py: after the step every
    generator and discriminator weight and every Adam buffer agree. The image pools are empty at step 1 (upstream's
    D_3 sharing D_A's fake_B_1 pool, a listed deviation, shows only once a pool is full)."""
    opt = madan_opt()
    inputs = _inputs(seed=140)
    with monkeypatch.context() as m:
        rec_t = H.record_steps(m)  # upstream builds its optimisers in initialize()
        model, clfs = up_madan_model(monkeypatch, opt, seed=100)
        G, F_, D = ours_nets(model)
        model.set_input(inputs)
        with H.upstream(REPO, "cyclegan"):
            model.optimize_parameters(opt)
    rec = run_translation_ours(monkeypatch, tmp_path, G, F_, D, clfs, inputs)
    assert len(rec) == 2 and len(rec_t) == 6  # ours: Adam G+F, Adam D; upstream: G_1, G_2, D, D_3, D_21, D_12
    params = {k: v for r in rec for k, v in r.params.items()}
    state = {k: v for r in rec for k, v in r.state.items()}
    params_t = {k: v for r in rec_t for k, v in r.params.items()}
    state_t = {k: v for r in rec_t for k, v in r.state.items()}
    off = "cyclegan/models/multi_cycle_gan_semantic_model.py:optimize_parameters"
    for name, (d, key) in NETS.items():
        ours = {"G": G, "F": F_, "D": D}[d][key]
        theirs = getattr(model, "net" + name)
        ren = gen_key if d in "GF" else (lambda k: k)
        compare_adam_step(name, ours, theirs, ren, (params, state), (params_t, state_t), official=off)
    lrs = sorted({lr for r in rec for lrs in r.lrs for lr in lrs})
    lrs_t = sorted({lr for r in rec_t for lrs in r.lrs for lr in lrs})
    H.compare("learning rates of every optimiser (step 1)", torch.tensor(lrs), torch.tensor(lrs_t), official=off)


def compare_adam_step(name, ours, theirs, ren, recorded, recorded_t, official, resolved=1e-5):
    """After Adam's first step. Its buffers hold the gradient (exp_avg = (1 - beta1) g, exp_avg_sq = (1 - beta2) g^2):
    compared over the whole network (one vector, so that the scale is the network's). The weights: Adam's first
    step moves each by lr * g / (|g| + eps), i.e. ~lr * sign(g) whatever |g|, so an entry whose gradient is float
    noise moves in a noise direction in either code; the biases of the convs in front of a (non-affine) instance
    norm have gradient 0 in exact arithmetic, i.e. only noise. The weights are compared where the gradient is
    resolved (|g| > resolved * max |g| of the network); the others are counted in the note."""
    (params, state), (params_t, state_t) = recorded, recorded_t

    def flat(d):
        return torch.cat([d[k].flatten() for k in sorted(d)]) if d else torch.zeros(0)
    st, st_t = H.state_by_name(state, ours), H.state_by_name(state_t, theirs, ren)
    assert sorted(st) == sorted(st_t), (name, sorted(set(st) ^ set(st_t))[:6])
    for buf in ("exp_avg", "exp_avg_sq"):
        pick = sorted(k for k in st if k.endswith(":" + buf))
        H.compare(f"{name}: Adam {buf} after step 1 (the whole network)", flat({k: st[k] for k in pick}),
                  flat({k: st_t[k] for k in pick}), official=official)
    w, w_t = H.by_name(params, ours), H.by_name(params_t, theirs, ren)
    assert sorted(w) == sorted(w_t)
    g_t = flat({k: st_t[k + ":exp_avg"] for k in w_t})
    mask = g_t.abs() > resolved * g_t.abs().max()
    H.compare(f"{name}: weights after step 1 (entries with a resolved gradient)", flat(w)[mask], flat(w_t)[mask],
              official=official, note=f"{int((~mask).sum())} of {mask.numel()} entries with |g| <= {resolved} max|g| "
              "not compared (Adam's first step moves them by ~lr in the direction of float noise)")


# ------------------------------------------------------------------------------------------------
# The FCN8s segmenter: a file in the released layout (VGG16_FCN8s state dict), through madan/releases.py
# ------------------------------------------------------------------------------------------------
def up_fcn8s(num_cls=19, **kw):
    """Upstream's VGG16_FCN8s (built inside upstream(): it needs the torchvision vgg.cfg shim)."""
    with H.upstream(REPO):
        fcn = importlib.import_module("cycada.models.fcn8s")
        return fcn, fcn.VGG16_FCN8s(num_cls=num_cls, **{"pretrained": False, **kw})


def test_fcn8s_after_the_release_converter(tmp_path):
    """A randomised upstream VGG16_FCN8s saved as the releases are (net.module.state_dict()), then:
    format madan (what --checkpoint-format auto picks) = upstream's own VGG16_FCN8s(weights_init=FILE), which loads
    vgg + vgg_head only (score_pool3/4 stay 0); format madan_all = upstream's class with every weight of the file."""
    fcn, theirs = up_fcn8s()
    kernels = {k: v.clone() for k, v in theirs.state_dict().items() if k.endswith(".w")}
    H.randomize(theirs, seed=7)
    with torch.no_grad():
        for name in ("score_pool4", "score_pool3"):  # trained skip layers are not zero
            getattr(theirs, name).weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(8))
        theirs.upscore2.w.copy_(kernels["upscore2.w"])  # the fixed bilinear kernels (randomize touched them)
        theirs.upscore8.w.copy_(kernels["upscore8.w"])
    sd = theirs.state_dict()
    assert {"upscore2.w", "upscore_pool4.w", "upscore8.w"} <= set(sd)  # one Bilinear(2) module under two names
    path = tmp_path / "Multi_Source_SAD_CCD.pth"
    torch.save(sd, path)
    _, as_evaluated = up_fcn8s(19, pretrained=True, weights_init=str(path))  # eval_fcn.py's get_model(weights_init)
    off = "cycada/models/fcn8s.py:VGG16_FCN8s.forward"
    x = _rand(1, 3, 45, 61, seed=9, scale=1.5)
    for fmt, ref in (("madan", as_evaluated), ("madan_all", theirs)):
        ours, cfg, how = MR.load_segmenter(path, fmt)
        assert cfg["model"] == "fcn8s" and cfg["num_classes"] == 19
        ours.eval(), ref.eval()
        with torch.no_grad():
            H.compare(f"FCN8s scores, format {fmt}", ours(x)["out"], ref(x), official=off,
                      note="madan: upstream VGG16_FCN8s(weights_init=FILE); madan_all: load_state_dict(FILE)")
        del ours
    assert torch.count_nonzero(as_evaluated.score_pool4.weight) == 0  # upstream's load really leaves them at zero
    _, _, how = MR.load_segmenter(path)
    assert how.startswith("madan (auto-detected")


# ------------------------------------------------------------------------------------------------
# ADDA (scripts/train_fcn_adda.py, --weights_shared --discrim_score --no_lsgan as adda_cyclegta2cs_score.sh)
# ------------------------------------------------------------------------------------------------
class TinySegmenter(nn.Module):
    """A small segmenter for the ADDA / MDAN iterations (the algorithm does not depend on FCN8s, compared above):
    scores at the input resolution and a 'fc7' feature map (FeatureHook's FCN path: net(x, return_feat=True))."""

    def __init__(self, c=C, feat=16, width=16):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc7 = nn.Conv2d(width, feat, 1)
        self.score = nn.Conv2d(feat, c, 1)

    def forward(self, x, return_feat=False):
        f = F.relu(self.fc7(F.relu(self.conv(x))))
        out = {"out": self.score(f)}
        if return_feat:
            out["feat"] = f
        return out


class AsUpstream(nn.Module):
    """Upstream's view of TinySegmenter: VGG16_FCN8s returns the score tensor ((score, fc7 feature) with
    output_last_ft) and carries a `transform`."""
    transform = None

    def __init__(self, net, output_last_ft=False):
        super().__init__()
        self.net, self.output_last_ft = net, output_last_ft

    def forward(self, x):
        out = self.net(x, return_feat=True)
        return (out["out"], out["feat"]) if self.output_last_ft else out["out"]


def _no_dropout(module):
    """Driving shim: dropout p = 0 (the two codes draw their masks in a different order)."""
    for m in module.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d)):
            m.p = 0.0
    return module


def _cpu_to(obj):
    """Driving shim: upstream moves its networks with `.to(gpu_id)`; here they stay on the CPU."""
    obj.to = lambda *a, **k: obj
    return obj


def _cuda_torch():
    """Driving shim: the `torch` an upstream script sees, identical but for torch.cuda.is_available() -> True (the
    scripts assert a GPU before wrapping in DataParallel; the real DataParallel passes through on a CPU machine)."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.cuda = types.SimpleNamespace(**{**torch.cuda.__dict__, "is_available": lambda: True,
                                          "set_device": lambda *a, **k: None})
    return proxy


class _Writer:
    """Stand-in SummaryWriter that keeps the scalars."""
    scalars = []

    def __init__(self, *a, **k):
        _Writer.scalars = []

    def add_scalar(self, tag, value, step):
        _Writer.scalars.append((tag, float(value), step))

    def close(self):
        pass


def test_adda_losses():
    """Upstream's supervised_loss (NLL of log_softmax, ignore 255) as the source CE, the discriminator's 2-way CE on
    the concatenated score maps (source 1, target 0) and its accuracy, and the generator's CE against 'source',
    against madan/losses.py; the discriminator network on the same weights."""
    ad = H.load(REPO, "train_fcn_adda", "scripts")
    fcn = H.load(REPO, "cycada.models.fcn8s")
    off = "scripts/train_fcn_adda.py:main"
    score = _rand(2, C, 12, 16, seed=50, scale=3).requires_grad_()
    label = torch.randint(0, C, (2, 12, 16), generator=torch.Generator().manual_seed(51))
    label[:, :3] = 255
    s2 = score.detach().clone().requires_grad_()
    v_t, v_o = ad.supervised_loss(score, label), Lm.seg_ce(s2, label)
    v_t.backward(), v_o.backward()
    H.compare("source CE (supervised_loss): value", v_o, v_t, official="scripts/train_fcn_adda.py:supervised_loss")
    H.compare("source CE (supervised_loss): gradient", s2.grad, score.grad, official="scripts/train_fcn_adda.py:supervised_loss")
    theirs = H.randomize(fcn.Discriminator(input_dim=C, output_dim=2), seed=52).eval()
    ours = H.load_strict(Mm.AddaDiscriminator(C), H.rename(theirs.state_dict(), {"D.": "net."}))
    ours.eval()
    d_s, d_t = theirs(score.detach()[:1]), theirs(score.detach()[1:] * -1)
    H.compare("ADDA discriminator scores", ours(score.detach()[:1]), d_s, official="cycada/models/fcn8s.py:Discriminator")
    concat = torch.cat((d_s, d_t))
    lab = torch.cat([torch.ones(1, *d_s.shape[2:]).long(), torch.zeros(1, *d_t.shape[2:]).long()])
    H.compare("D loss: 2-way CE, source 1 / target 0", Lm.domain_ce_pair(d_s, d_t), ad.supervised_loss(concat, lab),
              official=off)
    acc_t = (torch.squeeze(concat.max(1)[1]) == lab).float().mean()
    H.compare("D accuracy", torch.tensor(Lm.domain_accuracy(d_s, d_t)), acc_t, official=off)
    H.compare("G loss: D(target) called 'source'", Lm.domain_ce(d_t, 1),
              ad.supervised_loss(d_t, torch.ones(1, *d_t.shape[2:]).long()), official=off)


ADDA_LR = 1e-2  # large enough for the update to show at 1e-5


def _adda_setup(seed=60):
    """Tiny segmenter + upstream/our discriminators on the same weights, and a batch on which D's accuracy (before
    its step) is above the 60% gate, so that the G and source-CE steps run in iteration 1."""
    fcn = H.load(REPO, "cycada.models.fcn8s")
    g = torch.Generator().manual_seed(seed)
    im_s = torch.randn(1, 3, 12, 16, generator=g) + 1.0
    im_t = torch.randn(1, 3, 12, 16, generator=g) - 1.0
    label_s = torch.randint(0, C, (1, 12, 16), generator=g)
    label_s[:, :2] = 255
    label_t = torch.randint(0, C, (1, 12, 16), generator=g)
    seg = H.randomize(TinySegmenter(), seed=seed)
    for k in range(50):
        d_t = _no_dropout(H.randomize(fcn.Discriminator(input_dim=C, output_dim=2), seed=seed + 1 + k))
        with torch.no_grad():
            acc = Lm.domain_accuracy(d_t(seg(im_s)["out"]), d_t(seg(im_t)["out"]))
            if acc < 0.35:  # 2-way: negating the last layer swaps the prediction
                d_t.D[6].weight.neg_(), d_t.D[6].bias.neg_()
                acc = 1 - acc
        if acc > 0.65:
            break
    assert acc > 0.65, acc
    d_o = _no_dropout(H.load_strict(Mm.AddaDiscriminator(C), H.rename(d_t.state_dict(), {"D.": "net."})))
    return seg, d_t, d_o, (im_s, im_t, label_s, label_t)


class _AddaLoader:
    """Stand-in for cycada's AddaDataLoader: one batch (im_s, im_t, label_s, label_t)."""

    def __init__(self, batch):
        self.batch = batch
        ds = types.SimpleNamespace(__getitem__=lambda *a, **k: None)
        self.loader_src = self.loader_tgt = types.SimpleNamespace(dataset=ds)

    def __iter__(self):
        return iter([tuple(t.clone() for t in self.batch)])

    def __len__(self):
        return 1


def run_adda_upstream(monkeypatch, tmp_path, seg, d_t, batch):
    """scripts/train_fcn_adda.py main() itself (adda_cyclegta2cs_score.sh's flags: --weights_shared --discrim_score
    --no_lsgan, lambda_d 1, lambda_g 0.1, momentum 0.9), one iteration, on `batch`."""
    net_t = _cpu_to(AsUpstream(copy.deepcopy(seg)))
    d_t = _cpu_to(d_t)
    with H.upstream(REPO, "scripts"), monkeypatch.context() as m:
        ad = importlib.import_module("train_fcn_adda")
        m.setattr(ad, "torch", _cuda_torch())
        m.setattr(ad, "get_model", lambda *a, **k: net_t)
        m.setattr(ad, "Discriminator", lambda *a, **k: d_t)
        m.setattr(ad, "AddaDataLoader", lambda *a, **k: _AddaLoader(batch))
        m.setattr(ad, "config_logging", lambda *a, **k: None)
        m.setattr(ad, "SummaryWriter", _Writer)
        m.setenv("CUDA_VISIBLE_DEVICES", "")
        m.chdir(tmp_path)
        rec = H.record_steps(m, classes=("SGD",))
        ad.main.callback(output=str(tmp_path / "up"), dataset=("cyclegta5", "cityscapes"), datadir="", lr=ADDA_LR,
                         momentum=0.9, snapshot=5000, downscale=None, cls_weights=None, gpu="0", weights_init=None,
                         num_cls=C, lsgan=False, max_iter=1, lambda_d=1.0, lambda_g=0.1, train_discrim_only=False,
                         weights_discrim=None, crop_size=None, weights_shared=True, discrim_feat=False, half_crop=None,
                         batch=1, model="fcn8s", data_flag=None, resize=None, with_mmd_loss=False, small=0)
    return net_t.net, d_t, rec


def run_adda_ours(monkeypatch, tmp_path, seg, d_o, batch):
    ta = importlib.import_module("madan.train_adda")
    im_s, im_t, label_s, _ = batch
    init = tmp_path / "init.pth"
    init.touch()
    args = ta.parse_args(["--source", "gta5", "--source-root", str(tmp_path), "--target", "cityscapes", "--target-root",
                          str(tmp_path), "--init-from", str(init), "--iters", "1", "--batch-size", "1", "--lr",
                          str(ADDA_LR), "--lambda-d", "1", "--lambda-g", "0.1", "--discrim", "score", "--pretrain-d", "0",
                          "--stall-stop", "0", "--random-mirror", "0", "--amp", "off", "--device", "cpu", "--workers", "0",
                          "--eval-every", "1000", "--save-every", "1000", "--out", str(tmp_path / "ours")])
    model = copy.deepcopy(seg)
    loaders = iter([iter(lambda: {"image": im_s.clone(), "label": label_s.clone()}, None),
                    iter(lambda: {"image": im_t.clone()}, None)])
    with monkeypatch.context() as m:
        m.setattr(ta, "load_segmenter", lambda *a, **k: (model, {"num_classes": args.num_classes, "norm": "imagenet"},
                                                         "ours"))
        m.setattr(ta, "AddaDiscriminator", lambda *a, **k: d_o)
        stub_script_io(m, ta, loaders)
        rec = H.record_steps(m, classes=("SGD",))
        ta.main(args)
    return model, d_o, rec


def test_adda_iteration(monkeypatch, tmp_path):
    """One iteration of train_fcn_adda.py (D step on detached scores; its accuracy opens the gate; G step with the
    target called 'source', lambda_g 0.1; source-CE step; SGD momentum 0.9, wd 5e-4) vs our train_adda.py: the
    segmenter's and the discriminator's weights and SGD momentum buffers after the iteration. Driving shims: see
    the module docstring (dropout p = 0 in both discriminators)."""
    seg, d_t, d_o, batch = _adda_setup()
    net_t, d_t, rec_t = run_adda_upstream(monkeypatch, tmp_path, seg, d_t, batch)
    net_o, d_o, rec = run_adda_ours(monkeypatch, tmp_path, seg, d_o, batch)
    off = "scripts/train_fcn_adda.py:main"
    assert [len(r.lrs) for r in rec] == [len(r.lrs) for r in rec_t] == [1, 2]  # D: 1 step; segmenter: G + source CE
    H.compare_states("ADDA segmenter weights after the iteration", net_o.state_dict(), net_t.state_dict(), official=off)
    H.compare_states("ADDA discriminator weights after the iteration", d_o.state_dict(),
                     H.rename(d_t.state_dict(), {"D.": "net."}), official=off)
    H.compare_states("ADDA segmenter SGD momentum buffers", H.state_by_name(rec[1].optimizer.state, net_o),
                     H.state_by_name(rec_t[1].optimizer.state, net_t), official=off)
    H.compare_states("ADDA discriminator SGD momentum buffers", H.state_by_name(rec[0].optimizer.state, d_o),
                     H.state_by_name(rec_t[0].optimizer.state, d_t, lambda k: "net." + k[2:]), official=off)
    moved = max(float((a - b).abs().max()) for a, b in zip(net_o.state_dict().values(), seg.state_dict().values()))
    assert moved > 1e-3  # the iteration did move the segmenter (the comparison is not of two untouched copies)


# ------------------------------------------------------------------------------------------------
# MDAN (cycada/models/MDAN.py, scripts/train_fcn_mdan.py)
# ------------------------------------------------------------------------------------------------
class _StaticGRL(torch.autograd.Function):
    """upstream's GradientReversalLayer as a static Function: identity forward, negated gradient (the same maps)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _GRLShim:
    """Compatibility shim for the instance-style GradientReversalLayer, which current PyTorch refuses to run."""

    def __call__(self, x):
        return _StaticGRL.apply(x)


def test_gradient_reversal():
    """Listed deviation: upstream's GradientReversalLayer is an old-style (instance) autograd.Function, which PyTorch
    >= 1.5 refuses; called directly, its backward negates the gradient, as our static GradReverse does."""
    md = H.load(REPO, "cycada.models.MDAN")
    x = _rand(3, 7, seed=70).requires_grad_()
    with pytest.raises(RuntimeError, match="Legacy autograd function"):
        md.GradientReversalLayer()(x)
    g = _rand(3, 7, seed=71)
    y = Mm.grad_reverse(x)
    H.compare("GRL forward (identity)", y, md.GradientReversalLayer().forward(x.detach()),
              official="cycada/models/MDAN.py:GradientReversalLayer.forward")
    (ours,) = torch.autograd.grad(y, x, g)
    H.compare("GRL backward (negated gradient)", ours, md.GradientReversalLayer().backward(g),
              official="cycada/models/MDAN.py:GradientReversalLayer.backward",
              note="listed deviation: upstream's instance-style Function fails on current PyTorch")


class _MdanData(torch.utils.data.Dataset):
    """Stand-in for get_fcn_dataset: one (image, label) item, whatever the index (and the debug call)."""

    def __init__(self, im, label):
        self.im, self.label = im, label

    def __getitem__(self, i, debug=False):
        return self.im[0].clone(), self.label[0].clone()

    def __len__(self):
        return 1


class _Stop(Exception):
    pass


class _StopWriter(_Writer):
    """Keeps the iteration-0 scalars, then stops upstream's never-ending loop (listed: it has no stop)."""

    def add_scalar(self, tag, value, step):
        super().add_scalar(tag, value, step)
        if tag == "task":
            raise _Stop


def _tensor_to_cpu(real):
    def to(self, *args, **kwargs):  # driving shim: `.to(gpu_id)` stays on the CPU
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            args = args[1:]
            if not args and not kwargs:
                return self
        return real(self, *args, **kwargs)
    return to


HEAD_KEYS = {"reduce.": "dim_reduction.", "mlp.0.": "hiddens.0.", "mlp.2.": "hiddens.1.", "mlp.4.": "hiddens.2."}


def head_from_mdanet(sd, j):
    """Our DomainClassifier for source j from MDANet's (state dict's) shared layers (dim_reduction, hiddens) and its
    domains[j]: the same function forward (ours reverses the gradient in front of the head, upstream between hiddens
    and domains[j]; upstream shares the layers across sources: listed deviations). Returns (head, {ours: theirs})."""
    names = {**{o + k[len(t):]: k for o, t in HEAD_KEYS.items() for k in sd if k.startswith(t)},
             "mlp.6.weight": f"domains.{j}.weight", "mlp.6.bias": f"domains.{j}.bias"}
    return H.load_strict(Mm.DomainClassifier(4096), {o: sd[t].clone() for o, t in names.items()}), names


def _mdan_batch(seed=80):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shift in (("syn", 0.5), ("gta", -0.5), ("cs", 0.0)):
        lab = torch.randint(0, C, (1, 8, 12), generator=g)
        lab[:, :1] = 255
        out[k] = (torch.randn(1, 3, 8, 12, generator=g) + shift, lab)
    return out


def run_mdan_upstream(monkeypatch, tmp_path, seg, batch):
    """scripts/train_fcn_mdan.py main() itself, one iteration (its loop never ends: stopped by the writer after
    iteration 0's scalars), MDANet built with the GRL shim. Returns (segmenter, MDANet, Adam record, scalars)."""
    net_t = _cpu_to(AsUpstream(copy.deepcopy(seg), output_last_ft=True))
    data = {"cyclesynthia": _MdanData(*batch["syn"]), "cyclegta5": _MdanData(*batch["gta"]),
            "cityscapes": _MdanData(*batch["cs"])}
    with H.upstream(REPO, "scripts"), monkeypatch.context() as m:
        tm = importlib.import_module("train_fcn_mdan")
        md = importlib.import_module("cycada.models.MDAN")
        m.setattr(md, "GradientReversalLayer", _GRLShim)
        configs = {"input_dim": 2048, "hidden_layers": [1000, 500, 100], "num_classes": 2, "num_domains": 2}
        torch.manual_seed(81)
        mdanet = _cpu_to(md.MDANet(configs))
        init = H.clone_state(mdanet)
        m.setattr(tm, "torch", _cuda_torch())
        m.setattr(tm, "get_model", lambda *a, **k: net_t)
        m.setattr(tm, "MDANet", lambda *a, **k: mdanet)
        m.setattr(tm, "get_dataset", lambda name, *a, **k: data[name])
        m.setattr(tm, "config_logging", lambda *a, **k: None)
        m.setattr(tm, "SummaryWriter", _StopWriter)
        m.setattr(torch.Tensor, "to", _tensor_to_cpu(torch.Tensor.to))
        m.setenv("CUDA_VISIBLE_DEVICES", "")
        m.chdir(tmp_path)
        rec = H.record_steps(m, classes=("Adam",))
        with pytest.raises(_Stop):
            tm.main.callback(output=str(tmp_path / "up"), dataset=("cyclesynthia", "cyclegta5"), target_name="cityscapes",
                             datadir="", batch_size=1, lr=1e-3, iterations=1, momentum=0.9, snapshot=5000, downscale=None,
                             augmentation=False, fyu=False, crop_size=720, weights=None, model="fcn8s", gpu="0",
                             num_cls=C, nthreads=0, model_weights=None, data_flag="", serial_batches=True, resize_to=720,
                             start_step=0, preprocessing=False, small=0, rundir_flag="")
    return net_t.net, mdanet, init, rec, dict((t, v) for t, v, _ in _Writer.scalars)


def run_mdan_ours(monkeypatch, tmp_path, seg, heads, batch, task_sum):
    """Our train_mdan.py main(), one iteration; task_sum: madan.losses.mdan_loss given upstream's task term (the sum
    of both sources' task losses in every source's term, a listed deviation) instead of each source's own."""
    tmd = importlib.import_module("madan.train_mdan")
    init = tmp_path / "init.pth"
    init.touch()
    args = tmd.parse_args(["--source", "synthia,gta5", "--source-root", f"{tmp_path},{tmp_path}", "--target",
                           "cityscapes", "--target-root", str(tmp_path), "--init-from", str(init), "--iters", "1",
                           "--batch-size", "1", "--lr", "1e-4", "--amp", "off", "--device", "cpu", "--workers", "0",
                           "--eval-every", "1000", "--save-every", "1000", "--num-classes", "19",
                           "--out", str(tmp_path / "ours")])
    model = copy.deepcopy(seg)
    heads = list(heads)
    loaders = iter([iter(lambda: {"image": batch["syn"][0].clone(), "label": batch["syn"][1].clone()}, None),
                    iter(lambda: {"image": batch["gta"][0].clone(), "label": batch["gta"][1].clone()}, None),
                    iter(lambda: {"image": batch["cs"][0].clone()}, None)])
    real = Lm.mdan_loss
    with monkeypatch.context() as m:
        m.setattr(tmd, "load_segmenter", lambda *a, **k: (model, {"num_classes": 19, "norm": "imagenet"}, "ours"))
        m.setattr(tmd, "DomainClassifier", lambda *a, **k: heads.pop(0))
        stub_script_io(m, tmd, loaders)
        if task_sum:
            m.setattr(Lm, "mdan_loss", lambda tasks, doms, *a, **k: real([sum(tasks)] * len(tasks), doms, *a, **k))
        rec = H.record_steps(m, classes=("Adam",))
        tmd.main(args)
    return model, rec


def test_mdan_losses_and_iteration(monkeypatch, tmp_path):
    """Upstream's one iteration (segmenter + MDANet, Adam 1e-4, both grad norms clipped at 10) beside ours from the
    same weights and batch, our heads loaded from MDANet's layers. Values: each source's domain loss, the summed task
    loss, and the dynamic aggregation (1/gamma) log sum_j exp(gamma (T + mu D_j)), gamma 10, mu 1e-2, which ours
    reproduces with upstream's T = the sum of both task losses (listed deviation: ours uses each source's own).
    After the step, with that one deviation switched to upstream's convention: the segmenter (weights and Adam
    buffers) and each domain layer domains[j] agree; MDANet's shared layers receive minus the sum of our two heads'
    gradients (listed deviation: one head per source behind the reversal; upstream's shared MLP sits in front of it)."""
    seg = H.randomize(TinySegmenter(feat=4096), seed=82)
    batch = _mdan_batch()
    seg_t, mdanet, mdanet_init, rec_t, scalars = run_mdan_upstream(monkeypatch, tmp_path, seg, batch)
    off = "scripts/train_fcn_mdan.py:main"
    heads = [head_from_mdanet(mdanet_init, j)[0] for j in range(2)]  # MDANet's weights before the step
    names = head_from_mdanet(mdanet_init, 0)[1]
    # values of iteration 0 (upstream's logged scalars) from our losses on the same tensors
    with torch.no_grad():
        feats = {k: seg(batch[k][0], return_feat=True) for k in batch}
        tasks = [Lm.seg_ce(feats[k]["out"], batch[k][1]) for k in ("syn", "gta")]
        doms = [Lm.domain_ce(heads[j](feats[k]["feat"])[..., None, None], 1)
                + Lm.domain_ce(heads[j](feats["cs"]["feat"])[..., None, None], 0) for j, k in enumerate(("syn", "gta"))]
    H.compare("MDAN task loss (sum over the two sources)", sum(tasks), torch.tensor(scalars["task"]), official=off)
    H.compare("MDAN domain loss, SYNTHIA", doms[0], torch.tensor(scalars["domain_syn"]), official=off)
    H.compare("MDAN domain loss, GTA5", doms[1], torch.tensor(scalars["domain_gta"]), official=off)
    H.compare("MDAN dynamic loss, upstream's task term (sum) in every source's term",
              Lm.mdan_loss([sum(tasks)] * 2, doms, 1e-2, 10.0), torch.tensor(scalars["loss"]), official=off,
              note="listed deviation: ours puts each source's own task loss in its term")
    ours_value = Lm.mdan_loss(tasks, doms, 1e-2, 10.0)
    H.record("MDAN dynamic loss, ours (each source's task loss) vs upstream (listed deviation, not equal)",
             abs(float(ours_value) - scalars["loss"]), abs(float(ours_value) - scalars["loss"]) / abs(scalars["loss"]),
             False, official=off, note="the sum of the two task losses vs each source's own")
    # one iteration, our script with upstream's task convention
    model, rec = run_mdan_ours(monkeypatch, tmp_path, seg, heads, batch, task_sum=True)
    assert len(rec) == len(rec_t) == 1 and len(rec[0].lrs) == len(rec_t[0].lrs) == 1
    recorded, recorded_t = (rec[0].params, rec[0].state), (rec_t[0].params, rec_t[0].state)
    compare_adam_step("MDAN segmenter", model, seg_t, lambda k: k, recorded, recorded_t, official=off)
    st_t = H.state_by_name(rec_t[0].state, mdanet)
    for j in range(2):
        st = H.state_by_name(rec[0].state, heads[j])
        for buf in ("exp_avg", "exp_avg_sq"):
            H.compare(f"MDAN domain layer {j} Adam {buf} (weight and bias)",
                      torch.cat([st[f"mlp.6.{p}:{buf}"].flatten() for p in ("weight", "bias")]),
                      torch.cat([st_t[f"domains.{j}.{p}:{buf}"].flatten() for p in ("weight", "bias")]), official=off)
    st0, st1 = (H.state_by_name(rec[0].state, h) for h in heads)
    shared = [o for o in names if not o.startswith("mlp.6.")]
    H.compare("MDAN shared layers: upstream's gradient = -(our two heads' gradients), Adam exp_avg",
              torch.cat([-(st0[f"{o}:exp_avg"] + st1[f"{o}:exp_avg"]).flatten() for o in shared]),
              torch.cat([st_t[f"{names[o]}:exp_avg"].flatten() for o in shared]), official=off,
              note="listed deviation: ours one head per source behind the reversal; upstream's MLP shared, in front")
