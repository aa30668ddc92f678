"""Shared test helpers. The toy domains are generated once per machine (data/toy, or $SEGDA_DATA/toy)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The suite runs on toy v2 (no toy-backbone pre-training, ~25 min on 2 cores): a SEGDA_TOY_VERSION=3 left in the
# shell must not change what the tests exercise. Tests of v3 set it themselves (monkeypatch) on small trees.
os.environ["SEGDA_TOY_VERSION"] = "2"
# Scripts run on the CPU (GPUs hidden) unless SEGDA_TEST_DEVICE=cuda, which smoke-tests the CUDA paths of every
# script; bit-exact resume comparisons need deterministic kernels, so they are checked on the CPU only (EXACT).
TEST_DEVICE = os.environ.get("SEGDA_TEST_DEVICE", "cpu")
EXACT = TEST_DEVICE == "cpu"
# The paper-preset smoke tests (real sizes and models on full-resolution fixture trees: R101 / FCN8s-VGG16 / BiSeNet
# at 1024x2048, 2-5 minutes a folder on 2 idle cores, 4-7 GB RAM) run with SEGDA_REAL_SMOKE=1, or on a GPU
# (SEGDA_TEST_DEVICE=cuda); the default suite keeps their cheap checks (crops, label spaces, recipe tables).
REAL_SMOKE = os.environ.get("SEGDA_REAL_SMOKE") == "1" or TEST_DEVICE == "cuda"
_skip_real = pytest.mark.skipif(not REAL_SMOKE, reason="paper-preset smoke test at real sizes: set SEGDA_REAL_SMOKE=1 "
                                "or SEGDA_TEST_DEVICE=cuda")


def real_smoke(test):
    """Mark a paper-preset smoke test: skipped unless REAL_SMOKE; selected alone with `pytest -m real_smoke`."""
    return pytest.mark.real_smoke(_skip_real(test))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_smoke: paper-preset smoke test at real sizes (SEGDA_REAL_SMOKE=1)")


def run_script(script, *args, timeout=600, env=None, check=True):
    """Run a repository script in a subprocess (as a user would) and return the CompletedProcess."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if TEST_DEVICE == "cpu":
        e["CUDA_VISIBLE_DEVICES"] = ""
    e.update(env or {})
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def run_torchrun(script, *args, nproc=2, timeout=600, env=None):
    """Run a repository script under torchrun (--standalone, CPU/gloo), one thread per process."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo, one machine
    e.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def toy_root():
    from common.toy import ensure_toy
    return ensure_toy()


def _link_subset(src, dst, files):
    for f in files:
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (dst / rel).exists():
            (dst / rel).symlink_to(f)


@pytest.fixture(scope="session")
def tiny_toy(toy_root, tmp_path_factory):
    """A few-image copy (symlinks) of the toy GTA5-style source and Cityscapes-style target, same layouts:
    end-to-end tests pass it as --source-root/--target-root so that evaluation stays cheap."""
    dst = tmp_path_factory.mktemp("tiny_toy")
    src = toy_root / "toy_gta5"
    names = sorted(p.name for p in (src / "images").iterdir())[:12]
    _link_subset(src, dst / "toy_gta5", [src / d / n for d in ("images", "labels") for n in names])
    (dst / "toy_gta5" / "lists").mkdir()
    (dst / "toy_gta5" / "lists" / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (dst / "toy_gta5" / "lists" / "val.txt").write_text("\n".join(names[8:]) + "\n")
    cs = toy_root / "toy_cityscapes"
    files = []
    for split in ("train", "val", "test"):
        imgs = sorted((cs / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))[:8 if split == "train" else 4]
        for p in imgs:
            files.append(p)
            stem = p.name[: -len("_leftImg8bit.png")]
            files.append(cs / "gtFine" / split / p.parent.name / f"{stem}_gtFine_labelIds.png")
    _link_subset(cs, dst / "toy_cityscapes", files)
    return dst


@pytest.fixture(scope="session")
def real_trees(tmp_path_factory):
    """Full-resolution GTA5 / SYNTHIA / Cityscapes / CrossCity fixture trees in the real formats
    (tests/realdata.py), built once per session, for the paper-preset smoke tests: {name: root}."""
    from realdata import make_real_trees
    return make_real_trees(tmp_path_factory.mktemp("real_trees"))


def class_share(root, rels):
    """Direct count for the selection tests: the class shares (train ids, 19 classes) of the labelled pixels of
    the Cityscapes-layout images `rels` (leftImg8bit/... paths) under `root`, from their gtFine label-id PNGs."""
    import numpy as np
    from PIL import Image
    from common import labels as L
    lut = L.lut_from_map(L.CITYSCAPES_ID_TO_TRAINID, 19)
    h = np.zeros(19)
    for r in rels:
        lab = lut[np.asarray(Image.open(Path(root) / r.replace("leftImg8bit/", "gtFine/", 1)
                                        .replace("_leftImg8bit.png", "_gtFine_labelIds.png")))]
        h += np.bincount(lab[lab < 19], minlength=19)
    return h / h.sum()
