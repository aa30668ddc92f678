"""MADAN (madan/): every loss term against a direct evaluation of its formula, gradient reversal, the
image pool, the networks, FCN8s-VGG16 (common/fcn.py) with strict VGG16 loading, the translated datasets
read back by the common readers (SYNTHIA's 16-bit labels included), and every script end to end on a
tiny copy of the toy domains (SEGDA_DATA), with resume (the GAN's full state: networks, optimisers, image pools, RNG)."""
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_script, run_torchrun
from madan import losses as Lm
from madan.models import (AddaDiscriminator, DomainClassifier, FeatureHook, ImagePool, PatchDiscriminator,
                          ResnetGenerator, grad_reverse)
from madan.util import gan_to_norm, norm_to_gan, split_list


# ---------------------------------------------------------------------------------------------- losses
def test_lsgan_cycle_and_discriminator_loss():
    torch.manual_seed(0)
    p, r, f = torch.randn(2, 1, 5, 6), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert torch.isclose(Lm.lsgan(p, True), ((p - 1) ** 2).mean())
    assert torch.isclose(Lm.lsgan(p, False), (p ** 2).mean())
    assert torch.isclose(Lm.cycle(r, f), (r - f).abs().mean())
    D = torch.nn.Conv2d(3, 1, 3)
    f.requires_grad_(True)
    want = 0.5 * (((D(r) - 1) ** 2).mean() + (D(f) ** 2).mean())
    got = Lm.d_loss(D, r, f)
    assert torch.isclose(got, want)
    got.backward()
    assert f.grad is None  # the fake is detached: D's loss never reaches the generator


def test_dsc_is_the_mean_elementwise_kl():
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5, requires_grad=True)
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    p, q = p.detach(), q.detach()
    direct = sum(float(p[n, c, y, x] * (math.log(p[n, c, y, x]) - math.log(q[n, c, y, x])))
                 for n in range(2) for c in range(4) for y in range(3) for x in range(5)) / a.numel()
    got = Lm.dsc(a, b)
    assert abs(got.item() - direct) < 1e-6
    # upstream's form: KLDivLoss(batchmean)(log q, p) / (C*H*W)
    upstream = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(b, 1), p) / (4 * 3 * 5)
    assert torch.isclose(got, upstream, atol=1e-6)
    assert Lm.dsc(a, a).abs().item() < 1e-7
    got.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_sad_and_ccd_terms():
    torch.manual_seed(0)
    D = torch.nn.Conv2d(3, 1, 3)
    anchor, other = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8, requires_grad=True)
    assert torch.isclose(Lm.sad_generator(D, other), ((D(other) - 1) ** 2).mean())
    assert torch.isclose(Lm.sad_discriminator(D, anchor, other),
                         0.5 * (((D(anchor) - 1) ** 2).mean() + (D(other) ** 2).mean()))
    real_i, fake_ij = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    assert torch.isclose(Lm.ccd_generator(D, fake_ij), ((D(fake_ij) - 1) ** 2).mean())
    assert torch.isclose(Lm.ccd_discriminator(D, real_i, fake_ij),
                         0.5 * (((D(real_i) - 1) ** 2).mean() + (D(fake_ij) ** 2).mean()))


def test_linear_lr_decay():
    f = [Lm.linear_decay(e, niter=2, niter_decay=2) for e in range(4)]
    assert f[0] == f[1] == 1.0 and abs(f[2] - (1 - 1 / 3)) < 1e-9 and abs(f[3] - (1 - 2 / 3)) < 1e-9


def test_adda_discriminator_loss_accuracy_and_gate():
    torch.manual_seed(0)
    ls, lt = torch.randn(2, 2, 3, 4), torch.randn(1, 2, 5, 4)
    ce_s = -F.log_softmax(ls, 1)[:, 1].sum()
    ce_t = -F.log_softmax(lt, 1)[:, 0].sum()
    assert torch.isclose(Lm.domain_ce_pair(ls, lt), (ce_s + ce_t) / (24 + 20))
    acc = ((ls.argmax(1) == 1).sum() + (lt.argmax(1) == 0).sum()).item() / 44
    assert abs(Lm.domain_accuracy(ls, lt) - acc) < 1e-7
    gate = Lm.AccuracyGate(threshold=60, window=3)
    assert not gate.update(0.5)               # 50 %
    assert gate.update(0.9)                   # (50 + 90) / 2 = 70 % > 60
    assert gate.update(0.3) is False          # (50 + 90 + 30) / 3 = 56.7 %
    assert gate.update(0.9)                   # window 3: (90 + 30 + 90) / 3 = 70 %
    assert abs(gate.mean() - 70.0) < 1e-4


def test_mdan_aggregation():
    tasks = [torch.tensor(1.0), torch.tensor(2.0)]
    doms = [torch.tensor(0.5), torch.tensor(0.7)]
    mu, gamma = 1e-2, 10.0
    want = math.log(sum(math.exp(gamma * (t + mu * d)) for t, d in ((1.0, 0.5), (2.0, 0.7)))) / gamma
    assert abs(Lm.mdan_loss(tasks, doms, mu, gamma).item() - want) < 1e-5
    assert abs(Lm.mdan_loss(tasks, doms, mu, gamma, "maxmin").item() - (2.0 + mu * 0.5)) < 1e-6
    # a smooth max: above the largest L_j, by at most log(N)/gamma
    big = 2.0 + mu * 0.7
    assert big <= Lm.mdan_loss(tasks, doms, mu, gamma).item() <= big + math.log(2) / gamma + 1e-6


def test_gradient_reversal_flips_and_scales():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.5 * w)
    # inside MDAN's domain head: the feature gets minus the head's gradient, the head a normal one
    torch.manual_seed(0)
    head = DomainClassifier(8, hidden=(6,))
    feat = torch.randn(2, 8, 4, 4, requires_grad=True)
    Lm.domain_ce(head(feat, 1.0)[..., None, None], 1).backward()
    g_rev, g_head = feat.grad.clone(), head.mlp[0].weight.grad.clone()
    head.zero_grad()
    feat2 = feat.detach().clone().requires_grad_(True)
    x = head.reduce(head.pool(feat2))
    Lm.domain_ce(head.mlp(x.flatten(1))[..., None, None], 1).backward()
    assert torch.allclose(g_rev, -feat2.grad, atol=1e-6)
    assert torch.allclose(g_head, head.mlp[0].weight.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------- networks
def test_image_pool_and_its_state():
    pool = ImagePool(2, seed=3)
    a, b = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    assert torch.equal(pool.query(a), a) and torch.equal(pool.query(b), b)  # filling: returned as given
    state = pool.state_dict()
    outs = [pool.query(torch.full((1, 3, 2, 2), float(v))) for v in range(2, 8)]
    assert all(o.shape == (1, 3, 2, 2) for o in outs)
    assert any(o[0, 0, 0, 0].item() in (0.0, 1.0) for o in outs)  # sometimes a stored (older) image comes back
    again = ImagePool(2, seed=99)
    again.load_state_dict(state)
    assert all(torch.equal(o, again.query(torch.full((1, 3, 2, 2), float(v)))) for o, v in zip(outs, range(2, 8)))


def test_generator_and_patch_discriminator():
    g = ResnetGenerator(ngf=4, n_blocks=2, dropout=True)
    x = torch.rand(2, 3, 30, 50) * 2 - 1  # any size: padded to a multiple of 4 and cropped back
    y = g(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    d = PatchDiscriminator(ndf=4, n_layers=3)
    assert d(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)  # 70x70 PatchGAN on 64x64
    assert AddaDiscriminator(19)(torch.randn(1, 19, 5, 5)).shape == (1, 2, 5, 5)
    assert AddaDiscriminator(4096).net[0].out_channels == 1024


def test_input_normalisation_roundtrip():
    from common.transforms import to_tensor
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8))
    for norm in ("imagenet", "caffe"):
        x = to_tensor(img, norm)[None]
        g = norm_to_gan(x, norm)
        assert g.min() >= -1 - 1e-5 and g.max() <= 1 + 1e-5
        assert torch.allclose(gan_to_norm(g, norm), x, atol=1e-4)
    assert split_list("a, b,,c") == ["a", "b", "c"] and split_list(None) == []


def test_fcn8s_shapes_strict_vgg16_loading_and_checkpoint(tmp_path):
    import torchvision
    from common.fcn import load_vgg16_weights, make_segmenter, segmenter_from_checkpoint
    from common.models import WeightLoadError
    with torch.device("meta"):  # torchvision's VGG16 keys and shapes, without building the 138M weights
        meta = torchvision.models.vgg16(weights=None).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.rand(v.shape, generator=g).half() for k, v in meta.items()}  # half: a smaller file
    torch.save(sd, tmp_path / "vgg16.pth")
    net, cfg = make_segmenter("fcn8s", "vgg16", 3, str(tmp_path / "vgg16.pth"))
    assert cfg["norm"] == "imagenet" and cfg["model"] == "fcn8s"
    assert torch.equal(net.features[0].weight, sd["features.0.weight"].float())
    assert torch.equal(net.fc6.weight.flatten(1), sd["classifier.0.weight"].float())
    assert torch.equal(net.fc7.weight.flatten(1), sd["classifier.3.weight"].float())
    out = net.eval()(torch.randn(1, 3, 21, 35), return_feat=True)
    assert out["out"].shape == (1, 3, 21, 35) and out["feat"].shape[1] == 4096
    torch.save({"features.0.weight": sd["features.0.weight"], "classifier.6.bias": sd["classifier.6.bias"]},
               tmp_path / "bad.pth")
    with pytest.raises(WeightLoadError, match="missing keys: fc6.bias, fc6.weight, fc7.bias, fc7.weight, features.0.bias"):
        load_vgg16_weights(net, tmp_path / "bad.pth")
    del net, sd
    # checkpoints of the DeepLab models load through the same function (FCN8s ones: same code path)
    dl, dcfg = make_segmenter("deeplabv2", "resnet18", 3, "scratch", multi_level=False)
    torch.save({"model": dl.state_dict(), "config": dcfg}, tmp_path / "dl.pth")
    assert segmenter_from_checkpoint(tmp_path / "dl.pth")[1]["model"] == "deeplabv2"
    hook = FeatureHook(dl.eval())
    s, f = hook(dl, torch.randn(1, 3, 32, 32))
    assert s.shape[1] == 3 and f.shape[1] == hook.channels() == 512


# ---------------------------------------------------------------------------------------------- end to end
def make_tiny_toy(dest, n_train=4, n_eval=2):
    """A copy of the first few toy images of every domain (same layouts), for fast end-to-end runs."""
    from common.toy import ensure_toy
    src = ensure_toy()
    dest = dest / "toy"
    for d, img_dir, lbl_dir in (("toy_gta5", "images", "labels"), ("toy_synthia", "RGB", "GT/LABELS")):
        names = (src / d / "lists/train.txt").read_text().split()[:n_train]
        vnames = (src / d / "lists/val.txt").read_text().split()[:n_eval]
        for n in names + vnames:
            for sub in (img_dir, lbl_dir):
                (dest / d / sub).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / d / sub / n, dest / d / sub / n)
        (dest / d / "lists").mkdir(parents=True, exist_ok=True)
        (dest / d / "lists/train.txt").write_text("\n".join(names) + "\n")
        (dest / d / "lists/val.txt").write_text("\n".join(vnames) + "\n")
    cs = src / "toy_cityscapes"
    for split, k in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        for p in sorted((cs / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[:k]:
            city, stem = p.parent.name, p.name[: -len("_leftImg8bit.png")]
            lbl = f"{stem}_gtFine_labelIds.png"
            for a, b in ((p, dest / "toy_cityscapes/leftImg8bit" / split / city / p.name),
                         (cs / "gtFine" / split / city / lbl, dest / "toy_cityscapes/gtFine" / split / city / lbl)):
                b.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(a, b)
    (dest / "DONE.json").write_text((src / "DONE.json").read_text())
    return dest.parent


def test_scripts_end_to_end_with_resume(tmp_path):
    from common.datasets import build_dataset, read_png16
    env = {"SEGDA_DATA": str(make_tiny_toy(tmp_path))}
    tiny = ["--batch-size", "1", "--workers", "0"]
    small = ["--crop-size", "36,64"]
    run = lambda script, *a: run_script(f"madan/{script}", *a, env=env)  # noqa: E731
    # 1. per-source classifiers (DSC), 2 iterations each
    cls_args = ["--iters", "2", "--eval-every", "2", *tiny, *small, "--out", tmp_path / "cls"]
    run("train_classifiers.py", *cls_args)
    clf = ",".join(str(tmp_path / "cls" / s / "model.pth") for s in ("toy_synthia", "toy_gta5"))
    #    --resume keeps a finished source and starts one that never started (here: removed) from iteration 0
    kept = (tmp_path / "cls" / "toy_synthia" / "model.pth").read_bytes()
    shutil.rmtree(tmp_path / "cls" / "toy_gta5")
    p = run("train_classifiers.py", *cls_args, "--resume")
    assert "toy_synthia finished already" in p.stdout and "resumed" not in p.stdout
    assert (tmp_path / "cls" / "toy_synthia" / "model.pth").read_bytes() == kept
    assert json.loads((tmp_path / "cls" / "toy_gta5" / "final.json").read_text())["iters"] == 2
    # 2. translation with every term active from the first step (DSC, SAD, CCD, HF-CCD), stopped and resumed
    tr = ["--classifiers", clf, "--epoch-iters", "1", "--max-epoch", "3", "--sad-frozen-epoch", "0",
          "--ccd-frozen-epoch", "0", "--hf-ccd", "--save-every", "2", "--fine-size", "32,64", *tiny,
          "--out", tmp_path / "tr"]
    run("train_translation.py", *tr, "--stop-iter", "2")
    run("train_translation.py", *tr, "--resume")
    logs = [json.loads(line) for line in (tmp_path / "tr" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" and r["iter"] == 2 for r in logs)
    last = [r for r in logs if "loss_G" in r][-1]
    assert last["iter"] == 2 and {"dsc0", "dsc1", "sad0", "ccd01", "ccd10", "D_3_0", "D_01"} <= set(last)
    assert json.loads((tmp_path / "tr" / "final.json").read_text())["iters"] == 3
    # 3. translated sources in their real formats, read back by the common readers
    run("translate.py", "--checkpoint", tmp_path / "tr" / "model.pth", "--out", tmp_path / "translated")
    translated = {}
    for name, kind in (("toy_synthia", "synthia"), ("toy_gta5", "gta5")):
        orig = build_dataset(kind, tmp_path / "toy" / name, "lists/train.txt", num_classes=16)
        new = translated[name] = build_dataset(kind, tmp_path / "translated" / name, "lists/train.txt", num_classes=16)
        assert len(new) == len(orig) == 4
        item, ref = new[0], orig[0]
        assert item["image"].shape == ref["image"].shape and torch.equal(item["label"], ref["label"])
        assert not torch.equal(item["image"], ref["image"])
    lbl = read_png16(translated["toy_synthia"].files[0][1])
    assert lbl.dtype == np.uint16 and lbl.ndim == 3  # 16-bit, multi-channel, as SYNTHIA's
    assert (tmp_path / "translated" / "grid.png").exists()
    # 4. segmenter on the translated sources (aggregated)
    roots = ",".join(str(tmp_path / "translated" / s) for s in ("toy_synthia", "toy_gta5"))
    run("train_segmenter.py", "--source-root", roots, "--iters", "2", "--eval-every", "2", *tiny, *small, "--out", tmp_path / "seg")
    fin = json.loads((tmp_path / "seg" / "final.json").read_text())
    assert fin["iters"] == 2 and fin["sources"] == ["toy_synthia", "toy_gta5"]
    # 5. ADDA on features with the gate open from the start; 6. MDAN; 7. test.py on the held-out split
    run("train_adda.py", "--source-root", roots, "--init-from", tmp_path / "seg" / "model.pth", "--discrim", "feat",
        "--gate", "0", "--iters", "2", "--eval-every", "2", *tiny, *small, "--out", tmp_path / "adda")
    assert json.loads((tmp_path / "adda" / "final.json").read_text())["g_updates"] == 2
    run("train_mdan.py", "--init-from", tmp_path / "seg" / "model.pth", "--iters", "2", "--eval-every", "2", *tiny, *small,
        "--out", tmp_path / "mdan")
    run("test.py", "--checkpoint", tmp_path / "adda" / "model.pth", "--split", "test", "--workers", "0",
        "--out", tmp_path / "eval")
    res = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert res["split"] == "test" and 0 <= res["mIoU"] <= 100 and "mIoU13" in res["last"]
    # 8. the AdaBN control on the MDAN model (toy DeepLab: has BN)
    p = run("test.py", "--checkpoint", tmp_path / "mdan" / "model.pth", "--split", "test", "--adabn", "--workers", "0",
            "--out", tmp_path / "eval_adabn")
    assert "AdaBN: BN statistics re-estimated on" in p.stdout
    assert json.loads((tmp_path / "eval_adabn" / "final.json").read_text())["adabn"] is True


def test_pipeline_resumes_an_interrupted_training_step(tmp_path, monkeypatch):
    """run_pipeline.py re-run after a stop: a finished step is skipped, a training step whose run folder (or a
    per-source subfolder, for the classifiers) holds a checkpoint gets --resume, any other step runs as is."""
    from madan import run_pipeline
    calls = []
    monkeypatch.setattr(run_pipeline.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd[1:]) or subprocess.CompletedProcess(cmd, 0))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "final.json").write_text("{}")
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "checkpoint.pth").write_bytes(b"")
    (tmp_path / "cls" / "toy_gta5").mkdir(parents=True)
    (tmp_path / "cls" / "toy_gta5" / "checkpoint.pth").write_bytes(b"")
    log = tmp_path / "pipeline.log"
    step = lambda script, out: run_pipeline.step([f"madan/{script}", "--out", str(tmp_path / out)],  # noqa: E731
                                                 tmp_path / out / "final.json", log)
    assert step("train_segmenter.py", "done") == 0.0 and calls == []
    step("train_segmenter.py", "seg")
    step("train_classifiers.py", "cls")
    step("train_adda.py", "adda")
    step("translate.py", "seg")
    assert [c[-1] == "--resume" for c in calls] == [True, True, False, False]


def test_translation_and_segmenter_under_torchrun(tmp_path):
    """Two processes: the multi-source CycleGAN (DDP generators/discriminators; SAD and CCD on, DSC off as it needs classifiers) and the
    aggregated segmenter train and save once."""
    env = {"SEGDA_DATA": str(make_tiny_toy(tmp_path))}
    tiny = ["--batch-size", "1", "--workers", "0"]
    tr = ["--epoch-iters", "1", "--max-epoch", "2", "--sad-frozen-epoch", "0", "--ccd-frozen-epoch", "0",
          "--fine-size", "32,64", "--dsc", "0", *tiny, "--out", tmp_path / "tr"]
    p = run_torchrun("madan/train_translation.py", *tr, env=env)
    assert json.loads((tmp_path / "tr" / "final.json").read_text())["iters"] == 2
    p = run_torchrun("madan/train_segmenter.py", "--iters", "2", "--eval-every", "2", "--crop-size", "36,64", *tiny,
                     "--out", tmp_path / "seg", env=env)
    assert json.loads((tmp_path / "seg" / "final.json").read_text())["sources"] == ["toy_synthia", "toy_gta5"]


def test_zero_skips_resets_only_the_fcn8s_skip_layers_as_upstream_loads_them():
    """--zero-skips (the released behaviour of train_fcn_adda.py --weights_init): score_pool3/4 back to 0, every
    other weight as loaded; a segmenter without FCN8s skips is refused."""
    from common.fcn import FCN8s
    from madan.train_adda import zero_skips
    net = FCN8s(num_classes=4)
    with torch.no_grad():
        for prm in net.parameters():
            prm.uniform_(0.5, 1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert zero_skips(net) == ["score_pool3", "score_pool4"]
    for k, v in net.state_dict().items():
        if k.startswith(("score_pool3.", "score_pool4.")):
            assert not v.any(), k
        else:
            assert torch.equal(v, before[k]), k
    with pytest.raises(SystemExit, match="needs an FCN8s"):
        zero_skips(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)))
