"""d2ada/ against the official D2ADA (tsunghan-wu/D2ADA @ 332ad9f) selection code (tests/upstream/README.md): region
features and region softmax from the same superpixel maps (RegionDensitySelector.feature_extractor), the region
uncertainty (RegionSoftmaxUncertaintySelector.calculate_scores), the density score given the same fitted
GaussianMixtures (gmm_scoring.py run as a script), the dynamic schedule, and THE REGIONS SELECTED IN A ROUND: both
official selectors' select_next_batch driven end to end (density then uncertainty, RegionActiveDataset's budget
loop) on the same images, superpixel maps (given to both sides as PNG files / arrays) and model outputs.
CPU, fp32. Run: SEGDA_UPSTREAM=DIR python -m pytest -q tests/upstream/test_d2ada.py -m upstream

Shims (tests/upstream/README.md): `torch_scatter.scatter_mean` (a compiled CUDA/C++ package) is replaced by a CPU
index_add_ mean with the same result; gmm_scoring.py's `multiprocessing.Pool(5)` by a serial map (the official
README's known hang is the fork of that pool); `np.object` (removed in numpy 1.24) = object;
`torch.cuda.synchronize` a no-op; `collections.Iterable` (moved to collections.abc in Python 3.10; dataloader/ext_transforms.py at import); the selector's hard
`torch.device('cuda:0')` for feature extraction becomes the CPU; `subprocess.call("python3 gmm_scoring.py ...")`
runs the same script in-process. The training iteration on a region-labelled batch
(test_training_iteration_on_a_region_labelled_batch) runs BaseTrainer.__init__ + train_impl with get_model returning
the prepared network, the trainer's hard `torch.device('cuda:0')` the CPU, and its loader one batch.
"""
import json
import os
import pickle
import runpy
import sys
import types

import numpy as np
import torch
from PIL import Image

from upstream import harness as H
from d2ada import regions, selection

C, D, K = 19, 256, 40          # upstream's load_data hard-codes 19 classes, 256-d and 40 superpixels per image
HW, hw = (32, 48), (8, 12)


def _scatter_mean(src, index, dim=0):
    """CPU stand-in for torch_scatter.scatter_mean(src, index, dim=0): the mean of the rows of src per index."""
    assert dim == 0
    n = int(index.max()) + 1
    s = src.new_zeros((n,) + src.shape[1:]).index_add_(0, index, src)
    c = torch.bincount(index, minlength=n).clamp(min=1).to(src.dtype)
    return s / c.view(-1, *([1] * (src.dim() - 1)))


def _spx(seed):
    """A superpixel map with ids 0..39, irregular sizes (nearest of 40 random seeds)."""
    g = np.random.default_rng(seed)
    pts = np.stack([g.integers(0, HW[0], K), g.integers(0, HW[1], K)], 1)
    pts = np.unique(pts, axis=0)
    while len(pts) < K:
        pts = np.unique(np.vstack([pts, [g.integers(0, HW[0]), g.integers(0, HW[1])]]), axis=0)
    yy, xx = np.mgrid[:HW[0], :HW[1]]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2 + g.random(len(pts)) * 1e-3
    return d.argmin(-1).astype(np.uint8)


def _outputs(seed):
    g = torch.Generator().manual_seed(seed)
    feat = torch.relu(torch.randn(1, D, *hw, generator=g))
    logits = torch.randn(1, C, *hw, generator=g)
    logits[:, :3] += 2.5                                 # three classes own most regions
    return feat, logits


class _Head:
    """The classifier stand-in: the fixed low-resolution (feat, logits) of image i (feat too when return_feat)."""

    def __init__(self, outs):
        self.outs, self.return_feat = outs, False

    def __call__(self, i):
        return self.outs[i] if self.return_feat else self.outs[i][1]


class _Model:
    """Stands for the segmenter: backbone = the image's index (its pixel value), classifier = _Head; the official
    _SimpleSegmentationModel.forward / feat_forward / set_return_feat (bound here) do the upsampling."""

    def __init__(self, outs, cls):
        self.return_feat = False
        self.backbone = lambda x: int(x[0, 0, 0, 0])
        self.classifier = _Head(outs)
        for name in ("forward", "feat_forward", "set_return_feat", "unset_return_feat"):
            setattr(self, name, types.MethodType(getattr(cls, name), self))

    def __call__(self, x):
        return self.forward(x)

    def eval(self):
        return self


class _Set(torch.utils.data.Dataset):
    """An upstream-style region dataset: im_idx [[rgb, lbl, spx], ...], suppix {spx: [ids]}; items are dicts."""

    def __init__(self, entries, maps, offsets):
        self.im_idx = [list(e) for e in entries]
        self.suppix = {e[2]: list(range(K)) for e in entries}
        self.maps, self.offsets, self.return_spx = maps, offsets, True

    def __len__(self):
        return len(self.im_idx)

    def __getitem__(self, i):
        e = self.im_idx[i]
        return {"images": torch.full((3,) + HW, float(self.offsets[e[2]])), "spx": self.maps[e[2]].astype(np.int64),
                "fnames": list(e)}


def _world(tmp_path, n_src=12, n_trg=16):
    outs, maps, offsets, src, trg = [], {}, {}, [], []
    for i in range(n_src + n_trg):
        dom = "src" if i < n_src else "trg"
        sp = _spx(100 + i)
        p = tmp_path / "spx" / f"{dom}{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(sp).save(p)
        maps[str(p)], offsets[str(p)] = sp, i
        outs.append(_outputs(200 + i))
        (src if dom == "src" else trg).append([f"/x/{dom}{i:03d}_rgb.png", f"/x/{dom}{i:03d}_lbl.png", str(p)])
    return outs, maps, offsets, src, trg


def _ours_stats(outs, maps, entries, offsets):
    st = [regions.region_stats(outs[offsets[e[2]]][0][0], outs[offsets[e[2]]][1][0],
                               torch.from_numpy(maps[e[2]].astype(np.int64)), align_corners=False) for e in entries]
    return {k: torch.cat([s[k] for s in st]).numpy() for k in st[0]}


def _shims(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_scatter", types.SimpleNamespace(scatter_mean=_scatter_mean))
    monkeypatch.setattr(np, "object", object, raising=False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # calculate_scores times its forward
    import collections
    import collections.abc
    monkeypatch.setattr(collections, "Iterable", collections.abc.Iterable, raising=False)  # dataloader/ext_transforms.py


def test_region_features_probs_and_uncertainty(tmp_path, monkeypatch):
    """feature_extractor's per-region mean feature / softmax (scatter_mean of the upsampled maps) and
    calculate_scores' per-region entropy (pandas groupby of softmax_entropy) == our region_stats."""
    _shims(monkeypatch)
    outs, maps, offsets, src, trg = _world(tmp_path, 2, 3)
    with H.upstream("D2ADA"):
        das = __import__("active_selection.density_aware_selection", fromlist=["x"])
        su = __import__("active_selection.softmax_uncertainty", fromlist=["x"])
        seg = __import__("models.segmentation.utils", fromlist=["x"])
        model = _Model(outs, seg._SimpleSegmentationModel)
        ds = _Set(trg, maps, offsets)
        das.RegionDensitySelector(None, 1, 0).feature_extractor(model, ds, "cpu", str(tmp_path))
        (tmp_path / "AL_record").mkdir()
        trainer = types.SimpleNamespace(net=model, distributed=False, local_rank=0, device="cpu",
                                        model_save_dir=str(tmp_path))
        su.RegionSoftmaxUncertaintySelector(1, 0, "softmax_entropy").calculate_scores(trainer, ds)
    ours = _ours_stats(outs, maps, trg, offsets)
    feats = np.concatenate([np.load(tmp_path / f"{os.path.basename(e[0]).split('.')[0]}.npz")["feat"] for e in trg])
    probs = np.concatenate([np.load(tmp_path / f"{os.path.basename(e[0]).split('.')[0]}.npz")["prob"] for e in trg])
    H.compare("region features (3 images x 40 superpixels)", torch.from_numpy(ours["feat"]), torch.from_numpy(feats),
              official="D2ADA active_selection/density_aware_selection.py:RegionDensitySelector.feature_extractor")
    H.compare("region mean softmax", torch.from_numpy(ours["prob"]), torch.from_numpy(probs),
              official="D2ADA active_selection/density_aware_selection.py:RegionDensitySelector.feature_extractor")
    H.compare("region pseudo-label", torch.from_numpy(ours["prob"].argmax(1)), torch.from_numpy(probs.argmax(1)))
    scores = json.loads((tmp_path / "AL_record" / "region_val_0.json").read_text())
    theirs = np.array([s[0] for s in scores])
    assert [(s[1].split(",")[2], s[2]) for s in scores] == [(e[2], r) for e in trg for r in range(K)]
    H.compare("region uncertainty (mean of mean_k -p log2 p)", torch.from_numpy(ours["entropy"]).double(),
              torch.from_numpy(theirs),
              official="D2ADA active_selection/softmax_uncertainty.py:RegionSoftmaxUncertaintySelector.calculate_scores")


def test_dynamic_schedule():
    """lambda = alpha 2^(beta (1 - t)) (train_ADA.py:81, inline in main()): equal to ours for t >= 1; at upstream's
    t = 0 (lambda = 2, a negative uncertainty budget) ours clips to 1 (listed deviation, d2ada/README.md)."""
    off = "D2ADA train_ADA.py:main (Lambda = args.alpha * 2 ** (args.beta * (1 - selection_iter)))"
    src = (H.repo("D2ADA") / "train_ADA.py").read_text()
    assert "Lambda = args.alpha * 2 ** (args.beta * (1 - selection_iter))" in src
    for a, b in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.5)):
        ts = range(1, 6)
        theirs = torch.tensor([a * 2 ** (b * (1 - t)) for t in ts], dtype=torch.float64)
        ours = torch.tensor([selection.dynamic_lambda(t, a, b) for t in ts], dtype=torch.float64)
        H.compare(f"dynamic lambda, alpha {a} beta {b}, t = 1..5", ours, theirs, official=off)
    H.record("dynamic lambda at t = 0", 1.0, 0.5, False, official=off,
             note="upstream 2.0 (negative uncertainty budget), ours clipped to 1.0: listed deviation")


def _run_gmm_script(gmm_dir, monkeypatch):
    class Serial:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def map(self, fn, xs):
            return [fn(x) for x in xs]

    import multiprocessing
    monkeypatch.setattr(multiprocessing, "Pool", Serial)
    monkeypatch.setattr(sys, "argv", ["gmm_scoring.py", str(gmm_dir), "GTA5"])
    runpy.run_path(str(H.repo("D2ADA") / "active_selection" / "gmm_scoring.py"), run_name="__main__")


def test_regions_selected_in_a_round(tmp_path, monkeypatch):
    """One active round (selection_iter 2: lambda 1/2), both official selectors driven end to end: features and
    mixtures (gmm_scoring.py), class weights, per-class top 200, weighted round-robin, RegionActiveDataset's budget
    loop, then the uncertainty ranking on the remaining pool. Ours: region_stats + select_round with the official
    mixtures (shared objects: fit_gmm returns the GaussianMixture gmm_scoring.py pickled). The density picks are
    identical; the uncertainty ORDER is identical; the number of uncertainty regions follows each side's budget rule
    (listed deviation: upstream B(1 - lambda), ours B - pixels density used), so the uncertainty picks are compared on
    their common prefix and the count difference is recorded."""
    _shims(monkeypatch)
    outs, maps, offsets, src, trg = _world(tmp_path)
    sel_size, t = 0.0015, 2                               # images of 1024x2048 (upstream's unit); round t
    lam = 1.0 * 2 ** (1.0 * (1 - t))
    save = tmp_path / "feat"
    with H.upstream("D2ADA"):
        das = __import__("active_selection.density_aware_selection", fromlist=["x"])
        su = __import__("active_selection.softmax_uncertainty", fromlist=["x"])
        seg = __import__("models.segmentation.utils", fromlist=["x"])
        rad = __import__("dataloader.region_active_dataset", fromlist=["x"])
        model = _Model(outs, seg._SimpleSegmentationModel)
        sets = {"SRC": _Set(src, maps, offsets), "TRG": _Set(trg, maps, offsets)}
        monkeypatch.setattr(das, "get_dataset", lambda name, data_root, datalist: sets[name])
        monkeypatch.setattr(das, "subprocess", types.SimpleNamespace(
            call=lambda cmd, shell: _run_gmm_script(cmd.split()[2], monkeypatch)))
        real_fe = das.RegionDensitySelector.feature_extractor
        monkeypatch.setattr(das.RegionDensitySelector, "feature_extractor",
                            lambda self, m, d, device, *a, **k: real_fe(self, m, d, "cpu", *a, **k))
        args = types.SimpleNamespace(save_feat_dir=str(save), trg_dataset="TRG", trg_data_dir="", trg_datalist="",
                                     src_dataset="SRC", src_data_dir="", src_datalist="", model_save_dir=str(tmp_path))
        active = rad.RegionActiveDataset(args, _Set(src, maps, offsets), _Set(trg, maps, offsets),
                                         types.SimpleNamespace(im_idx=[], suppix={}))
        active.selection_iter = t
        (tmp_path / "AL_record").mkdir()
        trainer = types.SimpleNamespace(net=model, distributed=False, local_rank=0, device="cpu",
                                        model_save_dir=str(tmp_path))
        monkeypatch.chdir(H.repo("D2ADA"))
        das.RegionDensitySelector(args, 1, 0).select_next_batch(trainer, active, sel_size * lam)
        with open(tmp_path / f"density_selection_{t:02d}.pkl", "rb") as f:
            up_density = [(k.split(",")[2], int(r)) for _, k, r in pickle.load(f)]
        su.RegionSoftmaxUncertaintySelector(1, 0, "softmax_entropy").select_next_batch(trainer, active,
                                                                                        sel_size * (1 - lam))
        with open(tmp_path / f"softmax_entropy_selection_{t:02d}.pkl", "rb") as f:
            up_unc = [(k.split(",")[2], int(r)) for _, k, r in pickle.load(f)]
    # ours on the same images, maps and outputs, with the official mixtures
    gms = {}
    for c in range(C):
        for dom in ("src", "trg"):
            p = save / "GMM" / f"GMM_{dom}_{c:02d}.pkl"
            if p.exists():
                gms[(dom, c)] = pickle.loads(p.read_bytes())
    s, tr = _ours_stats(outs, maps, src, offsets), _ours_stats(outs, maps, trg, offsets)
    calls = []

    def shared_gmm(x, k, max_iter=200, **kw):        # the n-th fit of a class: source first, then target
        c = order[len(calls)]
        calls.append(c)
        return gms[c]

    t_cls, s_cls = tr["prob"].argmax(1), s["prob"].argmax(1)
    order = [(dom, c) for c in range(C) if (t_cls == c).sum() >= 2 and (s_cls == c).sum() >= 2 for dom in ("src", "trg")]
    monkeypatch.setattr(selection, "fit_gmm", shared_gmm)
    budget_px = sel_size * 1024 * 2048
    picks, info = selection.select_round(tr, s, np.ones(len(t_cls), bool), budget_px, selection.dynamic_lambda(t))
    key = [(e[2], r) for e in trg for r in range(K)]
    ours_d = [key[r] for r, crit, _ in picks if crit == "density"]
    ours_u = [key[r] for r, crit, _ in picks if crit == "uncertainty"]
    names = sorted(set(ours_d + up_density + ours_u + up_unc))
    code = {x: i for i, x in enumerate(names)}
    assert len(up_density) >= 10
    H.compare(f"density-selected regions ({len(up_density)}, in order)", torch.tensor([code[x] for x in ours_d]),
              torch.tensor([code[x] for x in up_density]),
              official="D2ADA active_selection/density_aware_selection.py:RegionDensitySelector.select_next_batch")
    n = min(len(ours_u), len(up_unc))
    H.compare(f"uncertainty-selected regions (common prefix {n})", torch.tensor([code[x] for x in ours_u[:n]]),
              torch.tensor([code[x] for x in up_unc[:n]]),
              official="D2ADA active_selection/softmax_uncertainty.py:RegionSoftmaxUncertaintySelector.select_next_batch")
    assert abs(len(ours_u) - len(up_unc)) <= 1
    H.record("uncertainty region count (budget rule)", abs(len(ours_u) - len(up_unc)), 0.0, True,
             official="D2ADA train_ADA.py:main (B_u = size * (1 - Lambda))",
             note=f"upstream {len(up_unc)} regions for B(1-lambda), ours {len(ours_u)} for B - density pixels: "
                  "listed deviation", n=max(len(ours_u), len(up_unc)))


def test_density_score_given_the_same_mixtures(tmp_path, monkeypatch):
    """d = log p_S(z) - log p_T(z) for the target regions of each class (region features of 14 source and 18
    target images), with the mixtures gmm_scoring.py fitted
    (shared GaussianMixture objects): upstream scores float32 features, ours float64 (listed deviation: mixture
    input); and the mixtures ours fits (float64 input) against upstream's (float32 input), recorded."""
    _shims(monkeypatch)
    real_fit = selection.fit_gmm
    gdir = tmp_path / "GMM"
    gdir.mkdir()
    outs, maps, offsets, src, trg = _world(tmp_path, 14, 18)      # region features as the model gives them
    s, t = _ours_stats(outs, maps, src, offsets), _ours_stats(outs, maps, trg, offsets)
    s_cls, t_cls = s["prob"].argmax(1), t["prob"].argmax(1)
    feats = {}
    for c in range(C):
        feats[c] = (s["feat"][s_cls == c].astype(np.float32), t["feat"][t_cls == c].astype(np.float32))
        np.savez(gdir / f"feat_{c:02d}.npz", src=feats[c][0], trg=feats[c][1])
    fitted = [c for c in range(C) if len(feats[c][1]) >= 2 and len(feats[c][0]) >= 2]
    assert len(fitted) >= 3 and max(len(feats[c][1]) for c in fitted) >= 200   # 2+ components for one class at least
    with H.upstream("D2ADA"):
        _run_gmm_script(gdir, monkeypatch)
    for c in fitted:
        src_f, trg_f = feats[c]
        gm_s = pickle.loads((gdir / f"GMM_src_{c:02d}.pkl").read_bytes())
        gm_t = pickle.loads((gdir / f"GMM_trg_{c:02d}.pkl").read_bytes())
        theirs = gm_s.score_samples(trg_f) - gm_t.score_samples(trg_f)
        monkeypatch.setattr(selection, "fit_gmm", lambda x, k, *a, _it=iter([gm_s, gm_t]), **kw: next(_it))
        idx, ours = selection.density_scores(src_f, np.full(len(src_f), c), trg_f, np.full(len(trg_f), c), [c])[c]
        H.compare(f"class {c}: d = log p_S - log p_T, same mixtures ({len(trg_f)} regions)", torch.from_numpy(ours),
                  torch.from_numpy(theirs.astype(np.float64)),
                  official="D2ADA active_selection/density_aware_selection.py:RegionDensitySelector.select_next_batch")
        H.compare(f"class {c}: order of d", torch.from_numpy(np.argsort(ours, kind="stable")),
                  torch.from_numpy(np.argsort(theirs)))
        H.compare(f"class {c}: class weight int(log10|mean d|)", torch.tensor(selection.class_weight(ours)),
                  torch.tensor(int(np.log10(np.abs(theirs.mean())))))
        assert selection.n_components(len(trg_f)) == gm_t.n_components
        x64 = trg_f.astype(np.float64)
        own = real_fit(src_f, gm_s.n_components).score_samples(x64) - real_fit(trg_f, gm_t.n_components).score_samples(x64)
        diff = float(np.abs(own - theirs).max())
        H.record(f"class {c}: d with our own float64 fits vs upstream's float32 fits", diff,
                 diff / float(np.abs(theirs).max()), False, official="D2ADA active_selection/gmm_scoring.py:GMM_scoring",
                 note=f"listed deviation (mixture input float64); same order of d: "
                      f"{bool((np.argsort(own) == np.argsort(theirs)).all())}", n=len(own))


# ------------------------------------------------------------------------------------------------
# One training iteration on a region-labelled batch: agent/base_agent.py:BaseTrainer.train_impl vs our train_round
# ------------------------------------------------------------------------------------------------
TR_HW = (32, 64)


def _region_batch(seed):
    """A batch of 2 as our RegionLabeledSet / upstream's RegionDataset serve it: the labels of the selected regions
    (superpixels of _spx) kept, every other pixel 255."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *TR_HW, generator=g)
    y = torch.randint(0, C, (2, *TR_HW), generator=g)
    for b in range(2):
        spx = torch.from_numpy(np.kron(_spx(seed + b), np.ones((1, 2), np.uint8))[:TR_HW[0], :TR_HW[1]].astype(np.int64))
        keep = torch.isin(spx, torch.tensor([1, 5, 7, 12, 20, 33]))
        y[b][~keep] = 255
    return x, y


def _run_d2ada_upstream(monkeypatch, net, x, y, freeze, lr):
    """BaseTrainer.__init__ (SGD: backbone lr, classifier 10 lr, momentum 0.9, weight decay; PolyLR; CE ignore 255)
    with get_model returning the prepared network and the trainer's hard cuda:0 device the CPU, then its train_impl
    for one iteration (the loop body train_ADA.py's Trainer.train runs: freeze_bn, forward, CE, backward, step)."""
    _shims(monkeypatch)
    real_device = torch.device
    with H.upstream("D2ADA"), monkeypatch.context() as m:
        ba = __import__("agent.base_agent", fromlist=["x"])
        m.setattr(ba, "get_model", lambda **k: net)
        rec = H.record_steps(m, watch=[net])
        args = types.SimpleNamespace(model_save_dir=".", num_classes=C, model="deeplabv3plus_resnet50", output_stride=16,
                                     separable_conv=False, train_lr=lr, weight_decay=5e-4, finetune_itrs=1000,
                                     total_itrs=1000, loss_type="cross_entropy", ignore_idx=255, freeze_bn=freeze)
        m.setattr(torch, "device", lambda *a, **k: real_device("cpu"))
        tr = ba.BaseTrainer(args, None, 1)
        m.setattr(torch, "device", real_device)
        tr.device = real_device("cpu")
        tr.train_dataset_loader = iter([{"images": x.clone(), "labels": y.clone()}])
        torch.manual_seed(7)  # the same Dropout(0.1) mask of the ASPP projection on both sides
        tr.train_impl(1, 10 ** 9)
    return rec


def _run_d2ada_ours(monkeypatch, tmp_path, model, x, y, freeze, lr):
    """d2ada/train_ada.py:train_round for one iteration (--stop-iter 1 of --iters 1000) with its region-labelled
    data stream replaced by the same batch."""
    from d2ada import train_ada
    args = train_ada.parse_args(["--out", str(tmp_path / "ours"), "--iters", "1000", "--stop-iter", "1", "--lr",
                                 str(lr), "--weight-decay", "5e-4", "--freeze-bn", str(int(freeze)), "--amp", "off",
                                 "--device", "cpu", "--workers", "0", "--batch-size", "2", "--save-every", "1000"])
    log = types.SimpleNamespace(log=lambda *a, **k: None)
    with monkeypatch.context() as m:
        m.setattr(train_ada.R, "RegionLabeledSet", lambda *a, **k: None)
        m.setattr(train_ada.R, "ConcatSet", lambda *a, **k: None)
        m.setattr(train_ada, "infinite_loader", lambda *a, **k: iter([{"image": x.clone(), "label": y.clone()}]))
        rec = H.record_steps(m, watch=[model])
        torch.manual_seed(7)  # the same Dropout(0.1) mask of the ASPP projection on both sides
        train_ada.train_round(args, 1, model, {}, types.SimpleNamespace(norm=None), None, {}, {},
                              torch.device("cpu"), None, 0, 1, tmp_path, log)
    return rec


import pytest  # noqa: E402


@pytest.mark.parametrize("freeze", [True, False])
def test_training_iteration_on_a_region_labelled_batch(tmp_path, monkeypatch, freeze):
    """One fine-tuning iteration of a round (DeepLabV3+ ResNet-50, output stride 16, random weights and BN
    statistics; a batch of 2 whose labels are 6 superpixels per image, the rest 255): upstream BaseTrainer.train_impl
    vs our train_round from the same weights (ours through d2ada.releases.from_d2ada, strict): the two SGD groups' lrs,
    every weight and BN statistic after the step, every momentum buffer. BN frozen (paper: freeze_bn) and in training
    mode. lr 1e-3 (paper 2.5e-4) so that the step moves the weights by more than the tolerance. The global RNG is
    seeded alike before each side's iteration: the ASPP projection's Dropout(0.1) (both models) then draws the same
    mask (without it the losses differ by 10%)."""
    from d2ada import releases
    from d2ada.model import DeepLabV3PlusD2ADA
    x, y = _region_batch(50)
    lr = 1e-3
    with H.upstream("D2ADA"):
        seg = __import__("models.segmentation", fromlist=["x"])
        net = H.randomize(seg.deeplabv3plus_resnet50(num_classes=C, output_stride=16, pretrained_backbone=False), 51)
    init = H.clone_state(net)
    sd, cfg = releases.from_d2ada({"model_state_dict": init}, "upstream initial weights")
    ours = H.load_strict(DeepLabV3PlusD2ADA(C, cfg["backbone"], 16), sd)
    rec_t = _run_d2ada_upstream(monkeypatch, net, x, y, freeze, lr)
    rec = _run_d2ada_ours(monkeypatch, tmp_path, ours, x, y, freeze, lr)
    off = "D2ADA agent/base_agent.py:BaseTrainer.train_impl (+ __init__'s SGD / PolyLR / CE)"
    what = f"D2ADA round fine-tuning, BN {'frozen' if freeze else 'training'}"
    assert len(rec) == 1 and len(rec_t) == 1 and len(rec[0].steps) == 1 and len(rec_t[0].steps) == 1
    H.compare(f"{what}: SGD group learning rates", torch.tensor(rec[0].lrs[0]), torch.tensor(rec_t[0].lrs[0]),
              official=off)
    after_t = {k: v for k, v in releases.from_d2ada({"model_state_dict": rec_t[0].steps[0].modules[0]}, "x")[0].items()}
    moved = max(float((after_t[k] - v).abs().max() / v.abs().max().clamp(min=1e-30)) for k, v in sd.items()
                if v.is_floating_point())
    assert moved > 1e-3, f"the step hardly moved the weights ({moved:.1e} rel): the comparison would prove nothing"
    H.compare_states(f"{what}: weights and BN statistics after the step", rec[0].steps[0].modules[0], after_t,
                     official=off)
    # upstream parameter -> our name: from_d2ada renames without copying, so the renamed entry shares its storage
    where = {v.data_ptr(): k for k, v in releases.from_d2ada({"model_state_dict": net.state_dict()}, "x")[0].items()}
    ours_name = {id(p): where[p.data_ptr()] for p in net.parameters()}
    buf_t = {f"{ours_name[i]}:{k}": v for i, s in rec_t[0].steps[0].state.items() for k, v in s.items()}
    buf = H.state_by_name(rec[0].steps[0].state, ours)
    H.compare_states(f"{what}: SGD momentum buffers", buf, buf_t, official=off)
