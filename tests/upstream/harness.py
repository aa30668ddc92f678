"""The differential suite's harness: run an official repository's code beside ours on the same inputs and
weights (CPU, fp32) and record how far apart the results are.

    repo(name)                      Path of $SEGDA_UPSTREAM/<name>, or skip the test naming the missing folder
    upstream(name, *subdirs)        context: that checkout first on sys.path, the shims on; on exit the modules
                                    imported from it leave sys.modules (the repos share names: model, utils, ...)
    load(name, module, *subdirs)    import one upstream module inside upstream() and return it
    rename(sd, rules, rest="")      a state dict with its key prefixes renamed (the upstream -> ours layout)
    load_strict(module, sd)         load_state_dict(strict=True), naming missing/unexpected keys when it fails
    compare(what, ours, theirs)     assert equal (values: max|a-b| <= 1e-5 * max|theirs|; integers: exactly)
                                    and record the measured max difference in parity_results.json
    compare_states(what, ours, theirs, names=None)   the same for two {name: tensor} dicts
    record(what, max_abs, ...)      record a measured difference that is not asserted equal (a deviation)
    randomize(module, seed)         random non-trivial weights and BN statistics; clone_state(m): a detached copy
    fake_dataset(items, length)     a Dataset class that ignores its arguments and serves `items` in turn
    spy(monkeypatch, owner, attr)   wrap a callable; the list it returns collects every return value
    record_steps(monkeypatch, ...)  what every SGD/Adam built meanwhile did: lrs, and params/state after each step
    by_name / state_by_name         those records keyed by a module's parameter names

Nothing here changes what upstream computes: the shims (README.md, "Shims") only let 2018-2019 code run on a
CPU with the installed torch/numpy/scipy. Nothing from the official repositories is copied here.
"""
import contextlib
import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ENV = "SEGDA_UPSTREAM"
HERE = Path(__file__).resolve().parent
RESULTS_FILE = Path(os.environ.get("SEGDA_PARITY_RESULTS", HERE / "parity_results.json"))
RTOL = 1e-5

# folder under $SEGDA_UPSTREAM -> (GitHub repository, pinned commit); get_upstream.sh clones the same list
REPOS = {
    "AdaptSegNet": ("wasidennis/AdaptSegNet", "fca9ff0f09dab45d44bf6d26091377ac66607028"),
    "ADVENT": ("valeoai/ADVENT", "3e58d45a32fb9763a9d1b459326e1dec7caafe78"),
    "MaxSquareLoss": ("ZJULearning/MaxSquareLoss", "2fbc18fc4ee0a618bfb6a9c0e1318261c80541db"),
    "Adversarial_DA_Exp": ("yifan-bao/Adversarial_DA_Exp", "09979742d83fe6fd5de9b9f3aa6aa5fe9a44ea54"),
    "MADAN": ("pikachusocute/MADAN", "7a2918da44f5203b72652bc4cba0e70057482114"),
    "MADA": ("munanning/MADA", "2356c245a374a5e862f1333be9e701815a40a646"),
    "MADAv2": ("munanning/MADAv2", "1c4fb8120a916eda675aa39fd9164273206a0eec"),
    "D2ADA": ("tsunghan-wu/D2ADA", "332ad9fbc0d169a751f02ea44e62ae425351571b"),
    "SS-ADA": ("ywher/SS-ADA", "483e335f2d0c5dbd19dc60278a75f7cba01350b2"),
    "SS-ADA-train": ("ywher/SS-ADA", "a02e3d8fe8d19f2c1196b594db34a635a93b194c"),
    "TUFL": ("ywher/TUFL", "e84db359556334dd8c985c9e0ff46fc647c0ed7b"),
}

HOW_TO_RUN = ("differential test against the official code: run it with "
              "`bash tests/upstream/get_upstream.sh DIR` (clones the pinned commits), "
              "`pip install -r tests/upstream/requirements.txt`, then "
              "`SEGDA_UPSTREAM=DIR python -m pytest -q tests -m upstream`")


# ------------------------------------------------------------------------------------------------
# Where the checkouts are
# ------------------------------------------------------------------------------------------------
def root():
    """$SEGDA_UPSTREAM as a Path, or skip with how to run the suite."""
    d = os.environ.get(ENV)
    if not d:
        pytest.skip(f"{ENV} not set: {HOW_TO_RUN}")
    return Path(d).expanduser().resolve()


def repo(name):
    """The checkout $SEGDA_UPSTREAM/<name> (a folder name of REPOS), or skip naming the missing folder."""
    if name not in REPOS:
        raise KeyError(f"unknown upstream repository {name!r}; one of {sorted(REPOS)}")
    path = root() / name
    if not path.is_dir():
        gh, commit = REPOS[name]
        pytest.skip(f"{path} missing: the checkout of {gh} at {commit} "
                    f"(`bash tests/upstream/get_upstream.sh {root()}` clones it)")
    return path


# ------------------------------------------------------------------------------------------------
# Shims: each one lets old code run here without changing what it computes (listed in README.md)
# ------------------------------------------------------------------------------------------------
def _cpu_module(self, device=None, non_blocking=False):  # nn.Module.cuda -> stays on the CPU
    return self


def _cpu_tensor(self, device=None, non_blocking=False, **kwargs):  # Tensor.cuda -> the same CPU tensor
    return self


_real_get_device = torch.Tensor.get_device


def _get_device(self):  # CPU tensors answer -1, which `.to(-1)` refuses: answer "cpu" instead
    return "cpu" if self.device.type == "cpu" else _real_get_device(self)


class _Anything:
    """A stand-in logger/visualiser: every attribute is a no-op callable returning another stand-in."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()


def _stub_module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__segda_stub__ = True
    return mod


def _missing(name):
    try:
        importlib.import_module(name)
        return False
    except ImportError:
        return True


@contextlib.contextmanager
def shims():
    """The CPU and compatibility shims, active only inside the block."""
    saved = {}

    def patch(owner, attr, value):
        saved[(owner, attr)] = getattr(owner, attr, None)
        setattr(owner, attr, value)

    patch(torch.nn.Module, "cuda", _cpu_module)
    patch(torch.Tensor, "cuda", _cpu_tensor)
    patch(torch.Tensor, "get_device", _get_device)
    patch(torch.cuda, "set_device", lambda *a, **k: None)
    patch(torch.cuda, "current_device", lambda: 0)
    patch(torch.cuda, "get_device_name", lambda *a, **k: "cpu (harness shim)")
    for alias, typ in (("int", int), ("float", float), ("bool", bool), ("str", str)):
        if alias not in np.__dict__:  # numpy >= 1.24 removed the aliases of the builtins
            patch(np, alias, typ)
    import torchvision.models.vgg as tv_vgg
    if not hasattr(tv_vgg, "cfg"):  # MADAN's (CyCADA's) VGG16_FCN8s reads vgg.cfg['D'], renamed cfgs in torchvision 0.5
        patch(tv_vgg, "cfg", tv_vgg.cfgs)
    try:  # MaxSquare/Adversarial_DA_Exp download FreeImage at import (for SYNTHIA's 16-bit labels, never read here)
        import imageio.plugins.freeimage as freeimage
        patch(freeimage, "download", lambda *a, **k: None)
    except ImportError:
        pass
    stubs = {}
    if _missing("tensorboardX"):  # only a logger: summaries are never read back
        stubs["tensorboardX"] = _stub_module("tensorboardX", SummaryWriter=_Anything)
    for name, mod in stubs.items():
        sys.modules[name] = mod
    try:
        yield
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
        for (owner, attr), value in saved.items():
            if value is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)


# ------------------------------------------------------------------------------------------------
# Importing upstream code
# ------------------------------------------------------------------------------------------------
def _top_level_names(path):
    names = set()
    for p in path.iterdir():
        if p.suffix == ".py":
            names.add(p.stem)
        elif p.is_dir() and not p.name.startswith("."):
            names.add(p.name)
    return names


def _from(mod, paths):
    files = [getattr(mod, "__file__", None)]
    try:
        files += list(getattr(mod, "__path__", None) or [])
    except TypeError:
        pass
    return any(isinstance(f, str) and any(str(Path(f).resolve()).startswith(str(p)) for p in paths) for f in files)


@contextlib.contextmanager
def upstream(name, *subdirs):
    """Run inside an official checkout: <name>/<subdir>... then $SEGDA_UPSTREAM/<name> first on sys.path (a subdir
    wins: AdaptSegNet's pytorch_0.4/ scripts over the root ones of the same name), the shims on. Modules of the same top-level names loaded before (another repository's `model`, `utils`) are set
    aside and restored afterwards; the modules imported from this checkout are removed on exit. Call upstream
    functions that import lazily inside the block. Yields the checkout's Path."""
    base = repo(name)
    paths = [base / s for s in subdirs] + [base]
    names = set().union(*(_top_level_names(p) for p in paths))
    aside = {k: m for k, m in sys.modules.items() if k.split(".")[0] in names}
    for k in aside:
        del sys.modules[k]
    before = set(sys.modules)
    old_path = list(sys.path)
    sys.path[:0] = [str(p) for p in paths]
    try:
        with shims():
            yield base
    finally:
        sys.path[:] = old_path
        for k in [k for k in set(sys.modules) - before if k.split(".")[0] in names or _from(sys.modules[k], paths)]:
            del sys.modules[k]
        sys.modules.update(aside)


def load(name, module, *subdirs):
    """Import `module` (dotted) from the checkout `name` and return it; its functions stay usable afterwards
    (they hold their own globals), but lazy imports inside them need an `upstream()` block around the call."""
    with upstream(name, *subdirs):
        return importlib.import_module(module)


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def rename(sd, rules, rest=""):
    """A copy of state dict `sd` with each key's first matching prefix in `rules` ({old: new}) replaced;
    keys that match no rule get the prefix `rest` (e.g. 'backbone.')."""
    out = {}
    for k, v in sd.items():
        for old, new in rules.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            out[rest + k] = v
    return out


def load_strict(module, sd):
    """module.load_state_dict(sd, strict=True) with the missing/unexpected keys named on failure."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    assert not missing and not unexpected, f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
    module.load_state_dict(sd, strict=True)
    return module


def clone_state(module_or_sd):
    sd = module_or_sd.state_dict() if hasattr(module_or_sd, "state_dict") else module_or_sd
    return {k: v.detach().clone() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------
# Comparing, and recording what was measured
# ------------------------------------------------------------------------------------------------
RESULTS = {}  # test id -> {what: {...}}; written to RESULTS_FILE at the end of the session (conftest.py)


def _test_id():
    cur = os.environ.get("PYTEST_CURRENT_TEST", "?")
    return cur.rsplit(" (", 1)[0]


def _measure(ours, theirs):
    a, b = torch.as_tensor(ours).detach().cpu(), torch.as_tensor(theirs).detach().cpu()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} (ours) vs {tuple(b.shape)} (upstream)"
    exact = not (a.is_floating_point() or b.is_floating_point())
    if a.numel() == 0:
        return 0.0, 0.0, exact
    if exact:
        return float((a != b).sum()), 0.0, True
    a, b = a.double(), b.double()
    nan = torch.isnan(a) | torch.isnan(b)  # NaN (a class absent from labels and predictions) must be at the same places
    if nan.any():
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return float("inf"), float("inf"), False
        a, b = a[~nan], b[~nan]
        if a.numel() == 0:
            return 0.0, 0.0, False
    diff = float((a - b).abs().max())
    scale = float(b.abs().max())
    return diff, (diff / scale if scale > 0 else diff), False


def record(what, max_abs, max_rel, exact, official=None, note=None, n=1):
    entry = {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "compared": n}
    if exact:
        entry = {"mismatches": int(max_abs), "compared": n}
    if official:
        entry["official"] = official
    if note:
        entry["note"] = note
    RESULTS.setdefault(_test_id(), {})[what] = entry
    return entry


def compare(what, ours, theirs, rtol=RTOL, official=None, note=None):
    """Assert ours == upstream: integers exactly; values within max|ours - theirs| <= rtol * max|theirs|
    (relative to the tensor's scale, so that entries near 0 do not dominate). Records the measurement."""
    diff, rel, exact = _measure(ours, theirs)
    record(what, diff, rel, exact, official, note, n=torch.as_tensor(theirs).numel())
    if exact:
        assert diff == 0, f"{what}: {int(diff)} integer entries differ from upstream"
    else:
        assert rel <= rtol, f"{what}: max |ours - upstream| = {diff:.3e} ({rel:.3e} relative > {rtol})"
    return diff


def compare_states(what, ours, theirs, names=None, rtol=RTOL, official=None, note=None):
    """Compare two {name: tensor} dicts entry by entry (names: {our key: their key}, default identity; the key
    sets must match). Records the largest difference and the key it was at; fails listing every key off."""
    names = names or {k: k for k in theirs}
    assert sorted(names.values()) == sorted(theirs), \
        f"{what}: upstream keys not compared: {sorted(set(theirs) - set(names.values()))[:8]}"
    missing = sorted(k for k in names if k not in ours)
    assert not missing, f"{what}: missing on our side: {missing[:8]}"
    worst, worst_rel, worst_key, bad, exact_all = 0.0, 0.0, None, [], True
    for k_ours, k_theirs in names.items():
        diff, rel, exact = _measure(ours[k_ours], theirs[k_theirs])
        exact_all &= exact
        if worst_key is None or rel > worst_rel or diff > worst:
            worst_key = k_ours
        worst, worst_rel = max(worst, diff), max(worst_rel, rel)
        if (exact and diff) or (not exact and rel > rtol):
            bad.append(f"{k_ours} ({diff:.3e}, {rel:.3e} rel)")
    record(what, worst, worst_rel, exact_all, official,
           note=(note + "; " if note else "") + f"{len(names)} tensors, worst at {worst_key}", n=len(names))
    assert not bad, f"{what}: {len(bad)} of {len(names)} tensors differ: " + ", ".join(bad[:10])
    return worst


def write_results():
    """Merge this session's measurements into RESULTS_FILE (other families' entries are kept)."""
    if not RESULTS:
        return
    old = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
    old.update(RESULTS)
    meta = {"torch": torch.__version__, "numpy": np.__version__, "commits": {k: v[1] for k, v in REPOS.items()}}
    old["_environment"] = meta
    tmp = RESULTS_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(old.items())), indent=1) + "\n")
    tmp.replace(RESULTS_FILE)


# ------------------------------------------------------------------------------------------------
# Driving upstream training scripts
# ------------------------------------------------------------------------------------------------
def fake_dataset(items, length=None):
    """A Dataset class standing in for an upstream one: any constructor arguments; serves items[0], items[1], ...
    in call order whatever index the sampler asks for (deep copies, so that upstream's in-place edits cannot leak
    between calls); `length` (default 10**6) is what len() answers, i.e. how many steps an epoch loop runs."""
    import copy

    class FakeDataset(torch.utils.data.Dataset):
        def __init__(self, *args, **kwargs):
            self.served = 0

        def __len__(self):
            return 10 ** 6 if length is None else length

        def __getitem__(self, i):
            item = items[self.served % len(items)]
            self.served += 1
            return copy.deepcopy(item)

    return FakeDataset


def spy(monkeypatch, owner, attr):
    """Replace owner.attr (a callable) by a wrapper that appends each return value to the returned list."""
    real = getattr(owner, attr)
    seen = []

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(owner, attr, wrapper)
    return seen


@torch.no_grad()
def randomize(module, seed=0):
    """Give every weight and BN buffer of `module` random, non-trivial values (convs He-scaled, BN affine and
    running statistics away from 1/0), so that a comparison cannot pass on a default initialisation."""
    g = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_var":
            t.copy_(0.5 + torch.rand(t.shape, generator=g))
        elif leaf == "running_mean" or (leaf == "bias"):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
        elif t.dim() == 1:  # BN weight
            t.copy_(0.5 + torch.rand(t.shape, generator=g))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
    return module


def record_steps(monkeypatch, watch=(), classes=("SGD", "Adam"), after=None):
    """Spy on torch.optim.<classes>: every optimiser built while the patch holds gets a record (appended to the
    returned list in construction order) filled by step hooks: `lrs`, its groups' learning rates at each step;
    `steps`, after each step: `params` and `state` ({id(param): copy}) and `modules`, copies of the state dicts of
    the `watch`ed modules that hold its parameters (BN statistics included); rec.params/state/modules = step 1's.
    `after(rec, k)`, when given, is called after step k is recorded. Two implementations cannot be compared after
    several free-running steps: an ulp of difference flips a ReLU or a max-pool choice and the next gradients differ
    by percents (measured: 1e-7 relative noise on the weights -> 9% in a momentum buffer). So a test compares step k
    from identical states: `after` puts the official run's state after step k into ours (teacher forcing)."""
    records = []
    for name in classes:
        real = getattr(torch.optim, name)

        def make(*args, _real=real, **kwargs):
            opt = _real(*args, **kwargs)
            rec = types.SimpleNamespace(optimizer=opt, lrs=[], steps=[], params=None, state=None, modules=None)
            ids = {id(p) for g in opt.param_groups for p in g["params"]}

            def after_step(o, a, k):
                rec.lrs.append([g["lr"] for g in o.param_groups])
                rec.steps.append(types.SimpleNamespace(
                    params={id(p): p.detach().clone() for g in o.param_groups for p in g["params"]},
                    state={id(p): {n: torch.as_tensor(v).clone() for n, v in s.items()} for p, s in o.state.items()},
                    modules=[clone_state(m) if any(id(p) in ids for p in m.parameters()) else None for m in watch]))
                rec.params, rec.state, rec.modules = rec.steps[0].params, rec.steps[0].state, rec.steps[0].modules
                if after is not None:
                    after(rec, len(rec.steps) - 1)

            opt.register_step_post_hook(after_step)
            records.append(rec)
            return opt

        monkeypatch.setattr(torch.optim, name, make)
    return records


def by_name(values, module, rename=lambda k: k):
    """{rename(param name): values[id(param)]} for a module's parameters present in `values` (record_steps)."""
    return {rename(n): values[id(p)] for n, p in module.named_parameters() if id(p) in values}


def state_by_name(state, module, rename=lambda k: k):
    """An optimiser's per-parameter state (record_steps' {id: ...} or a live optimizer.state) as
    {'<param name>:<buffer>': tensor} (momentum_buffer, exp_avg, exp_avg_sq, step)."""
    state = {(k if isinstance(k, int) else id(k)): v for k, v in state.items()}
    return {f"{rename(n)}:{k}": v for n, p in module.named_parameters() for k, v in state.get(id(p), {}).items()}
