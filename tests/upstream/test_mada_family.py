"""mada/ against the official MADA (munanning/MADA @ 2356c24) and MADAv2 (munanning/MADAv2 @ 1c4fb81) code
(tests/upstream/README.md): the per-image class mean vectors, the anchor distance score, THE SELECTED IMAGE LIST
(the official selection functions driven end to end on the same features, ties included), the soft anchor loss,
its gradient and the nearest-anchor update. CPU, fp32 features (the selection scores in float64 on both sides).
Run: SEGDA_UPSTREAM=DIR python -m pytest -q tests/upstream/test_mada_family.py -m upstream

One MADA stage-2 iteration is driven through upstream's own CustomModel (built by its __init__ from a minimal
config; the DeepLab builder returns a prepared network, load_PredNet a no-op) and step_active_stage2, against our
train_stage2.main (test_mada_stage2_training_iteration; [released]: with --released-sched-order, the lr exactly).
One MADAv2 step-2 iteration is driven the same way through upstream's CustomModel of adaptation_model_AEL.py and
step_active_stage2 (teacher, bank draw, class-aware CutMix, OHEM, entropy filter, class-rate-sampled consistency,
anchor loss, SGD), against our train_stage2_semi.main resumed from the same state
(test_madav2_step2_training_iteration; [released*]: upstream unpatched in deviations 2, 3, 4, 6 against ours with
--released).
"""
import copy
import random
import json
import runpy
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from upstream import harness as H
from mada import core

C, D = 19, 256
K = 10


def _features(n, seed, hw=(12, 16)):
    """n images of (feat (1, 256, h, w), logits (1, 19, h, w)): a few dominant classes per image, some with fewer
    than 10 pixels (absent rows), as decoder features look (non-negative, post-ReLU)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        feat = torch.relu(torch.randn(1, D, *hw, generator=g))
        logits = torch.randn(1, C, *hw, generator=g)
        keep = torch.randperm(C, generator=g)[:5]
        logits[:, keep] += 3.0 * torch.rand(5, 1, 1, generator=g)
        out.append((feat, logits))
    return out


def _anchors(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.rand(K, C, D, generator=g)).numpy().astype(np.float32)


def _ours_vectors(items):
    vec, cnt = zip(*(core.objective_vectors(f, lg, lg.argmax(1), C) for f, lg in items))
    return torch.cat(vec).numpy(), torch.cat(cnt).numpy()


class _Loader(list):
    batch_size = 1


def _drive_mada_select(tmp_path, monkeypatch, items, anchors):
    """Run MADA's select_active_samples.Select (the real function) on fake data: its dataset factory and its
    CustomModel replaced by stand-ins serving `items`; the model's calculate_mean_vector / process_label are the
    official CustomModel methods. anchors: an array (saved as upstream saves it) or the path of an anchor file
    (copied: the shipped one). Returns (the written list, the index file)."""
    names = [f"/data/leftImg8bit/train/city/img{i:04d}_leftImg8bit.png" for i in range(len(items))]
    (tmp_path / "anchors").mkdir()
    (tmp_path / "selection_list").mkdir()
    if isinstance(anchors, np.ndarray):
        torch.save(anchors.reshape(K, C * D), tmp_path / "anchors" / "cluster_centroids_full_10.pkl")
    else:
        shutil.copy(anchors, tmp_path / "anchors" / "cluster_centroids_full_10.pkl")
    monkeypatch.chdir(tmp_path)
    real_load = torch.load
    # torch >= 2.6 loads weights_only by default, which refuses the numpy array upstream saved (a file the test wrote)
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: real_load(f, *a, **{**k, "weights_only": False}))
    with H.upstream("MADA"):
        am = __import__("models.adaptation_model", fromlist=["CustomModel"])
        sas = __import__("select_active_samples")
        fake = types.SimpleNamespace(class_numbers=C, iter=0, PredNet=types.SimpleNamespace(training=False))
        fake.process_label = types.MethodType(am.CustomModel.process_label, fake)
        fake.calculate_mean_vector = types.MethodType(am.CustomModel.calculate_mean_vector, fake)
        served = iter(items)
        fake.PredNet_Forward = lambda x: (None, None) + next(served)
        ds = types.SimpleNamespace(
            target_train_loader=_Loader([(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4), [n]) for n in names]),
            target_train=types.SimpleNamespace(get_remainings=lambda: list(names)),
            target_valid_loader=_Loader())
        monkeypatch.setattr(sas, "create_dataset", lambda cfg, w, lg: ds)
        monkeypatch.setattr(sas, "CustomModel", lambda cfg, w, lg: fake)
        monkeypatch.setattr(sas, "print", lambda *a, **k: None, raising=False)
        sas.Select({"model": {"default_gpu": 0}, "training": {"epoches": 1}, "seed": 1337}, None, H._Anything())
    lst = (tmp_path / "selection_list" / "stage1_cac_list_0.05.txt").read_text().split()
    idx = [int(x) for x in (tmp_path / "selection_list" / "stage1_cac_index_0.05.txt").read_text().split()]
    return lst, idx, names


def _drive_madav2_select(tmp_path, monkeypatch, vectors, src, tgt):
    """Run MADAv2's step1_select_active_samples.py as __main__ (unmodified) in a scratch folder holding the
    anchors (arrays saved as upstream saves them, or the paths of anchor files: copied), the target objective
    vectors and data/target_names.txt it reads."""
    n = len(vectors)
    names = [f"city/img{i:04d}_leftImg8bit.png" for i in range(n)]
    for d in ("anchors", "features", "selection_list", "data"):
        (tmp_path / d).mkdir()
    for a, fname in ((src, "cluster_centroids_sub_10.pkl"), (tgt, "cluster_centroids_sub_10_target_warmup.pkl")):
        if isinstance(a, np.ndarray):
            torch.save(a.reshape(K, C * D), tmp_path / "anchors" / fname)
        else:
            shutil.copy(a, tmp_path / "anchors" / fname)
    torch.save(np.asarray(vectors, np.float64), tmp_path / "features" / "target_full_dataset_objective_vectors_warmup.pkl")
    (tmp_path / "data" / "target_names.txt").write_text("".join(x + "\n" for x in names))
    monkeypatch.chdir(tmp_path)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: real_load(f, *a, **{**k, "weights_only": False}))
    with H.upstream("MADAv2"):
        runpy.run_path(str(H.repo("MADAv2") / "step1_select_active_samples.py"), run_name="__main__")
    lst = (tmp_path / "selection_list" / "stage1_cac_list_0.05_dual_dis_far.txt").read_text().split()
    idx = [int(x) for x in (tmp_path / "selection_list" / "stage1_cac_index_0.05_dual_dis_far.txt").read_text().split()]
    return lst, idx, names


# ------------------------------------------------------------------------------------------------
# Objective vectors and distances
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["MADA", "MADAv2"])
def test_mean_vectors_and_pooling_gradient(name):
    """calculate_mean_vector (target: label = own argmax; source: a label with ignore pixels) == our objective
    vectors, rows and absent classes; MADA's NormalisationPoolingFunction gradient == our grad='pooling'."""
    g = torch.Generator().manual_seed(1)
    feat0, logits = _features(1, 3)[0]
    feat0 = torch.cat([feat0, _features(1, 4)[0][0]])
    logits = torch.cat([logits, _features(1, 4)[0][1]])
    gt = logits.argmax(1).clone()
    gt[:, :3] = 255                                           # ignore rows
    gt[torch.rand(gt.shape, generator=g) < 0.3] = 7           # label != prediction on 30% of pixels
    with H.upstream(name):
        am = __import__("models.adaptation_model", fromlist=["CustomModel"])
        fake = types.SimpleNamespace(class_numbers=C)
        fake.process_label = types.MethodType(am.CustomModel.process_label, fake)
        for label, what in ((logits.argmax(1), "target"), (gt, "source")):
            feat = feat0.clone().requires_grad_()
            vecs, ids = am.CustomModel.calculate_mean_vector(fake, feat, logits, label[:, None].float())
            # upstream loops over the batch writing (image, class) rows in order; rebuild per image
            theirs = torch.zeros(2, C, D)
            n, last = 0, -1
            for v, t in zip(vecs, ids):
                n += int(t <= last)
                last = t
                theirs[n, t] = v.squeeze()
            w = torch.randn(2, C, D, generator=g)
            (theirs * w).sum().backward()
            g_theirs = feat.grad.clone()
            feat.grad = None
            ours, counts = core.objective_vectors(feat, logits, label, C, grad="pooling" if name == "MADA" else "mean")
            (ours * w).sum().backward()
            H.compare(f"{what} objective vectors", ours, theirs,
                      official=f"{name} models/adaptation_model.py:CustomModel.calculate_mean_vector")
            H.compare(f"{what} present classes", counts >= 10, theirs.abs().sum(-1) > 0)
            if name == "MADA":
                H.compare(f"{what} vector gradient (NormalisationPooling)", feat.grad, g_theirs,
                          official="MADA models/utils.py:NormalisationPoolingFunction.backward")


@pytest.mark.parametrize("name", ["MADA", "MADAv2"])
def test_min_mse_score(name):
    """calculate_min_mse of the selection script (numpy, float64 vector, float32 centroids): the min distance and
    its anchor index == our min_distances."""
    items = _features(6, 5)
    vec, cnt = _ours_vectors(items)
    anchors = _anchors(6, 0.3)
    script = "select_active_samples" if name == "MADA" else "step1_select_active_samples"
    with H.upstream(name):
        mod = __import__(script)
        cf = mod.Class_Features(numbers=C) if name == "MADA" else mod.Class_Features(anchors, numbers=C)
        cf.centroids = anchors
        mod.print = lambda *a, **k: None
        out = [cf.calculate_min_mse(v.astype(np.float64)) for v in vec]
    theirs = np.array([o if name == "MADA" else o[0] for o in out])
    dist, idx = core.min_distances(vec, cnt, anchors)
    H.compare("min anchor distance", torch.from_numpy(dist), torch.from_numpy(theirs),
              official=f"{name} {script}.py:Class_Features.calculate_min_mse")
    if name == "MADAv2":
        H.compare("nearest anchor index", torch.from_numpy(idx), torch.tensor([o[1] for o in out]))


# ------------------------------------------------------------------------------------------------
# The selected image list
# ------------------------------------------------------------------------------------------------
def test_mada_selection_list(tmp_path, monkeypatch):
    """MADA select_active_samples.py:Select driven end to end (per-image vectors from the official
    calculate_mean_vector, calculate_min_mse, heapq.nlargest + list.index, int(0.05 N)) vs our objective_vectors,
    selection_scores('mada'), budget_count('floor'), top_k, write_official_selection: the same list file."""
    items = _features(120, 7)
    anchors = _anchors(8, 0.3)
    lst, idx, names = _drive_mada_select(tmp_path, monkeypatch, items, anchors)
    vec, cnt = _ours_vectors(items)
    chosen = core.top_k(core.selection_scores(vec, cnt, anchors, None, "mada"), core.budget_count(len(items), 0.05))
    ours_lst, ours_idx = core.write_official_selection(tmp_path / "ours", [f"leftImg8bit/train/city/{names[i].split('/')[-1]}"
                                                                           for i in chosen], chosen, "mada", 0.05)
    assert len(idx) == 6
    H.compare("selected indices (120 images, 6 picks)", torch.tensor(chosen), torch.tensor(idx),
              official="MADA select_active_samples.py:Select")
    assert ours_lst.read_text().split() == lst and [int(x) for x in ours_idx.read_text().split()] == idx


def test_madav2_selection_list(tmp_path, monkeypatch):
    """MADAv2 step1_select_active_samples.py run unmodified (dual distance: source + target warm-up anchors,
    round(0.05 N)) vs our selection_scores('madav2') + budget_count('round') + top_k: the same list and index file."""
    vec, cnt = _ours_vectors(_features(130, 9))
    src, tgt = _anchors(10, 0.3), _anchors(11, 0.2)
    lst, idx, names = _drive_madav2_select(tmp_path, monkeypatch, vec, src, tgt)
    chosen = core.top_k(core.selection_scores(vec, cnt, src, tgt, "madav2"),
                        core.budget_count(len(vec), 0.05, "round"))
    assert len(idx) == 6  # round(6.5) = 6: Python rounds halves to even (found here; budget_count fixed)
    H.compare("selected indices (130 images, round(6.5) = 6 picks)", torch.tensor(chosen), torch.tensor(idx),
              official="MADAv2 step1_select_active_samples.py:__main__")
    ours_lst, _ = core.write_official_selection(tmp_path / "ours", ["leftImg8bit/train/" + names[i] for i in chosen], chosen,
                                                "madav2", 0.05)
    assert ours_lst.read_text().split() == lst


SHIPPED = {"MADA": ("anchors/cluster_centroids_full_10.pkl",),
           "MADAv2": ("anchors/cluster_centroids_sub_10.pkl", "anchors/cluster_centroids_sub_10_target_warmup.pkl")}


@pytest.mark.parametrize("name", ["MADA", "MADAv2"])
def test_shipped_anchors_select_the_same_list(tmp_path, monkeypatch, name):
    """The anchor files the official repositories ship (MADA: the source anchors, torch legacy format; MADAv2: source
    and target warm-up anchors, zip archives), given as they are to upstream's selection script and to ours
    (mada/select_active.py main(), the files through --source-anchors / --target-anchors, read by
    common.safe_pickle), on the same objective vectors (upstream's from its own calculate_mean_vector for MADA): the
    same selected list and list file. (The vectors are synthetic, not the authors' warm-up features, which are a
    Drive download: the list is not theirs, the computation is.)"""
    from mada import select_active
    files = [H.repo(name) / f for f in SHIPPED[name]]
    n = 120 if name == "MADA" else 130
    items = _features(n, 40)
    vec, cnt = _ours_vectors(items)
    up = tmp_path / "upstream"
    up.mkdir()
    if name == "MADA":
        lst, idx, names = _drive_mada_select(up, monkeypatch, items, files[0])
        ours_names = ["leftImg8bit/train/city/" + x.split("/")[-1] for x in names]
    else:
        lst, idx, names = _drive_madav2_select(up, monkeypatch, vec, files[0], files[1])
        ours_names = ["leftImg8bit/train/" + x for x in names]
    monkeypatch.chdir(tmp_path)
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "vectors.npy", vec)
    np.save(feats / "counts.npy", cnt)
    (feats / "meta.json").write_text(json.dumps({"domain": "target", "dataset": "cityscapes", "names": ours_names,
                                                 "root": str(tmp_path), "min_pixels": 10, "checkpoint": None}))
    flags = ["--source-anchors", str(files[0])] + (["--criterion", "madav2", "--target-anchors", str(files[1])]
                                                   if name == "MADAv2" else [])
    select_active.main(select_active.parse_args(["--features", str(feats), "--sheet", "0", "--out",
                                                 str(tmp_path / "ours"), *flags]))
    chosen = json.loads((tmp_path / "ours" / "selected.json").read_text())["indices"]
    assert len(idx) == 6
    H.compare(f"{name}: selected indices with the shipped anchors ({n} images, {len(idx)} picks)",
              torch.tensor(chosen), torch.tensor(idx),
              official=f"{name} " + ("select_active_samples.py:Select" if name == "MADA" else
                                     "step1_select_active_samples.py:__main__") + " with " + ", ".join(SHIPPED[name]))
    suffix = "" if name == "MADA" else "_dual_dis_far"
    ours_lst = (tmp_path / "ours" / "selection_list" / f"stage1_cac_list_0.05{suffix}.txt").read_text().split()
    assert ours_lst == lst


@pytest.mark.parametrize("name", ["MADA", "MADAv2"])
def test_selection_tie_rule(tmp_path, monkeypatch, name):
    """Listed deviation (mada/README.md, deviations): on exactly tied scores upstream's
    `map(dis.index, heapq.nlargest(k, dis))` maps every tied value to its FIRST index, so a tied image is picked
    twice and the list holds k-1 distinct images; ours (top_k: ties by the lower index, each image once) picks the
    next tied image instead. Tie: three copies of the farthest image (identical features) among 120 (MADA) /
    130 (MADAv2). The test shows exactly that difference and nothing else."""
    n = 120 if name == "MADA" else 130
    items = _features(n, 12)
    vec, cnt = _ours_vectors(items)
    src, tgt = _anchors(13, 0.3), _anchors(14, 0.2)
    crit, rounding = ("mada", "floor") if name == "MADA" else ("madav2", "round")
    scores = core.selection_scores(vec, cnt, src, tgt if name == "MADAv2" else None, crit)
    far = int(np.argmax(scores))
    copies = [far] + [j for j in range(n) if j != far][:2]       # images 0/1 (or 0/1/2) become copies of `far`
    for j in copies[1:]:
        items[j] = items[far]
    vec, cnt = _ours_vectors(items)
    if name == "MADA":
        _, idx, _ = _drive_mada_select(tmp_path, monkeypatch, items, src)
    else:
        _, idx, _ = _drive_madav2_select(tmp_path, monkeypatch, vec, src, tgt)
    ours = core.top_k(core.selection_scores(vec, cnt, src, tgt if name == "MADAv2" else None, crit),
                      core.budget_count(n, 0.05, rounding)).tolist()
    first = min(copies)
    expected_upstream = sorted([first] * 3 + [i for i in ours if i not in copies])
    assert sorted(copies) == [i for i in ours if i in copies], "ours picks each tied copy once"
    assert idx == expected_upstream, f"upstream {idx}, expected {expected_upstream}"
    assert len(set(idx)) == len(ours) - 2 and len(idx) == len(ours)
    H.record(f"tie rule: 3 tied images among {len(ours)} picks", 2, 0.0, True,
             official=f"{name} {'select_active_samples.py:Select' if name == 'MADA' else 'step1_select_active_samples.py'}"
             ": heapq.nlargest + list.index",
             note=f"upstream {idx} (image {first} three times) vs ours {ours}: listed deviation", n=len(ours))


# ------------------------------------------------------------------------------------------------
# Stage 2: the soft anchor loss, its gradient, the anchor update, the pseudo-label
# ------------------------------------------------------------------------------------------------
def test_anchor_loss_gradient_and_update():
    """MADA stage 2 (models/adaptation_model.py:step_active_stage2's anchor branch): target vectors from the
    model's own argmax (calculate_mean_vector, NormalisationPooling), the objective matrix, calculate_min_mse's
    soft loss K / sum 1/d_k and nearest index, the gradient w.r.t. the decoder feature, the 0.999 EMA of the
    nearest anchor, and the pseudo-label (argmax at 1/4 resolution) == our batch_anchor_loss /
    update_nearest_anchor."""
    feat0, logits = _features(1, 21)[0]
    anchors = _anchors(22, 0.3)
    with H.upstream("MADA"):
        am = __import__("models.adaptation_model", fromlist=["CustomModel"])
        fake = types.SimpleNamespace(class_numbers=C, centroids=anchors.copy())
        fake.process_label = types.MethodType(am.CustomModel.process_label, fake)
        feat = feat0.clone().requires_grad_()
        pl = F.softmax(logits, dim=1).argmax(dim=1, keepdim=True)
        vecs, ids = am.CustomModel.calculate_mean_vector(fake, feat, logits, pl.float())
        obj = torch.zeros([C, D])
        for t in range(len(ids)):
            obj[ids[t]] = vecs[t].squeeze()
        loss_t, k_t = am.CustomModel.calculate_min_mse(fake, obj)
        (0.7 * loss_t).sum().backward()
        g_theirs = feat.grad.clone()
        fake.centroids[k_t] = fake.centroids[k_t] * 0.999 + 0.001 * obj.detach().cpu().numpy()
    feat = feat0.clone().requires_grad_()
    a = torch.from_numpy(anchors.copy())
    loss, vec, present, d = core.batch_anchor_loss(feat, logits, a, C)
    (0.7 * loss).backward()
    k = core.update_nearest_anchor(a, vec, present, d)
    off = "MADA models/adaptation_model.py:CustomModel.calculate_min_mse"
    H.compare("soft anchor loss", loss.detach(), loss_t.detach().reshape(()), official=off)
    H.compare("anchor loss gradient w.r.t. the feature", feat.grad, g_theirs, official=off)
    H.compare("nearest anchor", k, torch.tensor([k_t]))
    H.compare("anchors after the update", a, torch.from_numpy(fake.centroids),
              official="MADA models/adaptation_model.py:step_active_stage2 (centroid EMA)")
    H.compare("pseudo-label (argmax)", logits.argmax(1), pl[:, 0],
              official="MADA models/adaptation_model.py:step_active_stage2 (target_outputs_argmax)")



# ------------------------------------------------------------------------------------------------
# Stage 2: one full training iteration, upstream's CustomModel.step_active_stage2 driven
# ------------------------------------------------------------------------------------------------
class _UpstreamHeads(torch.nn.Module):
    """Upstream's DeepLab returns (feat, feat_low, feat_cls, output); this gives our network that interface
    (feat_cls = the 256-ch decoder feature before the classifier, output = the logits at 1/4)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        o = self.net(x, return_feat=True)
        return None, None, o["feat"], o["out"]


def _stage2_batch(seed, hw=(64, 64)):
    """Source and active: 2 distinct images with labels (a few pixels ignored: 255 ours, 250 upstream); target:
    one image twice (see the test's docstring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *hw, generator=g)
    y = torch.randint(0, C, (2, *hw), generator=g)
    y[:, :4] = 255
    xa = torch.randn(2, 3, *hw, generator=g)
    ya = torch.randint(0, C, (2, *hw), generator=g)
    ya[:, :, :3] = 255
    xt = torch.randn(1, 3, *hw, generator=g).expand(2, -1, -1, -1).clone()
    return x, y, xa, ya, xt


def _upstream_label(y):
    return torch.where(y == 255, torch.full_like(y, 250), y)


def _run_mada_stage2_upstream(monkeypatch, net, batch, anchors, lr, max_iter, seed):
    """upstream train_active_stage2.py:train's per-iteration calls (scheduler_step, train, optimizer_zerograd,
    step_active_stage2) on a CustomModel built from a minimal config: DeepLab -> the prepared network (PredNet: a
    copy, unused by the step), its SGD / PolynomialLR / cross_entropy2d built by __init__ as released."""
    import copy
    x, y, xa, ya, xt = batch
    cfg = {"model": {"default_gpu": 0, "bn": "bn", "basenet": {"version": "resnet101"}, "init": {},
                     "pretrained": False},
           "training": {"valid_classes": list(range(C)), "cls_feature_weight": 0.7, "resume_flag": False,
                        "Pred_resume": "/nonexistent", "loss_L2_cls": True, "loss_pseudo_label": True,
                        "loss_source_seg": True,
                        "optimizer": {"name": "SGD", "lr": lr, "weight_decay": 2.0e-4, "momentum": 0.9},
                        "loss": {"name": "cross_entropy", "size_average": True},
                        "lr_schedule": {"name": "poly_lr", "gamma": 0.9, "max_iter": max_iter}}}
    init = H.clone_state(net)
    built = iter([_UpstreamHeads(copy.deepcopy(net)), _UpstreamHeads(net)])   # PredNet first, then BaseNet
    with H.upstream("MADA"), monkeypatch.context() as m:
        am = __import__("models.adaptation_model", fromlist=["CustomModel"])
        m.setattr(am, "DeepLab", lambda **k: next(built))
        # PredNet's stage-1 checkpoint (the step never uses PredNet; BaseNet gets the prepared weights below)
        m.setattr(am.CustomModel, "load_PredNet", lambda self, *a, **k: None)
        rec = H.record_steps(m, watch=[net])
        model = am.CustomModel(cfg, None, H._Anything())
        H.load_strict(model.BaseNet.net, init)     # setup()'s init_weights re-initialised it: the prepared weights
        model.centroids = anchors.copy()
        losses, mse = [], []
        real_fn, real_mse = model.loss_fn, model.calculate_min_mse
        model.loss_fn = lambda **k: losses.append(real_fn(**k)) or losses[-1]
        model.calculate_min_mse = lambda v: mse.append(real_mse(v)) or mse[-1]
        model.iter = 1
        model.scheduler_step()
        model.train()
        model.optimizer_zerograd()
        torch.manual_seed(seed)                   # the same dropout masks on both sides
        out = model.step_active_stage2(x, _upstream_label(y), xt, None, xa, _upstream_label(ya))
    return rec, model, losses, mse, out


def _run_mada_stage2_ours(monkeypatch, tmp_path, net, batch, anchors, lr, max_iter, seed, flags=()):
    """mada/train_stage2.py:main for one iteration (--stop-iter 1) with its checkpoint, datasets and loaders
    replaced by the prepared network and the same batch; evaluation a no-op."""
    from mada import train_stage2 as T
    x, y, xa, ya, xt = batch
    args = T.parse_args(["--out", str(tmp_path / "ours"), "--iters", str(max_iter), "--stop-iter", "1", "--lr",
                         str(lr), "--batch-size", "2", "--amp", "off", "--device", "cpu", "--workers", "0",
                         "--seed", str(seed), "--eval-every", "1000", "--save-every", "1000", *flags])
    mcfg = {"model": "deeplabv3plus", "backbone": "resnet18", "num_classes": C, "norm": "imagenet"}
    streams = iter([[{"image": x, "label": y}], [{"image": xa, "label": ya}], [{"image": xt}]])
    arr = anchors.copy()
    losses, anchor_out = [], []
    with monkeypatch.context() as m:
        m.setattr(T.rt, "check_inputs", lambda *a, **k: None)     # no checkpoint/dataset files: all replaced
        m.setattr(T, "load_segmenter", lambda *a, **k: (net, mcfg, "ours"))
        m.setattr(T, "resolve_domain", lambda name, root, role: ("gta5" if role == "source" else "cityscapes",
                                                                   "real", "/nonexistent"))
        m.setattr(T, "train_set", lambda *a, **k: None)
        m.setattr(T, "infinite_loader", lambda *a, **k: iter(next(streams)))
        m.setattr(T, "evaluate", lambda *a, **k: {"mIoU": 0.0})
        m.setattr(T, "format_table", lambda res: "")
        m.setattr(T.core, "read_selection", lambda *a: ["img"])
        m.setattr(T.core, "eval_set_at", lambda *a, **k: None)
        m.setattr(T.core, "subset_by_names", lambda *a, **k: None)
        m.setattr(T.core, "load_anchors", lambda *a, **k: (arr, np.ones((K, C), bool)))
        real_ce, real_bal = T.cross_entropy, T.core.batch_anchor_loss
        m.setattr(T, "cross_entropy", lambda *a, **k: losses.append(real_ce(*a, **k)) or losses[-1])
        m.setattr(T.core, "batch_anchor_loss", lambda *a, **k: anchor_out.append(real_bal(*a, **k)) or anchor_out[-1])
        rec = H.record_steps(m, watch=[net])
        T.main(args)
    return rec, arr, losses, anchor_out


@pytest.mark.parametrize("sched", ["ours", "released"])
def test_mada_stage2_training_iteration(tmp_path, monkeypatch, sched):
    """One MADA stage-2 iteration: upstream models/adaptation_model.py:CustomModel.step_active_stage2 (with
    train_active_stage2.py:train's scheduler_step / train / optimizer_zerograd before it), the CustomModel built by
    its own __init__ from a minimal config (DeepLab builder -> the prepared network; SGD, PolynomialLR and
    cross_entropy2d as released), vs our mada/train_stage2.py:main for --stop-iter 1 on the same batch, weights and
    target anchors. The network on both sides is OUR DeepLabV3+ (ResNet-18, 256-ch decoder, random weights and BN
    statistics) behind upstream's 4-tuple interface: this compares the training step (losses, pseudo-labels, anchor
    branch, backward, SGD), not the networks. BN in training mode (freeze_bn False); the dropout layers at p = 0
    on both sides (two twin images draw different masks and stop being twins; the global RNG is still seeded alike
    before each side's iteration). Compared: the active / source / pseudo-label CE, the soft anchor
    loss, each SGD group's lr, every weight and BN statistic after the step, every momentum buffer, the anchors.

    Two things are shown, not hidden: (1) the target batch is one image twice, because BN in training mode needs 2
    samples for the ASPP pooling branch and with 2 *different* images upstream merges their vectors into one
    [19, 256] matrix (listed deviation 11); with twins, upstream's merged matrix equals each image's vector, but it
    updates the nearest anchor once where ours updates it once per image (deviation 11): ours is checked against
    upstream's EMA applied twice. (2) upstream steps its PolynomialLR *before* the first optimizer step, so
    iteration i (from 0) runs at poly(i + 1) where ours runs at poly(i) (deviation 21): with sched "ours" (our
    default) that is recorded and our base lr set to upstream's first-step lr so that everything else is compared;
    with sched "released" ours runs with --released-sched-order from the same base lr, and the first step's lr is
    upstream's EXACTLY."""
    H.repo("MADA")
    from common.models import DeepLabV3Plus
    lr, max_iter, seed = 1e-2, 100, 5
    batch = _stage2_batch(31)
    anchors = _anchors(32, 0.3)
    net_t = H.randomize(DeepLabV3Plus(C, "resnet18"), 33)
    init = H.clone_state(net_t)
    net = H.load_strict(DeepLabV3Plus(C, "resnet18"), init)
    for m in (*net_t.modules(), *net.modules()):   # twins must stay twins: no dropout (see the docstring)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rec_t, model_t, losses_t, mse_t, out_t = _run_mada_stage2_upstream(monkeypatch, net_t, batch, anchors, lr,
                                                                     max_iter, seed)
    lr_t = rec_t[0].lrs[0][0]
    if sched == "ours":
        H.record("poly lr of the first step: ours poly(0) vs upstream poly(1)", abs(lr - lr_t), abs(lr - lr_t) / lr_t,
                 False, official="MADA train_active_stage2.py:train (scheduler_step before step_active_stage2)",
                 note=f"lr {lr} max_iter {max_iter}: upstream {lr_t:.6e} = lr (1 - 1/{max_iter})^0.9; listed deviation 21")
        rec, arr, losses, anchor_out = _run_mada_stage2_ours(monkeypatch, tmp_path, net, batch, anchors, lr_t,
                                                             max_iter, seed)
    else:
        rec, arr, losses, anchor_out = _run_mada_stage2_ours(monkeypatch, tmp_path, net, batch, anchors, lr,
                                                             max_iter, seed, ["--released-sched-order"])
        # ours: two groups (backbone, heads at 1x); upstream: one
        assert rec[0].lrs[0] == rec_t[0].lrs[0] * 2, f"lr ours {rec[0].lrs[0]} vs upstream {rec_t[0].lrs[0]}"
    off = "MADA models/adaptation_model.py:CustomModel.step_active_stage2"
    what = "MADA stage-2 iteration"
    assert len(rec) == 1 and len(rec_t) == 1 and len(rec[0].steps) == 1 and len(rec_t[0].steps) == 1
    exactly = " (--released-sched-order: exactly)" if sched == "released" else ""
    H.compare(f"{what}: SGD group learning rates{exactly}", torch.tensor(rec[0].lrs[0]),
              torch.tensor(rec_t[0].lrs[0] * 2),
              official="MADA models/adaptation_model.py:CustomModel.__init__ (SGD, PolynomialLR)")
    assert len(losses) == 3 and len(losses_t) == 3 and len(mse_t) == 2 and len(anchor_out) == 1
    for name, a, b in zip(("active CE", "source CE", "pseudo-label CE (own argmax, 1/4 resolution)"), losses, losses_t):
        H.compare(f"{what}: {name}", a.detach(), b.detach(), official=off)
    H.compare(f"{what}: soft anchor loss", anchor_out[0][0].detach(), mse_t[1][0].detach().reshape(()),
              official="MADA models/adaptation_model.py:CustomModel.calculate_min_mse")
    H.compare(f"{what}: 0.7 x anchor loss as returned", torch.tensor(0.7 * float(anchor_out[0][0])),
              torch.tensor(out_t[1]), official=off)
    after_t = {k[len("net."):]: v for k, v in H.clone_state(model_t.BaseNet).items()}
    moved = max(float((after_t[k] - v).abs().max() / v.abs().max().clamp(min=1e-30)) for k, v in init.items()
                if v.is_floating_point())
    assert moved > 1e-3, f"the step hardly moved the weights ({moved:.1e} rel): the comparison would prove nothing"
    H.compare_states(f"{what}: weights and BN statistics after the step", rec[0].steps[0].modules[0],
                     rec_t[0].steps[0].modules[0], official=off)
    buf_t = H.state_by_name(rec_t[0].steps[0].state, net_t)
    buf = H.state_by_name(rec[0].steps[0].state, net)
    H.compare_states(f"{what}: SGD momentum buffers", buf, buf_t, official=off)
    k_t = mse_t[1][1]
    H.compare(f"{what}: nearest anchor", anchor_out[0][3].argmin(1), torch.tensor([k_t, k_t]))
    a0, a_t = torch.from_numpy(anchors), torch.from_numpy(model_t.centroids)
    H.compare(f"{what}: anchors after the step (upstream's EMA applied per image: twice)", torch.from_numpy(arr),
              1.999 * a_t - 0.999 * a0, official="MADA models/adaptation_model.py:step_active_stage2 (centroid EMA)")
    diff = float((torch.from_numpy(arr) - a_t).abs().max())
    H.record(f"{what}: anchors vs upstream's single update (twin target images)", diff,
             diff / float(a_t.abs().max()), False, official=off,
             note="listed deviation 11: one EMA per image (ours) vs one per batch (upstream)")


# ------------------------------------------------------------------------------------------------
# MADAv2 step 2: one semi-supervised training iteration, upstream's CustomModel.step_active_stage2 driven
# ------------------------------------------------------------------------------------------------
class _FrozenTeacher(_UpstreamHeads):
    """The teacher (upstream PredNet) behind upstream's interface, kept in eval mode: upstream's train() calls
    (step2_train_active_semi_sup.py:train before the loop, step_active_stage2 before its strong-image forward)
    leave it in eval (listed deviation 6: frozen teacher; the released train-mode forward is recorded apart)."""

    def train(self, mode=True):
        return super().train(False)


class _DrawsRng:
    """Stands in for our numpy Generator inside one semi.* call: integers() answers `index`, choice() answers
    `choice` (recording the probabilities it was given), uniform() the next of `uniforms`."""

    def __init__(self, index=0, choice=None, uniforms=()):
        self.index, self.choice_value, self.uniforms, self.seen = index, choice, list(uniforms), {}

    def integers(self, n):
        self.seen["integers"] = n
        return self.index

    def choice(self, n, p=None):
        self.seen["p"] = np.asarray(p).copy()
        return self.choice_value

    def uniform(self, *a, **k):
        return self.uniforms.pop(0)


class _TargetSet:
    """Our target train set in place: len() and [(index, seed)] -> {"image"} (the bank-sampled second image)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return {"image": self.images[i].clone(), "index": i}


class _Stop(Exception):
    pass


def _calls(m, owner, attr):
    """Wrap owner.attr; the returned list collects (args, return value) of every call."""
    real, seen = getattr(owner, attr), []

    def wrapper(*a, **k):
        out = real(*a, **k)
        seen.append((a, out))
        return out

    m.setattr(owner, attr, wrapper)
    return seen


def _inputs_of(net):
    """A forward pre-hook on net; the returned list collects each forward's input batch."""
    seen = []
    net.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone()))
    return seen


def _fixed_rand(u, shape, real):
    """torch.rand in place: the (H, W) map `u` for calls of that shape (the consistency sampling), else real."""
    calls = []

    def rand(*size, **kw):
        size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if size == tuple(shape):
            calls.append(size)
            return u.clone()
        return real(*size, **kw)

    return rand, calls


SEMI = dict(lr=2.0 ** -7, max_iter=1000, epoch_iters=2, epochs=200, min_kept=3000, n_target=8, id1=3, id2=6,
            uniforms=(0.37, 0.81, 0.23), seed=5)


def _semi_case(case):
    """Inputs of one step: labelled batch (2 distinct images, 3 ignored columns), the unlabelled pair (distinct,
    or twins for the anchor branch), 8 target images, anchors, the class confidence r and the CutMix bank before
    the step, the (H, W) uniform map of the consistency sampling (multiples of 1/1024: exact as 1 - u too)."""
    g = torch.Generator().manual_seed(41 if case == "region" else 42)
    hw = (64, 64)
    xa = torch.randn(2, 3, *hw, generator=g)
    ya = torch.randint(0, C, (2, *hw), generator=g)
    ya[:, :, :3] = 255
    images = [torch.randn(3, *hw, generator=g) for _ in range(SEMI["n_target"])]
    if case == "fallback":                                   # twins: see the test's docstring
        images[SEMI["id2"]] = images[SEMI["id1"]].clone()
    anchors = _anchors(43, 0.3)
    r = 0.8 * torch.rand(C, generator=g)
    bank = (torch.rand(C, SEMI["n_target"], generator=g) < 0.4).float()
    u = torch.randint(0, 1024, hw, generator=g).float() / 1024
    return xa, ya, images, anchors, r, bank, u


def _run_semi_upstream(monkeypatch, student, teacher, inputs, cat, epoch, rng_state, released=False):
    """train()'s calls before its loop (BaseNet / PredNet .train()) and per iteration (sample_from_bank with its two
    draws fixed to ours, the pair, scheduler_step, train, optimizer_zerograd) and step_active_stage2 on a
    CustomModel built by its own __init__ (minimal config of configs/active_from_gta_to_city_stage2.yml's keys;
    DeepLab -> teacher, then student behind upstream's 4-tuple; the student's optim_parameters = upstream's
    DeepLab.optim_parameters run on our modules). released=False: the teacher kept in eval mode and the stored r
    set to ours' (deviations 6 and 4 neutralised); True: the teacher takes upstream's train() calls and r is
    __init__'s own torch.rand(3, 19), answered with ours' row (inputs' r) in row 0."""
    from common import runtime as rt
    xa, ya, images, anchors, r, bank, u = inputs
    lr, s = SEMI["lr"], 2 * epoch                            # iterations done before this one (resume)
    cfg = {"model": {"default_gpu": 0, "bn": "bn", "basenet": {"version": "resnet101"}, "init": {},
                     "pretrained": False},
           "data": {"n_class": C},
           "training": {"valid_classes": list(range(C)), "cls_feature_weight": 0.1, "resume_flag": False,
                        "Pred_resume": "/nonexistent", "epoches": SEMI["epochs"],
                        "optimizer": {"name": "SGD", "lr": lr, "weight_decay": 2.0e-4, "momentum": 0.9},
                        "lr_schedule": {"name": "poly_lr", "gamma": 0.9, "max_iter": SEMI["max_iter"]}},
           "U2PL": {"contrastive": {"num_queries": 256, "low_entropy_threshold": 20}},
           "AEL": {"acp": {"momentum": 0.999, "number": 3},
                   "acm": {"number": 3, "area_thresh": 0.005, "area_thresh2": 0.01, "no_pad": True, "no_slim": True},
                   "criterion": {"cons": {"sample": True, "gamma": 2}, "type": "ohem",
                                 "kwargs": {"thresh": 0.7, "min_kept": SEMI["min_kept"]}}}}
    init = H.clone_state(student)
    got = types.SimpleNamespace()
    with H.upstream("MADAv2"), monkeypatch.context() as m:
        am = __import__("models.adaptation_model_AEL", fromlist=["CustomModel"])
        real_deeplab = __import__("models.deeplab", fromlist=["DeepLab"]).DeepLab
        uu = __import__("utils.utils", fromlist=["sample_from_bank"])

        class Student(_UpstreamHeads):
            def optim_parameters(self, lr):                   # upstream's grouping, on our modules
                mods = types.SimpleNamespace(backbone=self.net.backbone, aspp=self.net.aspp)
                mods.get_1x_lr_params = types.MethodType(real_deeplab.get_1x_lr_params, mods)
                mods.get_10x_lr_params = types.MethodType(real_deeplab.get_10x_lr_params, mods)
                return real_deeplab.optim_parameters(mods, lr)

        built = iter([(_UpstreamHeads if released else _FrozenTeacher)(teacher), Student(student)])  # PredNet first
        m.setattr(am, "DeepLab", lambda **k: next(built))
        m.setattr(am.CustomModel, "load_PredNet", lambda self, *a, **k: None)   # stage-1 file: the prepared teacher
        rec = H.record_steps(m, watch=[student])
        real_rand = torch.rand
        if released:                                         # __init__'s torch.rand(3, 19): row 0 = ours' init
            m.setattr(torch, "rand", lambda *size, **k: torch.stack([r, real_rand(C), real_rand(C)])
                      if size == (3, C) else real_rand(*size, **k))
        model = am.CustomModel(cfg, None, H._Anything())
        m.setattr(torch, "rand", real_rand)
        H.load_strict(model.BaseNet.net, init)               # setup()'s init_weights re-initialised it
        model.centroids = anchors.copy()
        if not released:
            model.class_criterion = r.expand(3, C).clone()   # ours' state (upstream: torch.rand, deviation 4)
        model.cutmix_bank[:, :bank.shape[1]] = bank
        got.criterion_init = model.class_criterion.clone()
        # train(): the bank draw, its np.random.choice / random.choice answered with our choices
        got.p, got.holders = [], []
        m.setattr(uu.np.random, "choice", lambda a, p=None: got.p.append(np.asarray(p)) or cat)
        m.setattr(uu.random, "choice", lambda seq: got.holders.append(seq.flatten().tolist()) or
                  next(v for v in seq if int(v) == SEMI["id2"]))
        sample_id, sample_cat = uu.sample_from_bank(model.cutmix_bank, model.class_criterion[0])
        pair = torch.stack([images[SEMI["id1"]], images[sample_id.item()]])
        # the CutMix box draws: random.shuffle of the regions (identity: ours takes the first), init_cutmix's
        # np.random.uniform (ours' three uniforms)
        uni = iter([np.full((1, 1), SEMI["uniforms"][0]), np.array([[SEMI["uniforms"][1:]]])])
        m.setattr(random, "shuffle", lambda v: None)
        m.setattr(np.random, "uniform", lambda low=0.0, high=1.0, size=None:
                  np.full(size, low) if low == high else next(uni))
        rand, got.rand_calls = _fixed_rand(1 - u, u.shape, torch.rand)
        m.setattr(torch, "rand", rand)
        got.mask = H.spy(m, am, "generate_cutmix_mask")
        got.mixed = H.spy(m, am, "generate_unsup_data")
        got.cat_conf = H.spy(m, am, "cal_category_confidence")
        got.inputs = _inputs_of(student)
        got.sup, got.cons, got.mse = [], [], []
        real_sup, real_cons, real_mse = model.criterion, model.criterion_cons, model.calculate_min_mse
        model.criterion = lambda *a: got.sup.append(real_sup(*a)) or got.sup[-1]
        model.criterion_cons = lambda *a: got.cons.append((a, real_cons(*a))) or got.cons[-1][1]
        model.calculate_min_mse = lambda v: got.mse.append(real_mse(v)) or got.mse[-1]
        model.iter = s + 1
        model.BaseSchedule.last_epoch = s                    # resumed after s iterations
        # train() before its loop (step2_train_active_semi_sup.py:83-86); the previous step's end (:296) the same
        for net in (model.BaseNet, model.BaseNet_DP, model.PredNet, model.PredNet_DP):
            net.train()
        model.scheduler_step()
        model.train()
        model.optimizer_zerograd()
        percent = 20 * (1 - epoch / SEMI["epochs"])          # train(): low_entropy_threshold x (1 - epoch / epoches)
        rt.set_rng_state(rng_state)                          # the same dropout masks as ours
        got.out = model.step_active_stage2(epoch, pair.clone(), xa, ya, sample_cat, torch.tensor(SEMI["id1"]),
                                           sample_id, percent)
    got.model, got.sample = model, (int(sample_id), int(sample_cat))
    return rec, got


def _run_semi_ours(monkeypatch, tmp_path, student, teacher, inputs, cat, epoch, rng_state, box_index, released=False):
    """mada/train_stage2_semi.py:main resumed after 2 x epoch iterations (a checkpoint written here: the same
    weights, anchors, r and bank; released: the optimiser of upstream's groups and the teacher, as a --released run's
    checkpoint holds them) and stopped right after its first optimiser step; data and evaluation replaced, the draws
    of sample_from_bank / class_box answered as upstream's, torch.rand's map fixed. Flags: --entropy-filter low
    --cons-norm all --released-sched-order; released: --released (those and the four of deviations 2, 3, 4, 6)."""
    from common import runtime as rt
    from mada import train_stage2_semi as T
    xa, ya, images, anchors, r, bank, u = inputs
    out = tmp_path / "ours"
    out.mkdir()
    mcfg = {"model": "deeplabv3plus", "backbone": "resnet18", "num_classes": C, "norm": "imagenet"}
    if released:
        opt = T.released_param_groups_sgd(copy.deepcopy(student), SEMI["lr"], 0.9, 2e-4, 10.0)
    else:
        opt = core.param_groups_sgd(student, SEMI["lr"], 0.9, 2e-4, 10.0)
    rt.save_checkpoint(out / "checkpoint.pth", model=H.clone_state(student), optimizer=opt.state_dict(),
                       scaler={}, iter=2 * epoch, rng=[rng_state], best={"mIoU": -1.0}, config=mcfg,
                       labeled=["img"], anchors=torch.from_numpy(anchors.copy()), bank=bank.clone(),
                       class_conf=r.clone(), **({"teacher": H.clone_state(teacher)} if released else {}))
    args = T.parse_args(["--out", str(out), "--resume", "--iters", str(SEMI["max_iter"]),
                         "--stop-iter", str(SEMI["epochs"] * SEMI["epoch_iters"]),
                         "--epoch-iters", str(SEMI["epoch_iters"]), "--anchor-start", str(51 * SEMI["epoch_iters"]),
                         "--lr", str(SEMI["lr"]), "--batch-size", "2", "--ohem-min-kept", str(SEMI["min_kept"]),
                         *(["--released"] if released else
                           ["--entropy-filter", "low", "--cons-norm", "all", "--released-sched-order"]),
                         "--amp", "off", "--device", "cpu", "--workers", "0", "--seed", str(SEMI["seed"]),
                         "--eval-every", "100000", "--save-every", "100000"])
    arr = anchors.copy()
    nets = iter([(student, mcfg, "ours"), (teacher, mcfg, "ours")])
    streams = iter([[{"image": xa, "label": ya}],
                    [{"image": images[SEMI["id1"]][None], "index": torch.tensor([SEMI["id1"]])}]])
    got = types.SimpleNamespace(ohem=[], cons=[], anchor=[])
    holders = torch.nonzero(bank[cat]).flatten().tolist()
    bank_rng = _DrawsRng(index=holders.index(SEMI["id2"]) if SEMI["id2"] in holders else 0, choice=cat)
    box_rng = _DrawsRng(index=box_index, uniforms=SEMI["uniforms"])
    with monkeypatch.context() as m:
        m.setattr(T.rt, "check_inputs", lambda *a, **k: None)     # no checkpoint/dataset files: all replaced
        m.setattr(T, "load_segmenter", lambda *a, **k: next(nets))
        m.setattr(T, "resolve_domain", lambda name, root, role: ("cityscapes", "real", "/nonexistent"))
        m.setattr(T, "train_set", lambda *a, **k: _TargetSet(images))
        m.setattr(T, "infinite_loader", lambda *a, **k: iter(next(streams)))
        m.setattr(T, "evaluate", lambda *a, **k: {"mIoU": 0.0})
        m.setattr(T.core, "read_selection", lambda *a: ["img"])
        m.setattr(T.core, "eval_set_at", lambda *a, **k: None)
        m.setattr(T.core, "subset_by_names", lambda *a, **k: None)
        m.setattr(T.core, "load_anchors", lambda *a, **k: (arr, np.ones((K, C), bool)))
        got.stored_r = H.spy(m, T, "initial_class_conf")     # the stored r (resumed into it, updated in place)
        real = types.SimpleNamespace(ohem=T.ohem_cross_entropy, cons=T.semi.weighted_consistency,
                                     bal=T.core.batch_anchor_loss, sfb=T.semi.sample_from_bank,
                                     box=T.semi.class_box)
        m.setattr(T, "ohem_cross_entropy", lambda *a: got.ohem.append(real.ohem(*a)) or got.ohem[-1])
        m.setattr(T.semi, "weighted_consistency",
                  lambda *a, **k: got.cons.append((a, k, real.cons(*a, **k))) or got.cons[-1][2])
        m.setattr(T.core, "batch_anchor_loss", lambda *a, **k: got.anchor.append(real.bal(*a, **k)) or got.anchor[-1])
        m.setattr(T.semi, "sample_from_bank", lambda b, c, rng: real.sfb(b, c, bank_rng))
        got.boxes = []
        m.setattr(T.semi, "class_box", lambda *a: got.boxes.append(real.box(*a[:3], box_rng)) or got.boxes[-1])
        got.filtered = _calls(m, T.semi, "entropy_filter")
        got.cat_conf = H.spy(m, T.semi, "category_confidence")
        got.banks = H.spy(m, T.semi, "update_bank")
        got.inputs = _inputs_of(student)
        rand, got.rand_calls = _fixed_rand(u, u.shape, torch.rand)
        m.setattr(torch, "rand", rand)

        def stop(rec, k):
            raise _Stop

        rec = H.record_steps(m, watch=[student], after=stop)
        with pytest.raises(_Stop):
            T.main(args)
    got.anchors, got.bank_rng = arr, bank_rng
    return rec, got


@pytest.mark.parametrize("case", ["region", "fallback", "released", "released-fallback"])
def test_madav2_step2_training_iteration(tmp_path, monkeypatch, case):
    """One MADAv2 step-2 iteration: upstream step2_train_active_semi_sup.py:train's per-iteration part (utils/utils.py
    sample_from_bank, the unlabelled pair, scheduler_step / train / optimizer_zerograd) and
    models/adaptation_model_AEL.py:CustomModel.step_active_stage2 (teacher forwards, class-aware CutMix with
    generate_cutmix_mask / update_cutmix_bank / generate_unsup_data, OHEM, U2PL entropy filter, cal_category_confidence,
    Criterion_cons with class-rate sampling, the anchor loss after epoch 50, one SGD step), the CustomModel built by its
    own __init__ (criterion, criterion_cons, SGD, PolynomialLR, bank, class_criterion as released), against our
    mada/train_stage2_semi.py:main resumed from a checkpoint of the same state (weights, anchors, class confidence r,
    bank; after 2 x epoch iterations of 2-iteration epochs out of 200) and stopped right after its first optimiser
    step. Network: OUR DeepLabV3+ (ResNet-18, random weights and BN statistics) as student and teacher behind
    upstream's 4-tuple interface; the student's SGD groups are upstream's own DeepLab.optim_parameters run on our
    modules. Ours runs with the released flags --entropy-filter low (deviation 5), --cons-norm all (deviation 8),
    --released-sched-order (deviation 21: the lr is then EXACTLY upstream's).

    Random draws, fixed identically on both sides by monkeypatching the draw functions: the bank's class and image
    (upstream np.random.choice / random.choice and our rng.choice / rng.integers answer the test's class and image,
    the probabilities both were given are compared); the CutMix region (upstream random.shuffle = identity, ours'
    rng.integers = 0: both take the first qualifying region in label order) and the fallback box (upstream
    init_cutmix's np.random.uniform and our rng.uniform answer the same three numbers); the consistency sampling map
    (upstream's torch.rand(h, w) answers 1 - u, ours' u; both keep p where u < q); dropout: the same global RNG state
    before each side's step. The query categories (AEL's ACP) are not drawn: the active dataset is built without acp
    so dynamic_copy_paste is never reached (listed deviation 7).
    Cases: "region" = the sampled class is the teacher's most frequent on the bank image (a real CutMix of two
    different images), epoch 50 (anchor loss off: upstream `epoch > 50`, ours --anchor-start 102); "fallback" = a
    class the teacher does not predict (init_cutmix's random box; square images: deviation 9's H x H is H x W),
    epoch 51 (anchor loss on), the pair two copies of one image and the student's dropout at p = 0 (upstream merges
    the pair's objective vectors into one matrix, deviation 11; with twins that matrix is each image's, as in
    test_mada_stage2_training_iteration; ours updates the nearest anchor once per image: checked against upstream's
    EMA applied twice).

    Shown, not hidden (recorded): the teacher stays in eval mode here (upstream's train() calls are inert on it; the
    released train-mode forward of the labelled images is recorded against eval: deviation 6); upstream's r starts
    as ours (zeros in ours, torch.rand upstream: deviation 4) and upstream leaves its stored r unchanged after the
    step (deviation 3: recorded against ours' updated r); upstream's optimiser leaves the decoder, low-level
    projection and classifier out (deviation 2: recorded, every parameter in its groups compared); the defaults of
    deviations 5 and 8 recorded against upstream's released values.

    "released" / "released-fallback" (the region / fallback setup): upstream runs unpatched in those four respects
    and ours runs with --released (--released-param-groups, --released-class-conf, --class-conf-init rand,
    --teacher-mode train with the three flags above): upstream's teacher takes its own train() calls (train()'s
    before the loop; step_active_stage2's eval() for the pair and train() for the mixed images), upstream's r is its
    __init__'s torch.rand(3, 19) with row 0 answered by ours' --class-conf-init rand draw (ours' checkpoint holds the
    same r: with --released-class-conf the stored r never changes from its init), its stored r is not overwritten,
    and its optimiser leaves the decoder out as ours does. Dropout, the teacher's included, is on (except the
    fallback student's, see above), and its masks agree because both sides start the step from the same global RNG
    state and draw in the same order (student labelled, teacher labelled, teacher mixed, student mixed, student
    pair); nothing else between draws from that generator (upstream's torch.rand map is answered without drawing).
    Then every weight (the decoder's included, unchanged on both sides), every BN statistic of the student AND of
    the teacher (moved by its two train-mode forwards), every momentum buffer and the stored r agree, and none of
    deviations 2, 3, 4, 5, 6, 8 is recorded as a difference."""
    H.repo("MADAv2")
    from common import runtime as rt
    from common.models import DeepLabV3Plus
    from mada import semi
    from mada import train_stage2_semi as T
    released, kind = case.startswith("released"), "fallback" if case.endswith("fallback") else "region"
    inputs = _semi_case(kind)
    if released:                               # the r both start from: ours' --class-conf-init rand draw
        inputs = (*inputs[:4], T.initial_class_conf(C, "rand", SEMI["seed"]), *inputs[5:])
    xa, ya, images, anchors, r, bank, u = inputs
    student_t = H.randomize(DeepLabV3Plus(C, "resnet18"), 44)
    init = H.clone_state(student_t)
    student = H.load_strict(DeepLabV3Plus(C, "resnet18"), init)
    teacher, teacher_t = (H.load_strict(DeepLabV3Plus(C, "resnet18"), init).eval() for _ in range(2))
    if kind == "fallback":                     # twins stay twins: no dropout in the student
        for mod in (*student_t.modules(), *student.modules()):
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    pair = torch.stack([images[SEMI["id1"]], images[SEMI["id2"]]])
    with torch.no_grad():
        pred2 = F.interpolate(teacher(pair)["out"], size=pair.shape[-2:], mode="bilinear",
                              align_corners=True).argmax(1)[1]
    counts = torch.bincount(pred2.flatten(), minlength=C)
    if kind == "region":                       # a class whose first region's box covers 10-70% of the image
        def box_share(c):
            y0, x0, y1, x1 = semi.class_box(pred2.numpy(), c, 0.005, _DrawsRng(uniforms=(0.0,) * 3))
            return (y1 - y0) * (x1 - x0) / pred2.numel() if counts[c] > 0.005 * pred2.numel() else 0.0
        cat = next(c for c in counts.argsort(descending=True).tolist() if 0.1 < box_share(c) < 0.7)
    else:
        cat = int((counts == 0).nonzero()[0])
    bank[cat, SEMI["id2"]] = 1                 # the bank image holds the class (for the fallback: a stale entry)
    rt.seed_everything(SEMI["seed"])
    rng_state = rt.rng_state()
    epoch = 50 if kind == "region" else 51
    teacher_init = H.clone_state(teacher)
    rec_t, t = _run_semi_upstream(monkeypatch, student_t, teacher_t, inputs, cat, epoch, rng_state, released)
    rec, o = _run_semi_ours(monkeypatch, tmp_path, student, teacher, inputs, cat, epoch, rng_state, 0, released)

    what = f"MADAv2 step-2 iteration ({case})"
    off = "MADAv2 models/adaptation_model_AEL.py:CustomModel.step_active_stage2"
    assert len(rec) == 1 and len(rec_t) == 1 and len(rec[0].steps) == 1 and len(rec_t[0].steps) == 1
    # -- the draws and the inputs of the step
    assert t.sample == (SEMI["id2"], cat) and o.bank_rng.seen["integers"] == len(t.holders[0])
    assert t.holders[0] == torch.nonzero(bank[cat]).flatten().tolist()
    H.compare(f"{what}: bank class probabilities softmax(1 - r)", torch.from_numpy(o.bank_rng.seen["p"]),
              torch.from_numpy(t.p[0]).double(), official="MADAv2 utils/utils.py:sample_from_bank")
    assert len(o.rand_calls) == 2 and len(t.rand_calls) == 2 * C      # one map per term; upstream one per class
    lrs, lrs_t = rec[0].lrs[0], rec_t[0].lrs[0]
    H.compare(f"{what}: SGD group learning rates (--released-sched-order: exactly)", torch.tensor(lrs),
              torch.tensor(lrs_t), official="MADAv2 schedulers/schedulers.py:PolynomialLR after scheduler_step")
    assert lrs == lrs_t, f"lr ours {lrs} vs upstream {lrs_t}"
    mask = semi.box_mask(o.boxes[0], *pair.shape[-2:], "cpu").long()
    H.compare(f"{what}: CutMix mask ({'class region' if kind == 'region' else 'fallback box'})", mask, t.mask[0],
              official="MADAv2 models/utils.py:generate_cutmix_mask")
    assert 0 < int(mask.sum()) < mask.numel()
    assert len(o.inputs) == len(t.inputs) == (2 if kind == "region" else 3)
    for name, a, b in zip(("labelled images", "mixed images", "unlabelled pair (anchor loss)"), o.inputs, t.inputs):
        H.compare(f"{what}: student input, {name}", a, b, official=off)
    H.compare(f"{what}: mixed teacher logits", o.filtered[0][0][0], t.mixed[0][1],
              official="MADAv2 models/utils.py:generate_unsup_data")
    # -- the losses and the pseudo-labels
    assert len(o.ohem) == len(t.sup) == 1 and len(o.cons) == len(t.cons) == 2
    H.compare(f"{what}: OHEM CE on the labelled images", o.ohem[0].detach(), t.sup[0].detach(),
              official="MADAv2 loss/loss.py:OhemCrossEntropy2dTensor")
    for k, name in enumerate(("labelled", "mixed")):
        (a, kw, loss), (b, loss_t) = o.cons[k], t.cons[k]
        H.compare(f"{what}: consistency loss, {name} images", loss.detach(), loss_t.detach(),
                  official="MADAv2 loss/loss.py:Criterion_cons (sample: True)")
        H.compare(f"{what}: teacher pseudo-label, {name} images", a[1], b[2], official=off)
        H.compare(f"{what}: teacher confidence, {name} images", a[2], b[1], official=off)
        H.compare(f"{what}: class confidence r used, {name} images", a[3], b[3], official=off)
    lab_mix, lab_mix_t = o.cons[1][0][1], t.cons[1][0][2]
    H.compare(f"{what}: entropy-filtered pixels (mixed images)", lab_mix == 255, lab_mix_t == 255,
              official=off + " (np.percentile, `entropy < thresh`)")
    assert 0 < int((lab_mix_t == 255).sum()) < lab_mix_t.numel()
    H.compare(f"{what}: category confidence of the student (labelled)", o.cat_conf[0], t.cat_conf[0],
              official="MADAv2 models/utils.py:cal_category_confidence")
    # -- the anchor branch
    if kind == "region":
        assert not o.anchor and not t.mse and t.out[3] == 0
    else:
        assert len(o.anchor) == 1 and len(t.mse) == 1
        H.compare(f"{what}: soft anchor loss", o.anchor[0][0].detach(), t.mse[0][0].detach().reshape(()),
                  official="MADAv2 models/adaptation_model_AEL.py:CustomModel.calculate_min_mse")
        H.compare(f"{what}: anchor loss as returned", o.anchor[0][0].detach(), torch.tensor(t.out[3]), official=off)
        k_t = t.mse[0][1]
        H.compare(f"{what}: nearest anchor", o.anchor[0][3].argmin(1), torch.tensor([k_t, k_t]))
        a0, a_t = torch.from_numpy(anchors), torch.from_numpy(t.model.centroids)
        H.compare(f"{what}: anchors after the step (upstream's EMA applied per image: twice)",
                  torch.from_numpy(o.anchors), 1.999 * a_t - 0.999 * a0, official=off + " (centroid EMA)")
        diff = float((torch.from_numpy(o.anchors) - a_t).abs().max())
        H.record(f"{what}: anchors vs upstream's single update (twin images)", diff, diff / float(a_t.abs().max()),
                 False, official=off, note="listed deviation 11: one EMA per image (ours) vs one per batch")
    # -- the state after the step: bank, r
    H.compare(f"{what}: CutMix bank after the step", o.banks[0].long(), t.model.cutmix_bank[:, :bank.shape[1]].long(),
              official="MADAv2 models/utils.py:update_cutmix_bank")
    assert not t.model.cutmix_bank[:, bank.shape[1]:].any()
    assert not torch.equal(o.banks[0], bank) or kind == "fallback"
    r_used, (r_stored,) = o.cons[0][0][3], o.stored_r
    H.compare(f"{what}: class confidence r used by the step (upstream's local update)", r_used,
              0.999 * r + 0.001 * t.cat_conf[0], official=off + " (class_criterion momentum update)")
    assert torch.equal(t.model.class_criterion, t.criterion_init), "upstream keeps its stored r (deviation 3)"
    assert torch.equal(t.criterion_init[0], r), "upstream's r starts as ours"
    if released:                               # --released-class-conf: ours' stored r unchanged too
        H.compare(f"{what}: stored r after the step (--released-class-conf, --class-conf-init rand)", r_stored,
                  t.model.class_criterion[0], official=off + " (class_criterion never reassigned)")
        assert torch.equal(r_stored, r) and not torch.equal(r_used, r)
    else:
        assert torch.equal(r_stored, r_used)
        d3 = float((r_stored - r).abs().max())
        H.record(f"{what}: stored r, ours updated vs upstream unchanged", d3, d3 / float(r.abs().max()), False,
                 official=off, note="listed deviation 3: upstream assigns the update to a local variable")
    # -- the SGD step: every weight and BN statistic, every momentum buffer
    in_groups = {id(p) for g in rec_t[0].optimizer.param_groups for p in g["params"]}
    left_out = [n for n, p in student_t.named_parameters() if id(p) not in in_groups]
    assert left_out and all(not n.startswith(("backbone.", "aspp.")) for n in left_out)
    after, after_t = rec[0].steps[0].modules[0], rec_t[0].steps[0].modules[0]
    moved = max(float((after_t[k] - v).abs().max() / v.abs().max().clamp(min=1e-30)) for k, v in init.items()
                if v.is_floating_point())
    assert moved > 1e-3, f"the step hardly moved the weights ({moved:.1e} rel): the comparison would prove nothing"
    keep = [k for k in after_t if released or k not in left_out]
    H.compare_states(f"{what}: " + ("every weight (--released-param-groups: the decoder's unchanged on both sides) "
                                    if released else "weights in upstream's groups ") + "and every BN statistic "
                     "after the step", {k: after[k] for k in keep}, {k: after_t[k] for k in keep}, official=off)
    buf_t = H.state_by_name(rec_t[0].steps[0].state, student_t)
    H.compare_states(f"{what}: SGD momentum buffers (upstream's groups" + (", ours the same" if released else "") + ")",
                     H.state_by_name(rec[0].steps[0].state, student), buf_t, official=off)
    assert all(torch.equal(after_t[k], init[k]) for k in left_out)
    if released:
        assert all(torch.equal(after[k], init[k]) for k in left_out)
    else:
        d2 = max(float((after[k] - init[k]).abs().max() / init[k].abs().max()) for k in left_out)
        H.record(f"{what}: decoder / low-level projection / classifier ({len(left_out)} tensors) trained by ours only",
                 d2, d2, False, official="MADAv2 models/deeplab.py:DeepLab.optim_parameters",
                 note="listed deviation 2: upstream's groups are backbone 1x and ASPP 10x; max relative move of ours")
    # -- the teacher after the step: released, its BN statistics moved by two train-mode forwards (labelled, mixed)
    tch, tch_t = H.clone_state(teacher), H.clone_state(teacher_t)
    H.compare_states(f"{what}: teacher weights and BN statistics after the step" +
                     (" (--teacher-mode train)" if released else " (eval on both sides)"), tch, tch_t,
                     official=off + " (PredNet.train() / eval() / train())")
    stats = [k for k in tch if k.endswith("running_mean")]
    moved_t = max(float((tch_t[k] - teacher_init[k]).abs().max() / teacher_init[k].abs().max()) for k in stats)
    tracked = {int(tch_t[k] - teacher_init[k]) for k in tch if k.endswith("num_batches_tracked")}
    assert (moved_t > 1e-3 and tracked == {2}) if released else (moved_t == 0 and tracked == {0}), (moved_t, tracked)
    if released:
        return                                 # deviations 5, 6, 8 are the released values here: nothing to record
    # -- the defaults of deviations 5 and 8, and the released teacher mode (deviation 6), against upstream's values
    t_mix, percent = o.filtered[0][0][:2]
    lab_high, _ = semi.entropy_filter(t_mix, percent, "high")
    n5 = int((lab_high != lab_mix_t).sum())
    H.record(f"{what}: default --entropy-filter high vs upstream's inverted filter", n5, 0.0, True,
             official=off + " (`entropy < thresh` -> 255)", note="listed deviation 5", n=lab_mix_t.numel())
    (a, _, loss_all) = o.cons[1]
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", _fixed_rand(u, u.shape, torch.rand)[0])
        loss_valid = semi.weighted_consistency(*a, norm="valid")
    d8 = abs(float(loss_valid) - float(t.cons[1][1]))
    H.record(f"{what}: default --cons-norm valid vs upstream's normalisation over ignored pixels too", d8,
             d8 / abs(float(t.cons[1][1])), False, official="MADAv2 loss/loss.py:Criterion_cons",
             note="listed deviation 8: the mixed-image consistency loss")
    train_mode = copy.deepcopy(teacher).train()
    with torch.no_grad():
        rt.set_rng_state(rng_state)
        lg_train, lg_eval = train_mode(xa)["out"], teacher(xa)["out"]
    d6 = float((lg_train - lg_eval).abs().max())
    H.record(f"{what}: teacher logits on the labelled images, released train mode vs frozen eval", d6,
             d6 / float(lg_eval.abs().max()), False, official=off + " (PredNet.train() in train / the step)",
             note="listed deviation 6: batch statistics and dropout in upstream's teacher")
