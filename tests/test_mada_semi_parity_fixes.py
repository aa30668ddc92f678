"""What the differential test of one MADAv2 step-2 iteration against the official code
(tests/upstream/test_mada_family.py::test_madav2_step2_training_iteration) found, checked without the official
code: the consistency sampling map is one H x W draw shared by the batch (upstream loss/loss.py:Criterion_cons
draws torch.rand(h, w)); `--cons-norm all` normalises over ignored pixels too (deviation 8's released behaviour);
the class confidence r is updated before the iteration's consistency terms use it (upstream's order);
`--released-sched-order` (deviation 21) runs iteration i at poly(i + 1) in each of the three training scripts whose
upstream steps its PolynomialLR before the optimiser; and train_stage2_semi.py's flags of upstream's released
behaviour (deviations 2, 3, 4, 6): `--released-param-groups`, `--released-class-conf`, `--class-conf-init rand`,
`--teacher-mode train`, `--released` (all of them), with a full-state resume under `--released`. The scripts' main()
run for 3 iterations on a tiny DeepLabV3+ with their data, checkpoints and evaluation replaced (no files read)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import runtime as rt
from common.models import DeepLabV3Plus
from mada import semi, train_stage1, train_stage2, train_stage2_semi

C = 19


def test_consistency_sampling_map_is_shared_by_the_batch():
    """Two identical images in a batch carry the same loss as one alone, drawn from the same seed: one (H, W) map."""
    g = torch.Generator().manual_seed(0)
    logits, t = torch.randn(1, C, 6, 7, generator=g), torch.randn(1, C, 6, 7, generator=g)
    conf, lab = F.softmax(t, 1).max(1)
    r = torch.rand(C, generator=g)                                 # q well below 1 for most classes: pixels dropped
    one = semi.weighted_consistency(logits, lab, conf, r, generator=torch.Generator().manual_seed(3))
    two = semi.weighted_consistency(logits.repeat(2, 1, 1, 1), lab.repeat(2, 1, 1), conf.repeat(2, 1, 1), r,
                                    generator=torch.Generator().manual_seed(3))
    assert two.item() == pytest.approx(one.item(), rel=1e-6)
    other = semi.weighted_consistency(logits, lab, conf, r, generator=torch.Generator().manual_seed(4))
    assert other.item() != pytest.approx(one.item(), rel=1e-3)    # the draw matters at all


def test_consistency_norm_all_counts_ignored_pixels():
    g = torch.Generator().manual_seed(1)
    logits, t = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    conf, lab = F.softmax(t, 1).max(1)
    lab[:, :2] = 255
    ce = F.cross_entropy(logits, lab, ignore_index=255, reduction="none")
    w = conf ** 2                                                  # r = 0: every pixel kept
    valid = semi.weighted_consistency(logits, lab, conf, torch.zeros(4), norm="valid")
    released = semi.weighted_consistency(logits, lab, conf, torch.zeros(4), norm="all")
    assert valid.item() == pytest.approx(((w * ce).sum() / (w * (lab != 255)).sum()).item(), rel=1e-5)
    assert released.item() == pytest.approx(((w * ce).sum() / w.sum()).item(), rel=1e-5)
    assert released < valid


# ---------------------------------------------------------------------------------------------- scripts
def _batches(ds, batch_size, *a, **k):
    g = torch.Generator().manual_seed(batch_size * 7 + len(k))
    while True:
        y = torch.randint(0, C, (batch_size, 32, 32), generator=g)
        yield {"image": torch.randn(batch_size, 3, 32, 32, generator=g), "label": y, "index": torch.arange(batch_size)}


class _Target:
    def __len__(self):
        return 4

    def __getitem__(self, key):
        return {"image": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(key[0]))}


def _run(monkeypatch, tmp_path, T, extra=(), seen=None, loader=_batches):
    """T.main for 3 iterations of a 10-iteration poly schedule; returns each SGD step's group lrs and the
    parsed arguments (patched attributes restored on exit). seen: a dict that gets the networks the script
    built ("nets": student, then teacher), its optimisers ("opts") and the initial network ("init")."""
    torch.manual_seed(0)
    net = DeepLabV3Plus(C, "resnet18")
    mcfg = {"model": "deeplabv3plus", "backbone": "resnet18", "num_classes": C, "norm": "imagenet"}
    anchors = np.random.default_rng(0).random((3, C, 256)).astype(np.float32)
    lrs = []
    seen = {} if seen is None else seen
    seen.update(nets=[], opts=[], init=copy.deepcopy(net.state_dict()))
    real_sgd = torch.optim.SGD

    def sgd(*a, **k):
        opt = real_sgd(*a, **k)
        opt.register_step_post_hook(lambda o, *_: lrs.append([g["lr"] for g in o.param_groups]))
        seen["opts"].append(opt)
        return opt

    def build(*a, **k):
        seen["nets"].append(copy.deepcopy(net))
        return seen["nets"][-1], mcfg, "ours"

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    monkeypatch.setattr(T.rt, "check_inputs", lambda *a, **k: None)
    monkeypatch.setattr(T, "load_segmenter", build)
    monkeypatch.setattr(T, "resolve_domain", lambda name, root, role: ("gta5" if role == "source" else "cityscapes",
                                                                       "real", "/nonexistent"))
    monkeypatch.setattr(T, "train_set", lambda *a, **k: _Target())
    monkeypatch.setattr(T, "infinite_loader", loader)
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: {"mIoU": 0.0})
    monkeypatch.setattr(T, "format_table", lambda res: "")
    monkeypatch.setattr(T.core, "read_selection", lambda *a: ["img"])
    monkeypatch.setattr(T.core, "eval_set_at", lambda *a, **k: None)
    monkeypatch.setattr(T.core, "subset_by_names", lambda *a, **k: None)
    monkeypatch.setattr(T.core, "load_anchors", lambda *a, **k: (anchors.copy(), np.ones((3, C), bool)))
    args = T.parse_args(["--out", str(tmp_path / "run"), "--iters", "10", "--stop-iter", "3", "--lr", "0.01",
                         "--batch-size", "2", "--amp", "off", "--device", "cpu", "--workers", "0",
                         "--eval-every", "100", "--save-every", "100", *extra])
    T.main(args)
    return lrs, args


@pytest.mark.parametrize("T", [train_stage1, train_stage2, train_stage2_semi], ids=lambda m: m.__name__)
@pytest.mark.parametrize("released", [False, True])
def test_released_sched_order_flag(tmp_path, monkeypatch, T, released):
    """Default: iteration i at poly(i) (the base lr first); --released-sched-order: poly(i + 1), as upstream's
    scheduler_step before each step (deviation 21). Each group at its multiplier."""
    extra = ["--anchor-start", "1"] if T is train_stage2_semi else []
    lrs, args = _run(monkeypatch, tmp_path, T, extra + (["--released-sched-order"] if released else []))
    assert args.released_sched_order is released
    mult = args.head_lr_mult if hasattr(args, "head_lr_mult") else 1.0
    expect = [[rt.poly_lr(0.01, i + released, 10), rt.poly_lr(0.01, i + released, 10) * mult] for i in range(3)]
    assert lrs == expect                                        # the same float operations: exactly
    assert (lrs[0][0] == 0.01) is (not released)


def test_semi_class_confidence_updated_before_the_consistency(tmp_path, monkeypatch):
    """The consistency terms of iteration i sample with r updated by iteration i's student confidence (upstream
    adaptation_model_AEL.py:step_active_stage2 computes the momentum update, then the losses; from r = 0 the
    first iteration uses 0.001 x the confidence, not 0)."""
    used, cc = [], []
    real_wc, real_cc = semi.weighted_consistency, semi.category_confidence
    monkeypatch.setattr(semi, "weighted_consistency",
                        lambda *a, **k: used.append(a[3].clone()) or real_wc(*a, **k))
    monkeypatch.setattr(semi, "category_confidence", lambda *a: cc.append(real_cc(*a)) or cc[-1])
    _run(monkeypatch, tmp_path, train_stage2_semi)
    assert len(cc) == 3 and len(used) == 6
    r = torch.zeros(C)
    for i in range(3):
        r = 0.999 * r + 0.001 * cc[i]
        assert torch.allclose(used[2 * i], r, rtol=1e-6, atol=0) and torch.equal(used[2 * i], used[2 * i + 1])
    assert used[0].abs().max() > 0


# ---------------------------------------------------------------------------------- train_stage2_semi.py: released
def test_released_flag_turns_on_every_released_behaviour():
    """--released = every value of RELEASED; a value given explicitly wins; without it, the defaults (OURS)."""
    T = train_stage2_semi
    ours, rel = vars(T.parse_args([])), vars(T.parse_args(["--released"]))
    assert {k: ours[k] for k in T.OURS} == T.OURS and {k: rel[k] for k in T.RELEASED} == T.RELEASED
    assert set(T.OURS) == set(T.RELEASED) and all(T.OURS[k] != T.RELEASED[k] for k in T.OURS)
    mixed = T.parse_args(["--released", "--teacher-mode", "eval", "--entropy-filter", "high"])
    assert (mixed.teacher_mode, mixed.entropy_filter, mixed.cons_norm) == ("eval", "high", "all")


@pytest.mark.parametrize("released", [False, True])
def test_released_param_groups(tmp_path, monkeypatch, released):
    """--released-param-groups (deviation 2): the optimiser holds the backbone (1x) and ASPP (10x) parameters only,
    as upstream's DeepLab.optim_parameters; low-level projection, decoder and classifier end unchanged. Default:
    every parameter, and the decoder moves."""
    seen = {}
    _run(monkeypatch, tmp_path, train_stage2_semi, ["--anchor-start", "1"] + (["--released-param-groups"] * released),
         seen)
    student, (opt,) = seen["nets"][0], seen["opts"]
    name = {id(p): n for n, p in student.named_parameters()}
    groups = [{name[id(p)].split(".")[0] for p in g["params"]} for g in opt.param_groups]
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    head = {"low_proj", "decoder", "classifier"}
    changed = {n.split(".")[0] for n, p in student.named_parameters() if not torch.equal(p, seen["init"][n])}
    if released:
        assert groups == [{"backbone"}, {"aspp"}] and [g["lr_mult"] for g in opt.param_groups] == [1.0, 10.0]
        assert n_opt == sum(1 for n in name.values() if n.startswith(("backbone.", "aspp.")))
        assert changed == {"backbone", "aspp"}                  # the decoder's weights unchanged after 3 steps
    else:
        assert groups == [{"backbone"}, {"aspp"} | head] and n_opt == len(name)
        assert changed == {"backbone", "aspp"} | head


@pytest.mark.parametrize("released", [False, True])
def test_released_class_conf(tmp_path, monkeypatch, released):
    """--released-class-conf (deviation 3): the stored r never changes, and iteration i's consistency terms use
    0.999 r0 + 0.001 cc_i (one step from the stored r); --class-conf-init rand (deviation 4): r0 = U(0, 1) drawn
    from --seed, the same in every run of that seed. Default: r accumulates the updates."""
    used, cc = [], []
    real_wc, real_cc = semi.weighted_consistency, semi.category_confidence
    monkeypatch.setattr(semi, "weighted_consistency", lambda *a, **k: used.append(a[3].clone()) or real_wc(*a, **k))
    monkeypatch.setattr(semi, "category_confidence", lambda *a: cc.append(real_cc(*a)) or cc[-1])
    stored = []
    real_init = train_stage2_semi.initial_class_conf
    monkeypatch.setattr(train_stage2_semi, "initial_class_conf", lambda *a: stored.append(real_init(*a)) or stored[-1])
    flags = ["--class-conf-init", "rand", "--seed", "3"] + ["--released-class-conf"] * released
    _run(monkeypatch, tmp_path, train_stage2_semi, flags)
    r0 = torch.rand(C, generator=torch.Generator().manual_seed(3))
    assert len(cc) == 3 and len(used) == 6 and len(stored) == 1
    r = r0.clone()
    for i in range(3):
        expect = 0.999 * (r0 if released else r) + 0.001 * cc[i]
        assert torch.allclose(used[2 * i], expect, rtol=1e-6, atol=0) and torch.equal(used[2 * i], used[2 * i + 1])
        r = expect
    assert torch.equal(stored[0], r0) is released                # the stored r after 3 iterations
    assert not torch.equal(used[0], used[2])                     # each iteration's own category confidence


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_mode(tmp_path, monkeypatch, mode):
    """--teacher-mode train (deviation 6): per iteration the teacher runs the labelled images in train mode, the
    unlabelled pair in eval mode, the mixed images in train mode (upstream's forward whose output is unused), so its
    BN running statistics move (2 batches counted per iteration); eval: two eval-mode forwards, the teacher unchanged."""
    seen, modes = {}, []
    _run(monkeypatch, tmp_path, train_stage2_semi, ["--teacher-mode", mode, "--stop-iter", "2"], seen)
    teacher = seen["nets"][1]
    state = teacher.state_dict()
    tracked = {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    moved = [k for k, v in state.items() if k.endswith(("running_mean", "running_var"))
             and not torch.equal(v, seen["init"][k])]
    weights = all(torch.equal(p, seen["init"][n]) for n, p in teacher.named_parameters())
    assert weights and not any(p.requires_grad for p in teacher.parameters())
    if mode == "train":
        assert tracked == {4} and len(moved) == sum(k.endswith(("running_mean", "running_var")) for k in state)
    else:
        assert tracked == {0} and not moved
    # the mode of each forward: record it on a fresh run
    monkeypatch.setattr(DeepLabV3Plus, "forward", _mode_recording_forward(modes))
    _run(monkeypatch, tmp_path / "again", train_stage2_semi, ["--teacher-mode", mode, "--stop-iter", "1"], seen)
    teacher_calls = [m for who, m in modes if who is seen["nets"][1]]
    assert teacher_calls == ([True, False, True] if mode == "train" else [False, False])


def _mode_recording_forward(modes):
    real = DeepLabV3Plus.forward

    def forward(self, x, return_feat=False):
        modes.append((self, self.training))
        return real(self, x, return_feat)
    return forward


def _batches_from(ds, batch_size, seed, start, *a, **k):
    """An infinite loader that continues at `start` on resume (the batches of a run from 0, `start` skipped)."""
    g = torch.Generator().manual_seed(batch_size * 7 + seed)
    n = 0
    while True:
        y = torch.randint(0, C, (batch_size, 32, 32), generator=g)
        batch = {"image": torch.randn(batch_size, 3, 32, 32, generator=g), "label": y, "index": torch.arange(batch_size)}
        n += 1
        if n > start:
            yield batch


def test_released_resume_is_exact(tmp_path, monkeypatch):
    """--released: 2 iterations straight == 1 iteration, then --resume for the second (anchor loss on): the
    checkpoints hold the same student, teacher (its train-mode BN statistics), constant r, optimiser (upstream's
    groups), anchors and bank."""
    flags = ["--released", "--anchor-start", "1", "--stop-iter", "2"]   # checkpoint at the last iteration
    _run(monkeypatch, tmp_path / "straight", train_stage2_semi, flags, loader=_batches_from)
    _run(monkeypatch, tmp_path / "cut", train_stage2_semi, flags + ["--stop-iter", "1"], loader=_batches_from)
    half = torch.load(tmp_path / "cut/run/checkpoint.pth", weights_only=True)
    _run(monkeypatch, tmp_path / "cut", train_stage2_semi, flags + ["--resume"], loader=_batches_from)
    a, b = (torch.load(tmp_path / d / "run/checkpoint.pth", weights_only=True) for d in ("straight", "cut"))
    assert half["iter"] == 1 and a["iter"] == b["iter"] == 2 and "teacher" in a
    assert not torch.equal(half["anchors"], a["anchors"])      # the resumed iteration updated the anchors
    assert not torch.equal(half["teacher"]["backbone.bn1.running_mean"], a["teacher"]["backbone.bn1.running_mean"])
    assert torch.equal(half["class_conf"], a["class_conf"])     # --released-class-conf: r constant
    for key in ("model", "teacher"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("class_conf", "anchors", "bank"):
        assert torch.equal(a[key], b[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
