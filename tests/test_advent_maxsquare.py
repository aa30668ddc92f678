"""advent_maxsquare/: AdaptSegNet, ADVENT (MinEnt/AdvEnt) and MaxSquare (MS/IW/multi).
Unit tests of every target loss against a direct evaluation of the paper's formula, the discriminator's
domain labels (seed 003's bug), and each script end-to-end on a tiny copy of the toy domains
(subprocess, as a user runs it): resume, --init-from (strict), torchrun, test.py's ensemble."""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import EXACT, ROOT, run_script, run_torchrun


def _load(name):
    spec = importlib.util.spec_from_file_location(f"am_{name}", ROOT / "advent_maxsquare" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


advent, adaptseg, maxsq = _load("train_advent"), _load("train_adaptseg"), _load("train_maxsquare")


def _probs(b=2, c=5, h=3, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.softmax(3 * torch.randn(b, c, h, w, generator=g), 1)


# ---------------------------------------------------------------------------------------------- ADVENT
def test_self_information_and_entropy_loss_match_the_formula():
    p = _probs(2, 5, 3, 4)
    n, c, h, w = p.shape
    info = advent.self_information(p)
    for (i, k, y, x) in [(0, 0, 0, 0), (1, 3, 2, 1), (1, 4, 0, 3)]:
        v = float(p[i, k, y, x])
        assert math.isclose(float(info[i, k, y, x]), -v * math.log2(v) / math.log2(c), rel_tol=1e-5)
    direct = sum(-float(p[i, k, y, x]) * math.log(float(p[i, k, y, x])) / math.log(c)
                 for i in range(n) for k in range(c) for y in range(h) for x in range(w)) / (n * h * w)
    assert math.isclose(float(advent.entropy_loss(p)), direct, rel_tol=1e-5)
    # a one-hot prediction has zero entropy, the uniform one has entropy 1 per pixel
    assert float(advent.entropy_loss(torch.full((1, 5, 2, 2), 0.2))) == pytest.approx(1.0, rel=1e-5)
    assert float(advent.entropy_loss(F.one_hot(torch.zeros(1, 2, 2).long(), 5).permute(0, 3, 1, 2).float())) \
        == pytest.approx(0.0, abs=1e-6)
    assert advent.discriminator_input(torch.randn(1, 5, 2, 2).bfloat16()).dtype == torch.float32


# ------------------------------------------------------------------------------------ discriminator labels
class _ConstD(torch.nn.Module):
    """A mock discriminator: twice its first channel plus a per-level offset (to see which D got what)."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, x):
        return 2 * x[:, :1] + self.offset


@pytest.mark.parametrize("mod", [advent, adaptseg], ids=["advent", "adaptseg"])
def test_discriminator_and_generator_use_the_right_domain_labels(mod):
    assert (mod.SOURCE_LABEL, mod.TARGET_LABEL) == (0.0, 1.0)
    discs = {"out": _ConstD(0.3), "aux": _ConstD(1.1)}
    pred_s = {"out": torch.randn(2, 5, 4, 4), "aux": torch.randn(2, 5, 4, 4)}
    pred_t = {"out": torch.randn(2, 5, 4, 4), "aux": torch.randn(2, 5, 4, 4)}

    def z(level, pred):  # what D_level says about pred[level], computed directly
        return discs[level](mod.discriminator_input(pred[level]))

    bce = F.binary_cross_entropy_with_logits
    # D step: source maps labelled 0, target maps labelled 1, each D on its own level, 0.5 each
    d_src = sum(0.5 * bce(z(l, pred_s), torch.zeros_like(z(l, pred_s))) for l in discs)
    d_tgt = sum(0.5 * bce(z(l, pred_t), torch.ones_like(z(l, pred_t))) for l in discs)
    assert torch.allclose(mod.discriminator_loss(discs, pred_s, mod.SOURCE_LABEL), d_src)
    assert torch.allclose(mod.discriminator_loss(discs, pred_t, mod.TARGET_LABEL), d_tgt)
    # seed 003's bugs give other numbers: target step labelled source; D2's source step fed D1's output
    wrong_label = sum(0.5 * bce(z(l, pred_t), torch.zeros_like(z(l, pred_t))) for l in discs)
    assert not torch.allclose(mod.discriminator_loss(discs, pred_t, mod.TARGET_LABEL), wrong_label)
    z_crossed = discs["aux"](mod.discriminator_input(pred_s["out"]))
    zero = torch.zeros_like(z_crossed)
    crossed = 0.5 * bce(z("out", pred_s), zero) + 0.5 * bce(z_crossed, zero)
    assert not torch.allclose(mod.discriminator_loss(discs, pred_s, mod.SOURCE_LABEL), crossed)
    # the D step never reaches the segmenter
    leaf = {l: v.clone().requires_grad_(True) for l, v in pred_t.items()}
    assert not mod.discriminator_loss(discs, leaf, mod.TARGET_LABEL).requires_grad  # (mock D has no params)
    assert mod.generator_loss(discs, leaf, {"out": 1.0, "aux": 1.0}).requires_grad
    # G step: target maps labelled SOURCE, weighted per level; the gradient lowers D's "target" score
    lambdas = {"out": 1e-3, "aux": 2e-4}
    g = sum(lambdas[l] * bce(z(l, pred_t), torch.zeros_like(z(l, pred_t))) for l in discs)
    assert torch.allclose(mod.generator_loss(discs, pred_t, lambdas), g)
    d_out = torch.zeros(1, 1, 2, 2, requires_grad=True)
    mod.gan_loss(d_out, mod.SOURCE_LABEL).backward()
    assert (d_out.grad > 0).all()  # descending it pushes D's logit towards 'source'


def test_least_squares_gan_loss():
    d = torch.tensor([[0.2, -1.0, 3.0]])
    assert torch.allclose(adaptseg.gan_loss(d, 1.0, "ls"), ((d - 1) ** 2).mean())
    assert torch.allclose(adaptseg.gan_loss(d, 0.0, "vanilla"), F.softplus(d).mean())
    assert torch.allclose(adaptseg.discriminator_input(d.view(1, 3, 1, 1)), F.softmax(d.view(1, 3, 1, 1), 1))


def test_discriminators_learn_to_separate_domains_with_these_labels():
    torch.manual_seed(0)
    from common.models import FCDiscriminator
    discs = {"out": FCDiscriminator(3, ndf=8)}
    opt = torch.optim.Adam(discs["out"].parameters(), lr=1e-3)
    src = {"out": torch.tensor([4.0, 0, 0]).view(1, 3, 1, 1).expand(2, 3, 32, 32)}  # confident
    tgt = {"out": torch.zeros(2, 3, 32, 32)}  # uncertain
    for _ in range(30):
        opt.zero_grad()
        (adaptseg.discriminator_loss(discs, src, 0.0) + adaptseg.discriminator_loss(discs, tgt, 1.0)).backward()
        opt.step()
    with torch.no_grad():
        s = torch.sigmoid(discs["out"](adaptseg.discriminator_input(src["out"]))).mean()
        t = torch.sigmoid(discs["out"](adaptseg.discriminator_input(tgt["out"]))).mean()
    assert s < 0.3 and t > 0.7  # D(source) -> 0, D(target) -> 1


# ---------------------------------------------------------------------------------------------- MaxSquare
def test_maxsquare_and_entropy_match_the_formula():
    p = _probs(2, 5, 3, 4)
    assert torch.allclose(maxsq.maxsquare_loss(p), -(p ** 2).sum() / (2 * p.numel()))
    logits = torch.randn(2, 5, 3, 4)
    q = F.softmax(logits, 1)
    assert torch.allclose(maxsq.entropy_loss(logits), -(q * q.log()).sum() / q.numel(), atol=1e-6)


def _iw_direct(p, alpha):
    """The formula pixel by pixel: w = 1 / max(N_c^a N^(1-a), 1), N_c = pixels of the image with the
    pixel's argmax class; L = -sum w P^2 / (B C)."""
    b, c, h, w = p.shape
    total = 0.0
    for i in range(b):
        arg = p[i].argmax(0)
        n = h * w
        for y in range(h):
            for x in range(w):
                n_c = int((arg == arg[y, x]).sum())
                wt = 1 / max(n_c ** alpha * n ** (1 - alpha), 1)
                total += wt * float((p[i, :, y, x] ** 2).sum())
    return -total / (b * c)


@pytest.mark.parametrize("b", [1, 3])
def test_iw_maxsquare_matches_the_formula_for_any_batch(b):
    p = _probs(b, 5, 4, 6, seed=b)
    assert math.isclose(float(maxsq.iw_maxsquare_loss(p, 0.2)), _iw_direct(p, 0.2), rel_tol=1e-5)
    # per-image weighting: a batch's loss is the mean of its images' losses
    per_image = [float(maxsq.iw_maxsquare_loss(p[i:i + 1], 0.2)) for i in range(b)]
    assert math.isclose(float(maxsq.iw_maxsquare_loss(p, 0.2)), sum(per_image) / b, rel_tol=1e-5)


def test_upstream_iw_broadcast_is_wrong_for_batch_above_one():
    # upstream: (prob ** 2) (B,C,H,W) * weights (B,H,W): B=2 with C=5 does not even broadcast, and with
    # B == C it silently pairs image weights with class channels. Ours stays right for B == C.
    p = _probs(2, 5, 3, 4)
    with pytest.raises(RuntimeError):
        _ = (p ** 2) * torch.ones(2, 3, 4)
    p = _probs(3, 3, 4, 4, seed=7)
    assert math.isclose(float(maxsq.iw_maxsquare_loss(p, 0.2)), _iw_direct(p, 0.2), rel_tol=1e-5)


def test_self_produced_guidance_mask():
    p, pa = _probs(2, 4, 5, 5, seed=1), _probs(2, 4, 5, 5, seed=2)
    thr = 0.8
    lab = maxsq.self_produced_guidance(p, pa, thr)
    for i in range(2):
        for y in range(5):
            for x in range(5):
                conf = p[i, :, y, x].max() > thr or pa[i, :, y, x].max() > thr
                want = int(((p[i, :, y, x] + pa[i, :, y, x]) / 2).argmax()) if conf else 255
                assert int(lab[i, y, x]) == want
    assert (lab == 255).any() and (lab != 255).any()


# ---------------------------------------------------------------------------------------------- scripts
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, toy_root):
    """A tiny copy of the toy pair (symlinks): 8 source and 8 target training images, 4 val, 4 test."""
    out = tmp_path_factory.mktemp("tiny")
    g = out / "gta"
    (g / "lists").mkdir(parents=True)
    for d in ("images", "labels"):
        os.symlink(toy_root / "toy_gta5" / d, g / d)
    names = (toy_root / "toy_gta5/lists/train.txt").read_text().split()[:8]
    (g / "lists/train.txt").write_text("\n".join(names) + "\n")
    (g / "lists/val.txt").write_text("\n".join(names[:2]) + "\n")
    cs = toy_root / "toy_cityscapes"
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        city = sorted((cs / "leftImg8bit" / split).iterdir())[0]
        for p in sorted(city.glob("*_leftImg8bit.png"))[:n]:
            stem = p.name[: -len("_leftImg8bit.png")]
            for sub, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png")):
                d = out / "cs" / sub / split / city.name
                d.mkdir(parents=True, exist_ok=True)
                os.symlink(cs / sub / split / city.name / (stem + suffix), d / (stem + suffix))
    return ["--source", "toy_gta5", "--source-root", g, "--target", "toy_cityscapes", "--target-root", out / "cs"]


TINY = ["--iters", "4", "--batch-size", "2", "--eval-every", "4", "--save-every", "2", "--workers", "0"]


def _weights(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


@pytest.fixture(scope="module")
def advent_run(tmp_path_factory, tiny):
    """AdvEnt, multi-level, from scratch, 4 iterations: the end-to-end run, the reference of the resume
    test, and the checkpoint the other scripts start from."""
    out = tmp_path_factory.mktemp("advent") / "a"
    p = run_script("advent_maxsquare/train_advent.py", *tiny, *TINY, "--init-from", "scratch", "--multi", "1",
                   "--keep-snapshots", "--out", out)
    assert "[done]" in p.stdout
    return out


def test_advent_multilevel_end_to_end_and_exact_resume(tmp_path, tiny, advent_run):
    a, b = advent_run, tmp_path / "b"
    for f in ("config.json", "log.jsonl", "checkpoint.pth", "model.pth", "best_model.pth", "iou_table.md",
              "final.json", "snapshots/iter_000004.pth"):
        assert (a / f).exists(), f
    ck = torch.load(a / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "discriminators", "optimizer_d", "scaler", "iter", "rng", "best"} <= set(ck)
    assert set(ck["discriminators"]) == {"out", "aux"} and ck["config"]["multi_level"]
    log = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "init" and log[0]["init_from"] == "scratch"
    assert any("loss_d_target" in r for r in log)
    run_script("advent_maxsquare/train_advent.py", *tiny, *TINY, "--init-from", "scratch", "--multi", "1",
               "--stop-iter", "2", "--out", b)
    p = run_script("advent_maxsquare/train_advent.py", *tiny, *TINY, "--init-from", "scratch", "--multi", "1",
                   "--resume", "--out", b)
    assert "resumed" in p.stdout
    for key in ("model", "discriminators") if EXACT else ():
        wa, wb = _weights(a / "checkpoint.pth", key), _weights(b / "checkpoint.pth", key)
        flat_a = wa if key == "model" else {f"{l}.{k}": v for l, sd in wa.items() for k, v in sd.items()}
        flat_b = wb if key == "model" else {f"{l}.{k}": v for l, sd in wb.items() for k, v in sd.items()}
        for k in flat_a:
            assert torch.allclose(flat_a[k].float(), flat_b[k].float(), atol=1e-6), k


def test_minent_and_maxsquare_start_from_a_checkpoint(tmp_path, tiny, advent_run):
    ckpt = advent_run / "model.pth"
    short = ["--iters", "4", "--stop-iter", "2", "--batch-size", "2", "--eval-every", "2", "--save-every", "4",
             "--workers", "0", "--init-from", ckpt, "--multi", "1"]
    m = tmp_path / "minent"
    p = run_script("advent_maxsquare/train_advent.py", *tiny, *short, "--mode", "minent", "--out", m)
    assert "[done]" in p.stdout
    init = [json.loads(line) for line in (m / "log.jsonl").read_text().splitlines()][0]
    assert init["event"] == "init" and init["init_from"] == str(ckpt)
    assert "discriminators" in torch.load(m / "checkpoint.pth", map_location="cpu", weights_only=True)
    ms = tmp_path / "maxsquare"
    p = run_script("advent_maxsquare/train_maxsquare.py", *tiny, *short, "--target-loss", "iw_maxsquare",
                   "--out", ms)
    assert "[done]" in p.stdout and (ms / "model.pth").exists()
    # test.py: the AdvEnt+MinEnt logit ensemble of two different checkpoints on the held-out split
    ev = tmp_path / "ens"
    run_script("advent_maxsquare/test.py", "--checkpoint", ckpt, "--ensemble", m / "model.pth",
               "--target", "toy_cityscapes", "--target-root", tiny[-1], "--split", "test", "--workers", "0",
               "--out", ev)
    rep = json.loads((ev / "final.json").read_text())
    assert rep["ensemble"] == str(m / "model.pth") and rep["images"] == 4 and 0 <= rep["mIoU"] <= 100
    # test.py --adabn: the source model evaluated with target BN statistics
    ev = tmp_path / "adabn"
    p = run_script("advent_maxsquare/test.py", "--checkpoint", ckpt, "--adabn", "--target", "toy_cityscapes",
                   "--target-root", tiny[-1], "--split", "test", "--workers", "0", "--out", ev)
    assert "AdaBN: BN statistics re-estimated on 8" in p.stdout
    assert json.loads((ev / "final.json").read_text())["adabn"] is True


def test_adabn_sets_bn_statistics_to_the_target_mean_and_variance():
    """AdaBN: running mean/var = the exact mean and unbiased variance of the BN input over all target
    pixels; weights untouched; the model is left in eval mode."""
    from common.evaluate import adabn
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1),
                                torch.nn.BatchNorm2d(2))
    data = [{"image": torch.randn(3, 6, 5) * 2 + 1} for _ in range(10)]
    w = [p.clone() for p in model.parameters()]
    x = torch.stack([d["image"] for d in data])
    with torch.no_grad():
        flat = conv(x).transpose(0, 1).reshape(4, -1)
    # one batch of all 10 images: exactly the mean and unbiased variance over every pixel
    n = adabn(model, data, torch.device("cpu"), None, batch_size=10, workers=0)
    assert n == 10 and not model.training
    torch.testing.assert_close(model[1].running_mean, flat.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, flat.var(1), rtol=1e-4, atol=1e-5)
    # two batches of 5 (any order): the cumulative average still gives the exact mean; the earlier
    # statistics are reset, not blended in
    model[1].running_mean.fill_(100.0)
    n = adabn(model, data, torch.device("cpu"), None, batch_size=5, workers=0)
    torch.testing.assert_close(model[1].running_mean, flat.mean(1), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))
    with pytest.raises(SystemExit, match="no BatchNorm"):  # e.g. FCN8s-VGG16 (madan/test.py --adabn)
        adabn(torch.nn.Conv2d(3, 2, 1), data, torch.device("cpu"), None, workers=0)


def test_init_from_fails_loudly(tmp_path, tiny, advent_run, capsys):
    """In-process (no subprocess needed to see an error): strict loading names the keys."""
    from common.models import WeightLoadError
    args = [str(v) for v in (*tiny, *TINY)]
    # a checkpoint whose weights do not match its config
    state = torch.load(advent_run / "model.pth", map_location="cpu", weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("head_aux")}
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightLoadError, match="missing keys: head_aux"):
        maxsq.main(maxsq.parse_args(args + ["--init-from", str(tmp_path / "broken.pth"),
                                            "--out", str(tmp_path / "o1")]))
    # a valid single-level checkpoint asked to adapt at two levels
    state["config"]["multi_level"] = False
    torch.save(state, tmp_path / "single.pth")
    with pytest.raises(SystemExit, match="needs an aux head"):
        adaptseg.main(adaptseg.parse_args(args + ["--init-from", str(tmp_path / "single.pth"), "--multi", "1",
                                                  "--out", str(tmp_path / "o2")]))
    # a path that does not exist: an argparse error naming it
    with pytest.raises(SystemExit):
        advent.parse_args(args + ["--init-from", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert "nope.pth" in err and "--init-from" in err


def test_torchrun_two_processes_with_discriminators(tmp_path, tiny):
    out = tmp_path / "ddp"
    p = run_torchrun("advent_maxsquare/train_adaptseg.py", *tiny, "--iters", "2", "--batch-size", "2",
                     "--eval-every", "2", "--workers", "0", "--init-from", "scratch", "--multi", "1",
                     "--gan", "ls", "--out", out)
    assert (out / "model.pth").exists() and "[done]" in p.stdout


def test_released_repeats_step_each_backbone_weight_once_per_enclosing_module():
    """--released-repeats (deviation 17): upstream's get_1x_lr_params_NOscale lists a weight once per module that
    encloses it below conv1/bn1/layer1-4, and SGD steps each occurrence. Counted directly here, and one plain SGD
    step (no momentum, no decay, a fixed gradient) moves a weight exactly that many times as far as ours."""
    from common.models import build_model
    from common.runtime import sgd_10x
    torch.manual_seed(0)
    net = build_model("deeplabv2", 19, "resnet18", multi_level=False)
    b = net.backbone
    expect = {id(b.conv1.weight): 1, id(b.bn1.weight): 1, id(b.layer1[0].conv1.weight): 3,
              id(b.layer2[0].downsample[0].weight): 4, id(b.layer4[1].bn2.bias): 3}
    plain = sgd_10x(net, 0.1, momentum=0.0, weight_decay=0.0)
    released = sgd_10x(net, 0.1, momentum=0.0, weight_decay=0.0, released_repeats=True)
    counts = {}
    for p in released.param_groups[0]["params"]:
        counts[id(p)] = counts.get(id(p), 0) + 1
    assert {k: counts[k] for k in expect} == expect
    assert sorted(map(id, plain.param_groups[0]["params"])) == sorted(counts)  # the same weights, each once
    assert released.param_groups[1]["params"] == plain.param_groups[1]["params"]  # heads: once, at 10x
    for opt, times in ((plain, 1), (released, None)):
        w0 = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        moved = {id(p): (p, g["lr"]) for g in opt.param_groups for p in g["params"]}
        for key, (p, lr) in moved.items():
            n = times or counts.get(key, 1)
            assert torch.allclose(w0[key] - p.detach(), torch.full_like(p, n * lr), atol=1e-6), n
        for key, (p, _) in moved.items():
            p.data.copy_(w0[key])
