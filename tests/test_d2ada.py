"""D2ADA (d2ada/): superpixels, region statistics, density / uncertainty selection against direct
evaluations of the paper's formulas, budget, round-robin and no-hang guarantees, and the four scripts
end to end on a tiny copy of the toy domains (with resume)."""
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import EXACT, ROOT, run_script, run_torchrun, real_smoke
from d2ada import regions as R, selection as S


# ---------------------------------------------------------------------------------------------- regions
def test_slic_ids_contiguous_and_aligned():
    rng = np.random.default_rng(0)
    img = np.zeros((48, 80, 3), np.uint8)
    img[:, 40:] = (200, 30, 30)
    img[20:, :] += rng.integers(0, 40, (28, 80, 3), dtype=np.uint8)
    ids = R.slic_regions(img, n_segments=12)
    assert ids.shape == img.shape[:2] and ids.dtype == np.uint8
    assert sorted(np.unique(ids).tolist()) == list(range(int(ids.max()) + 1))  # 0..K-1, no gaps
    assert ids.max() >= 1


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("fhw,shw", [((5, 7), (17, 23)), ((9, 16), (72, 128)), ((6, 6), (6, 6)), ((1, 4), (5, 9))])
def test_region_stats_against_direct_masked_mean(align_corners, fhw, shw):
    """The region means of the upsampled feature (taken as a sparse linear map of the low-resolution feature)
    against the direct evaluation: F.interpolate to the superpixel map's size, then the mean over each region."""
    g = torch.Generator().manual_seed(0)
    feat, logits = torch.randn(20, *fhw, generator=g), torch.randn(6, *fhw, generator=g)
    sp = torch.randint(0, 9, shw, generator=g)
    sp.view(-1)[:9] = torch.arange(9)  # every id present
    st = R.region_stats(feat, logits, sp, align_corners=align_corners)
    up_f = F.interpolate(feat[None], size=shw, mode="bilinear", align_corners=align_corners)[0]
    p = F.softmax(F.interpolate(logits[None], size=shw, mode="bilinear", align_corners=align_corners)[0], 0)
    ent = (-p * torch.log2(p + 1e-12)).mean(0)
    for r in range(9):
        m = sp == r
        assert torch.allclose(st["feat"][r], up_f[:, m].mean(1), atol=1e-5)
        assert torch.allclose(st["prob"][r], p[:, m].mean(1), atol=1e-6)
        assert abs(float(st["entropy"][r]) - float(ent[m].mean())) < 1e-6
        assert int(st["pixels"][r]) == int(m.sum())
    # what the model returns under bf16 autocast (channels_last bf16 maps) gives the fp32 statistics of those maps
    fb = feat.bfloat16()[None].contiguous(memory_format=torch.channels_last)[0]
    lb = logits.bfloat16()[None].contiguous(memory_format=torch.channels_last)[0]
    st_b, st_f = R.region_stats(fb, lb, sp), R.region_stats(fb.float(), lb.float(), sp)
    assert st_b["feat"].dtype == torch.float32
    for key in ("feat", "prob", "entropy", "pixels"):
        assert torch.equal(st_b[key], st_f[key]), key


class _TinyFeatNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.c = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Conv2d(4, 3, 1)

    def forward(self, x, return_feat=False):
        f = self.f(x)
        return {"feat": f, "out": self.c(f)} if return_feat else self.c(f)


@pytest.mark.parametrize("workers", [0, 1])
def test_extract_regions_leaves_the_global_rng_alone(tmp_path, workers):
    """A region pass must not draw from the global torch RNG (a DataLoader without its own generator draws
    its base seed from it): D2ADA's training would then depend on how many passes ran, and its random-regions
    control (no pass) would not start each round's training from the same RNG state."""
    from types import SimpleNamespace
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(path)
        sp = R.slic_regions(np.asarray(Image.open(path)), n_segments=6)
        R.write_png_atomic(sp, R.superpixel_path(tmp_path, path))
        files.append((str(path), None))
    base = SimpleNamespace(files=files, root=str(tmp_path))
    net = _TinyFeatNet()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    out = R.extract_regions(net, base, range(3), (16, 24), "imagenet",
                            torch.device("cpu"), batch_size=2, workers=workers)
    assert torch.equal(torch.get_rng_state(), before)
    assert sorted(set(out["image"].tolist())) == [0, 1, 2] and out["feat"].shape[1] == 4


def test_random_selection_reads_only_the_region_inventory():
    """The random baseline takes its region table from region_inventory (no model pass): the same image /
    region / pixel columns as extract_regions' region_stats, hence the same picks."""
    g = torch.Generator().manual_seed(1)
    maps = [torch.randint(0, k, (12, 20), generator=g) for k in (5, 9, 3)]
    for m, k in zip(maps, (5, 9, 3)):
        m.view(-1)[:k] = torch.arange(k)  # ids 0..k-1 all present, as superpixels.py writes them
    full = {"image": [], "region": [], "pixels": [], "entropy": [], "prob": []}
    for i, sp in enumerate(maps):
        st = R.region_stats(torch.randn(4, 3, 5, generator=g), torch.randn(6, 3, 5, generator=g), sp)
        k = len(st["pixels"])
        full["image"].append(np.full(k, i, np.int64))
        full["region"].append(np.arange(k, dtype=np.int64))
        for key in ("pixels", "entropy", "prob"):
            full[key].append(st[key].numpy())
    full = {k: np.concatenate(v) for k, v in full.items()}
    inv = R.inventory_regions([np.bincount(sp.numpy().reshape(-1)).astype(np.int64) for sp in maps])
    for key in ("image", "region", "pixels"):
        assert inv[key].dtype == full[key].dtype and np.array_equal(inv[key], full[key]), key
    pool = np.ones(len(inv["pixels"]), bool)
    pool[[0, 7]] = False
    budget = 0.3 * inv["pixels"].sum()
    a = S.select_round(full, None, pool, budget, 0.0, "random", None, seed=5)
    b = S.select_round(inv, None, pool, budget, 0.0, "random", None, seed=5)
    assert a[0] == b[0] and a[1] == b[1] and len(a[0]) > 1


# ---------------------------------------------------------------------------------------------- selection
def _blobs(n, dim, shift, rng):
    return (rng.standard_normal((n, dim)) + shift).astype(np.float32)


def test_density_score_equals_direct_gmm_log_likelihoods():
    from sklearn.mixture import GaussianMixture
    rng = np.random.default_rng(1)
    src = np.concatenate([_blobs(150, 4, 0, rng), _blobs(150, 4, 3, rng)])
    trg = np.concatenate([_blobs(120, 4, 0.5, rng), _blobs(230, 4, 3.5, rng)])
    s_cls, t_cls = np.repeat([0, 1], 150), np.repeat([0, 1], [120, 230])
    out = S.density_scores(src, s_cls, trg, t_cls, classes=[0, 1], workers=2)
    for c in (0, 1):
        idx, d = out[c]
        x = trg[t_cls == c].astype(np.float64)
        k = int(np.clip(len(x) // 100, 1, 10))
        gs = GaussianMixture(k, covariance_type="full", random_state=0, max_iter=200).fit(src[s_cls == c].astype(np.float64))
        gt = GaussianMixture(k, covariance_type="full", random_state=0, max_iter=200).fit(x)
        assert (idx == np.flatnonzero(t_cls == c)).all()
        np.testing.assert_allclose(d, gs.score_samples(x) - gt.score_samples(x), rtol=1e-6, atol=1e-6)
    # ordering: lowest d first inside a class; weights int(log10|mean d|), at least 1
    order, scores, weights = S.density_order(out, np.ones(len(trg), bool), per_class=5)
    assert len(order) == 10 and all(w >= 1 for w in weights.values())
    first = [s for r, s in zip(order, scores) if t_cls[r] == 0]
    assert first == sorted(first)
    assert weights[1] == max(1, int(np.log10(abs(out[1][1].mean()))))


def test_uncertainty_order_and_dynamic_lambda():
    ent = np.array([0.1, 0.5, 0.3, 0.5, 0.9])
    pool = np.array([True, True, True, True, False])
    order, sc = S.uncertainty_order(ent, pool)
    assert order == [1, 3, 2, 0] and sc == [0.5, 0.5, 0.3, 0.1]
    lams = [S.dynamic_lambda(t) for t in range(1, 6)]
    assert lams == [1.0, 0.5, 0.25, 0.125, 0.0625]  # first selection: density only, never negative
    assert S.dynamic_lambda(0) == 1.0 and S.dynamic_lambda(1, alpha=3) == 1.0


def test_budget_overshoots_by_less_than_one_region():
    rng = np.random.default_rng(2)
    pixels = rng.integers(10, 500, 400)
    trg = {"feat": rng.standard_normal((400, 3)), "prob": rng.dirichlet(np.ones(3), 400),
           "entropy": rng.random(400), "pixels": pixels}
    src = {"feat": rng.standard_normal((300, 3)), "prob": rng.dirichlet(np.ones(3), 300)}
    for method, lam in (("d2ada", 0.5), ("d2ada", 1.0), ("random", 0), ("uncertainty", 0), ("density", 1)):
        for budget in (1, 999, 5000):
            picks, _ = S.select_round(trg, src, np.ones(400, bool), budget, lam, method)
            got = [r for r, _, _ in picks]
            used = int(pixels[got].sum())
            assert len(set(got)) == len(got)
            assert used >= budget and used - budget < pixels.max(), (method, budget, used)
            assert used - int(pixels[got[-1]]) < budget  # without its last region it was under budget
    chosen, used = S.fill_budget([0, 1, 2], pixels, 0)
    assert chosen == [] and used == 0  # a budget <= 0 selects nothing (upstream selects one region)


def test_density_pca_ablation_and_per_class_counts():
    """--density-pca (ours): the density scores are those of mixtures fitted directly on a PCA projection
    (fitted on source + target features); the round's info holds N_S, N_T and the mixture size per class."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture
    rng = np.random.default_rng(3)
    n, dim = 260, 12
    trg = {"feat": rng.standard_normal((n, dim)), "prob": rng.dirichlet(np.ones(2), n), "entropy": rng.random(n),
           "pixels": rng.integers(10, 50, n)}
    src = {"feat": rng.standard_normal((n + 40, dim)) + 0.5, "prob": rng.dirichlet(np.ones(2), n + 40)}
    picks, info = S.select_round(trg, src, np.ones(n, bool), 10 ** 9, 1.0, "density", pca=3)
    pca = PCA(3, random_state=0).fit(np.concatenate([src["feat"], trg["feat"]]))
    ps, pt = pca.transform(src["feat"]), pca.transform(trg["feat"])
    sc, tc = src["prob"].argmax(1), trg["prob"].argmax(1)
    got = {r: score for r, crit, score in picks if crit == "density"}
    assert info["density_pca"]["dim"] == 3 and 0 < info["density_pca"]["explained_variance"] <= 1
    for c in (0, 1):
        k = int(np.clip((tc == c).sum() // 100, 1, 10))
        gs = GaussianMixture(k, covariance_type="full", random_state=0, max_iter=200).fit(ps[sc == c])
        gt = GaussianMixture(k, covariance_type="full", random_state=0, max_iter=200).fit(pt[tc == c])
        idx = np.flatnonzero(tc == c)
        d = gs.score_samples(pt[idx]) - gt.score_samples(pt[idx])
        lowest = idx[np.argsort(d)[:200]]
        assert set(lowest) <= set(got)
        np.testing.assert_allclose([got[i] for i in lowest], np.sort(d)[:200], rtol=1e-6, atol=1e-6)
        rec = info["density_classes"][str(c)]
        assert rec == {"N_S": int((sc == c).sum()), "N_T": int((tc == c).sum()), "components": k}
    _, info256 = S.select_round(trg, src, np.ones(n, bool), 10 ** 9, 1.0, "density")
    assert "density_pca" not in info256 and set(info256["density_classes"]) == {"0", "1"}


def test_round_robin_terminates_on_adversarial_weights():
    lists = [list(range(5)), ["a", "b"], [], [7, 8, 9]]
    for w in ([0, -3, 1, 0], [float("nan"), 0, 0, -1], [10 ** 9, 0, 2, 1], [1]):
        out = S.weighted_round_robin(lists, w)
        assert sorted(map(str, out)) == sorted(map(str, [x for lst in lists for x in lst]))
    assert S.weighted_round_robin([[1, 2, 3], [4, 5]], [2, 1]) == [1, 2, 4, 3, 5]
    assert S.class_weight(np.zeros(4)) == 1 and S.class_weight(np.array([-0.5, 0.1])) == 1
    assert S.class_weight(np.full(3, -2500.0)) == 3


def test_selection_terminates_with_threads_and_many_classes(tmp_path):
    """Upstream forks a process pool after BLAS/OpenMP threads exist and can hang forever; ours fits in
    this process. A busy torch + BLAS process with 40 classes must finish well within the limit."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import numpy as np, torch
        torch.set_num_threads(2); torch.randn(512, 512) @ torch.randn(512, 512)   # threads exist
        np.random.default_rng(0).standard_normal((400, 400)) @ np.ones((400, 400))
        from d2ada import selection as S
        rng = np.random.default_rng(0)
        n, c = 2000, 40
        trg = {{"feat": rng.standard_normal((n, 16)), "prob": rng.dirichlet(np.ones(c), n),
               "entropy": rng.random(n), "pixels": rng.integers(1, 100, n)}}
        src = {{"feat": rng.standard_normal((n, 16)) + 0.3, "prob": rng.dirichlet(np.ones(c), n)}}
        picks, info = S.select_round(trg, src, np.ones(n, bool), 20000, 0.5, threads=2, workers=2)
        print("OK", len(picks), info["used_density_px"] > 0)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "OK" in p.stdout and "True" in p.stdout, p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(toy_root, tmp_path_factory):
    """A small copy of the toy GTA5-style source and Cityscapes-style target (real layouts)."""
    root = tmp_path_factory.mktemp("d2ada_tiny")
    gsrc, gdst = toy_root / "toy_gta5", root / "gta"
    names = (gsrc / "lists" / "train.txt").read_text().split()[:10]
    for sub in ("images", "labels"):
        (gdst / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(gsrc / sub / n, gdst / sub / n)
    (gdst / "lists").mkdir()
    (gdst / "lists" / "train.txt").write_text("\n".join(names) + "\n")
    (gdst / "lists" / "val.txt").write_text("\n".join(names[:2]) + "\n")
    csrc, cdst = toy_root / "toy_cityscapes", root / "city"
    for split, k in (("train", 10), ("val", 3), ("test", 3)):
        imgs = sorted((csrc / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[:k]
        for p in imgs:
            city, stem = p.parent.name, p.name[: -len("_leftImg8bit.png")]
            for a, b in ((p, cdst / "leftImg8bit" / split / city / p.name),
                         (csrc / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                          cdst / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")):
                b.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(a, b)
    return root


def data_args(tiny):
    return ["--source", "toy_gta5", "--source-root", tiny / "gta", "--target", "toy_cityscapes",
            "--target-root", tiny / "city", "--workers", "0"]


def test_scripts_end_to_end_and_resume(tiny, tmp_path):
    # superpixels: mirrored tree, aligned with the images, resumable (one run as a user would, the rest
    # in-process to save interpreter start-ups)
    from d2ada import superpixels
    run_script("d2ada/superpixels.py", "--dataset", "toy_cityscapes", "--data-root", tiny / "city")
    imgs = sorted((tiny / "city" / "leftImg8bit" / "train").glob("*/*.png"))
    for im in imgs:
        sp = np.asarray(Image.open(R.superpixel_path(tiny / "city", im)))
        assert sp.shape == np.asarray(Image.open(im)).shape[:2]
        assert sorted(np.unique(sp).tolist()) == list(range(int(sp.max()) + 1))
    stamp = R.superpixel_path(tiny / "city", imgs[0]).stat().st_mtime_ns
    superpixels.main(superpixels.parse_args(["--dataset", "toy_cityscapes", "--data-root", str(tiny / "city")]))
    assert R.superpixel_path(tiny / "city", imgs[0]).stat().st_mtime_ns == stamp  # skipped, not redone
    superpixels.main(superpixels.parse_args(["--dataset", "toy_gta5", "--data-root", str(tiny / "gta"),
                                             "--workers", "2"]))  # threads: the same maps as one at a time
    for im in sorted((tiny / "gta" / "images").glob("*.png"))[:3]:
        expect = R.slic_regions(np.asarray(Image.open(im).convert("RGB")), superpixels.TOY_SEGMENTS)
        assert np.array_equal(np.asarray(Image.open(R.superpixel_path(tiny / "gta", im))), expect)

    w = tmp_path / "warmup"
    run_script("d2ada/warmup.py", *data_args(tiny), "--iters", 2, "--batch-size", 2, "--eval-every", 2,
               "--out", w)
    assert (w / "model.pth").exists() and json.loads((w / "final.json").read_text())["warmup"] == "uda_warmup"

    a = tmp_path / "ada"
    common = [*data_args(tiny), "--init-from", w / "model.pth", "--rounds", 1, "--iters", 2, "--batch-size", 2,
              "--active-selection-size", 1, "--source-sample", 4, "--pictures", 2]
    run_script("d2ada/train_ada.py", *common, "--out", a)
    final = json.loads((a / "final.json").read_text())
    pcts = [h["labeled_percent"] for h in final["rounds"]]
    assert len(pcts) == 2 and pcts[0] == 0 and pcts[1] > 0
    d0 = json.loads((a / "datalist_00.json").read_text())
    assert set(d0) >= {"src_label_im_idx", "trg_label_im_idx", "trg_pool_im_idx", "trg_label_suppix", "trg_pool_suppix"}
    assert {p["criterion"] for p in d0["selected"]} == {"density"}  # first selection: lambda = 1
    assert abs(d0["labeled_percent"] - pcts[1]) < 1e-2 and d0["labeled_percent"] >= 10.0  # 1 image of 10
    for n, ids in d0["trg_label_suppix"].items():
        assert not set(ids) & set(d0["trg_pool_suppix"].get(n, []))
    assert list((a / "selections" / "round_00").glob("*.png"))
    ck = torch.load(a / "checkpoint01.pth", weights_only=True)
    assert ck["round"] == 1 and ck["labeled"] == d0["trg_label_suppix"]

    # interrupted during round 0's selection: the resumed run selects the same regions, then goes on
    b = tmp_path / "ada_resumed"
    shutil.copytree(a, b)
    for f in ("datalist_00.json", "checkpoint01.pth", "final.json", "model.pth"):
        (b / f).unlink()
    run_script("d2ada/train_ada.py", *common, "--out", b, "--resume")
    d0b = json.loads((b / "datalist_00.json").read_text())
    if EXACT:  # same model, same regions: identical on the CPU (cuDNN kernels are not deterministic)
        assert d0b["trg_label_suppix"] == d0["trg_label_suppix"] and d0b["selected"] == d0["selected"]
    assert json.loads((b / "final.json").read_text())["rounds"][1]["labeled_percent"] == final["rounds"][1]["labeled_percent"]

    run_script("d2ada/test.py", "--checkpoint", a / "model.pth", "--target", "toy_cityscapes",
               "--target-root", tiny / "city", "--split", "test", "--workers", 0, "--out", tmp_path / "eval")
    assert "mIoU" in json.loads((tmp_path / "eval" / "final.json").read_text())


def test_train_ada_under_torchrun(tiny, tmp_path):
    """Two processes: region features gathered from both ranks, one selection (rank 0) shared with every
    rank, the round's datalist written once."""
    from d2ada import superpixels
    for ds, sub in (("toy_cityscapes", "city"), ("toy_gta5", "gta")):  # skips images already done
        superpixels.main(superpixels.parse_args(["--dataset", ds, "--data-root", str(tiny / sub)]))
    w = tmp_path / "warmup"
    run_script("d2ada/warmup.py", *data_args(tiny), "--warmup", "sup_warmup", "--iters", 2, "--batch-size", 2,
               "--eval-every", 2, "--out", w)
    a = tmp_path / "ada_ddp"
    p = run_torchrun("d2ada/train_ada.py", *data_args(tiny), "--init-from", w / "model.pth", "--rounds", 1,
                     "--iters", 2, "--batch-size", 2, "--active-selection-size", 2, "--source-sample", 4,
                     "--pictures", 0, "--out", a)
    final = json.loads((a / "final.json").read_text())
    assert [h["labeled_percent"] > 0 for h in final["rounds"]] == [False, True]
    d0 = json.loads((a / "datalist_00.json").read_text())
    assert d0["labeled_percent"] >= 10.0 and (a / "model.pth").exists()


def test_deeplabv2_variant_feature_and_checkpoint(tmp_path):
    from common import runtime as rt
    from d2ada.model import from_checkpoint, make_model
    net, cfg = make_model("deeplabv2", "resnet18", 19)
    x = torch.randn(1, 3, 64, 96)
    out = net(x, return_feat=True)
    assert out["feat"].shape == (1, 256, 4, 6) and out["out"].shape == (1, 19, 64, 96)  # OS16, logits at input size
    # the classifier is a 1x1 conv on that feature, upsampled as upstream (bilinear, align_corners=False)
    ref = F.interpolate(net.classifier(out["feat"]), size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(ref, out["out"], atol=1e-5)
    rt.save_checkpoint(tmp_path / "m.pth", model=net.state_dict(), config=cfg)
    net2, cfg2 = from_checkpoint(tmp_path / "m.pth")
    assert cfg2["model"] == "deeplabv2_d2ada" and cfg2["output_stride"] == 16
    net.eval(), net2.eval()
    assert torch.equal(net(x)["out"], net2(x)["out"])


def test_backbone_dilation_equals_torchvision_replace_stride_with_dilation():
    """VainF's backbone is torchvision's ResNet with replace_stride_with_dilation (first block of a dilated
    stage keeps the previous dilation, no multi-grid); ours must have the same stride/dilation/padding."""
    import torchvision
    from d2ada.model import vainf_resnet
    for os_, flags in ((16, [False, False, True]), (8, [False, True, True])):
        a = vainf_resnet("resnet50", os_)
        b = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=flags)
        convs_a = [(n, m) for n, m in a.named_modules() if isinstance(m, torch.nn.Conv2d)]
        convs_b = {n: m for n, m in b.named_modules() if isinstance(m, torch.nn.Conv2d)}
        assert len(convs_a) == len(convs_b)
        for n, m in convs_a:
            assert (m.stride, m.dilation, m.padding) == (convs_b[n].stride, convs_b[n].dilation, convs_b[n].padding), n
        assert set(a.state_dict()) == set(b.state_dict()) - {"fc.weight", "fc.bias"}  # torchvision weights load


def test_deeplabv3plus_is_vainf_head():
    """One 3x3 decoder conv (304 -> 256, BN, ReLU) whose output is the region feature; low-level projection
    FIRST in the concatenation; ASPP 1x1 + 6/12/18 + pooling at OS16; upsampling with align_corners=False."""
    from d2ada.model import DeepLabV3PlusD2ADA
    torch.manual_seed(0)
    net = DeepLabV3PlusD2ADA(19, "resnet50").eval()
    assert [b[0].dilation for b in net.aspp[1:4]] == [(6, 6), (12, 12), (18, 18)]
    assert net.decoder[0].in_channels == 304 and net.decoder[0].kernel_size == (3, 3)
    assert not any(isinstance(m, torch.nn.Dropout) for m in net.decoder.modules())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out = net(x, return_feat=True)
        bb = net.backbone
        h = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
        l1 = bb.layer1(h)
        l4 = bb.layer4(bb.layer3(bb.layer2(l1)))
        assert l4.shape[-2:] == (6, 8)  # output stride 16
        res = [net.aspp[i](l4) for i in range(4)]
        p = l4.mean((2, 3), keepdim=True)
        for m in list(net.aspp[4])[1:]:  # 1x1 conv, BN, ReLU on the pooled vector, then a constant map
            p = m(p)
        pooled = p.expand(-1, -1, 6, 8)
        a = net.aspp_project(torch.cat(res + [pooled], 1))
        a = F.interpolate(a, size=l1.shape[-2:], mode="bilinear", align_corners=False)
        feat = net.decoder(torch.cat([net.project(l1), a], 1))
        logits = F.interpolate(net.classifier(feat), size=(96, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["feat"], feat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["out"], logits, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------- paper preset
def _mem_available_gib():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("inf")


@pytest.fixture(scope="module")
def real_one(real_trees, tmp_path_factory):
    """One GTA5 image, one Cityscapes train image and one val image of the full-resolution real-format
    fixture trees (symlinks; superpixels are written into this copy, not into the shared trees)."""
    root = tmp_path_factory.mktemp("d2ada_real")
    g = real_trees["gta5"]
    name = sorted(p.name for p in (g / "images").iterdir())[0]
    for sub in ("images", "labels"):
        (root / "gta5" / sub).mkdir(parents=True)
        (root / "gta5" / sub / name).symlink_to(g / sub / name)
    c = real_trees["cityscapes"]
    for split in ("train", "val"):
        img = sorted((c / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[0]
        stem, city = img.name[: -len("_leftImg8bit.png")], img.parent.name
        lbl = c / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        for a, sub in ((img, "leftImg8bit"), (lbl, "gtFine")):
            dst = root / "cityscapes" / sub / split / city / a.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(a)
    return root


@real_smoke
def test_paper_preset_smoke_on_real_format_trees(real_one, tmp_path):
    """Every d2ada script with the REAL-DATA preset itself (DeepLabV3+-R101 OS16, 1024x2048, BN frozen, all
    source images for the densities, density features through the training transform) on full-resolution
    GTA5 / Cityscapes fixture trees: 40 SLIC regions per image, one UDA warm-up iteration, one selection
    round and one fine-tuning iteration, one evaluated image, and test.py on the result."""
    if _mem_available_gib() < 10:
        pytest.skip(f"needs ~10 GiB of free memory for DeepLabV3+-R101 at 1024x2048 ({_mem_available_gib():.1f} GiB)")
    import torchvision
    from d2ada import superpixels
    from d2ada.model import from_checkpoint
    g, c = real_one / "gta5", real_one / "cityscapes"
    for ds, root in (("gta5", g), ("cityscapes", c)):
        superpixels.main(superpixels.parse_args(["--dataset", ds, "--data-root", str(root)]))
    for img in list((g / "images").iterdir()) + list((c / "leftImg8bit" / "train").glob("*/*.png")):
        sp = np.asarray(Image.open(R.superpixel_path(g if img.is_relative_to(g) else c, img)))
        assert sp.shape == np.asarray(Image.open(img)).shape[:2] and 20 <= sp.max() + 1 <= 80
    weights = tmp_path / "resnet101-imagenet.pth"  # a torchvision ResNet-101 file (random values)
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), weights)
    real = ["--source", "gta5", "--source-root", g, "--target", "cityscapes", "--target-root", c, "--workers", 0]
    w = tmp_path / "warmup"
    run_script("d2ada/warmup.py", *real, "--init", weights, "--stop-iter", 1, "--out", w, timeout=1800)
    cfg = json.loads((w / "config.json").read_text())
    # the preset itself: only the stop iteration is overridden
    assert cfg["crop_size"] == [1024, 2048] and cfg["backbone"] == "resnet101" and cfg["freeze_bn"] == 1
    assert cfg["iters"] == 100000 and cfg["warmup_iters"] == 5000 and cfg["batch_size"] == 1
    net, mcfg = from_checkpoint(w / "model.pth")
    assert mcfg["model"] == "deeplabv3plus_d2ada" and mcfg["output_stride"] == 16 and mcfg["backbone"] == "resnet101"
    a = tmp_path / "ada"
    p = run_script("d2ada/train_ada.py", *real, "--init-from", w / "model.pth", "--rounds", 1, "--stop-iter", 1,
                   "--out", a, "--pictures", 1, timeout=1800)
    final = json.loads((a / "final.json").read_text())
    assert [h["labeled_percent"] > 0 for h in final["rounds"]] == [False, True]
    d0 = json.loads((a / "datalist_00.json").read_text())
    assert len(d0["src_label_im_idx"]) == 1 and d0["labeled_percent"] > 0
    assert d0["selected"][0]["criterion"] == "density"  # lambda = 1: density first (uncertainty fills the rest)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["iters"] == 120000 and cfg["source_sample"] == 0 and cfg["density_aug"] == "train"
    recs = [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]
    dens = [r for r in recs if r.get("event") == "density_classes"]
    assert len(dens) == 1 and dens[0]["source_images"] == 1 and dens[0]["density_aug"] == "train"
    assert all({"N_S", "N_T", "components"} <= set(v) for v in dens[0]["classes"].values())
    assert "density_classes" in p.stdout  # logged every round, on the console too
    e = tmp_path / "eval"
    run_script("d2ada/test.py", "--checkpoint", a / "model.pth", "--target", "cityscapes", "--target-root", c,
               "--workers", 0, "--out", e, timeout=900)
    res = json.loads((e / "final.json").read_text())
    assert res["images"] == 1 and 0 <= res["mIoU"] <= 100


def test_gmm_refits_with_larger_reg_covar_only_where_sklearn_fails():
    """Upstream's GaussianMixture (reg_covar 1e-6) raises "ill-defined empirical covariance" on collapsed,
    large-scale features; fit_gmm refits with a larger reg_covar only then, and keeps 1e-6 otherwise."""
    from sklearn.mixture import GaussianMixture
    from d2ada.selection import REG_COVAR, fit_gmm
    rng = np.random.default_rng(0)
    bad = rng.normal(size=(30, 64)) @ rng.normal(size=(64, 64)) * 1e8
    bad[:, :10] = 0
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(2, covariance_type="full", random_state=0).fit(bad)
    gm = fit_gmm(bad, 2)
    assert gm.reg_covar > REG_COVAR and np.isfinite(gm.score_samples(bad)).all()
    good = rng.normal(size=(200, 8))
    gm = fit_gmm(good, 2)
    ref = GaussianMixture(2, covariance_type="full", random_state=0, max_iter=200).fit(good)
    assert gm.reg_covar == REG_COVAR and np.allclose(gm.score_samples(good), ref.score_samples(good))
