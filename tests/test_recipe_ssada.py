"""ssada/: the README's recipe tables against each script's real-data preset, and the paper presets
themselves (real sizes and models) smoke-tested on the full-resolution real-format fixture trees.

Recipe test: for every row of `### Recipe: <script>` whose parameter starts with a flag, the first `code`
value of the *ours* column must equal the flag's effective value after parse_args with the real-data
command written above the table; every key of the script's PAPER preset must have a row; every row cites
released code (file:line) or says why not.
"""
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script, real_smoke

README = ROOT / "ssada" / "README.md"
SCRIPTS = ("train_ssada.py", "train_tufl.py")


def split_row(line):
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip().replace("\\|", "|") for c in cells]


def recipe(script):
    """(real-data argv, rows) of the README's `### Recipe: `script`` section."""
    lines = README.read_text().splitlines()
    head = f"### Recipe: `{script}`"
    if head not in lines:
        raise AssertionError(f"{README}: no section {head!r}")
    i = lines.index(head) + 1
    m = re.match(r"Real-data command: `(.*)`", lines[i])
    assert m, f"{README}: the line after {head!r} must be 'Real-data command: `...`'"
    argv = shlex.split(m.group(1))
    while not lines[i].startswith("|"):
        i += 1
    header = split_row(lines[i])
    assert header == ["parameter", "paper", "released code", "ours", "why different"], header
    rows = []
    i += 2
    while i < len(lines) and lines[i].startswith("|"):
        cells = split_row(lines[i])
        assert len(cells) == 5, f"{README}: row with {len(cells)} cells: {lines[i]}"
        rows.append(dict(zip(header, cells)))
        i += 1
    return argv, rows


def parse_value(text, current):
    """A table value ('0.05', '640,640', '20 40 60', 'None', 'False', 'all') in the type of `current`."""
    if text == "None":
        return None
    if isinstance(current, bool):
        return text == "True"
    if isinstance(current, tuple):
        return tuple(int(v) for v in text.split(","))
    if isinstance(current, list):
        return [int(v) for v in text.split()]
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        return type(current)(float(text)) if isinstance(current, float) else int(float(text))
    return text


@pytest.mark.parametrize("script", SCRIPTS)
def test_recipe_table_matches_the_paper_preset(script):
    mod = importlib.import_module(f"ssada.{script[:-3]}")
    argv, rows = recipe(script)
    args = vars(mod.parse_args(argv))
    checked = set()
    for r in rows:
        for col in ("parameter", "paper", "released code", "ours", "why different"):
            assert r[col], f"{README} {script}: empty {col!r} in row {r['parameter']!r}"
        rel = r["released code"]
        assert re.search(r"[\w/]+\.(py|yaml|md|sh):\d+", rel) or "not in the released" in rel, \
            f"{README} {script}: row {r['parameter']!r} cites no released file:line"
        m = re.match(r"`(--[\w-]+)`", r["parameter"])
        if not m:
            continue
        key = m.group(1)[2:].replace("-", "_")
        assert key in args, f"{README} {script}: {m.group(1)} is not a flag of {script}"
        v = re.search(r"`([^`]*)`", r["ours"])
        assert v, f"{README} {script}: row {m.group(1)} has no `value` in its ours column"
        want = parse_value(v.group(1), args[key])
        got = args[key]
        if isinstance(got, float) and want is not None:
            assert got == pytest.approx(want), f"{script} {m.group(1)}: README says {want}, the preset gives {got}"
        else:
            assert got == want, f"{script} {m.group(1)}: README says {want!r}, the preset gives {got!r}"
        checked.add(key)
    missing = set(mod.PAPER) - checked - {"out"}
    assert not missing, f"{README} {script}: PAPER keys without a recipe row: {sorted(missing)}"


def test_recipe_parser_catches_a_disagreement(tmp_path, monkeypatch):
    """The check can fail: a table that says lr 0.5 for SS-ADA is rejected."""
    text = README.read_text().replace("| `0.05` | the only SS-ADA", "| `0.5` | the only SS-ADA")
    assert text != README.read_text()
    fake = tmp_path / "README.md"
    fake.write_text(text)
    monkeypatch.setattr(__import__(__name__), "README", fake)
    with pytest.raises(AssertionError, match="--lr"):
        test_recipe_table_matches_the_paper_preset("train_ssada.py")


# ---------------------------------------------------------------------------------------------- paper-preset smoke
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random ResNet-18 file in torchvision's ImageNet format (--init) and a TUFL-layout Cityscapes
    BiSeNet checkpoint (--init-from), 13 classes."""
    import torchvision
    from common import runtime as rt
    from common.bisenet import make_bisenet
    d = tmp_path_factory.mktemp("weights")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), d / "resnet18.pth")
    m, cfg = make_bisenet(13, variant="tufl")
    rt.save_checkpoint(d / "cs_bisenet13.pth", model=m.state_dict(), config=cfg, iter=0)
    return d


def _argv(script, trees, weights):
    argv, _ = recipe(script)
    sub = {"G": trees["gta5"], "C": trees["cityscapes"], "N": trees["crosscity"],
           "r18.pth": weights / "resnet18.pth", "cs_bisenet13.pth": weights / "cs_bisenet13.pth"}
    return [str(sub.get(a, a)) for a in argv]


@real_smoke
def test_paper_preset_ssada_on_full_resolution_trees(tmp_path, real_trees, weights):
    """The real preset (640x640 crops of full-resolution GTA5/Cityscapes, BiSeNetV1-R18, full-resolution pool
    scoring, sliding-window validation): 2 iterations, one active round, one validation image."""
    out = tmp_path / "ssada"
    p = run_script("ssada/train_ssada.py", *_argv("train_ssada.py", real_trees, weights), "--epochs", "2",
                   "--sample-epochs", "1", "--epoch-iters", "1", "--batch-size", "1", "--init-ratio", "0.25",
                   "--max-val", "1", "--workers", "0", "--out", out)
    assert "[done]" in p.stdout and "with 2/4 target images labeled" in p.stdout
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    if cfg is not None:
        assert cfg.get("crop_size") in ([640, 640], (640, 640))
    final = json.loads((out / "final.json").read_text())
    assert final["last"]["mIoU"] >= 0 and final["labeled"] == 2
    assert (out / "rounds" / "round_01" / "selected.txt").read_text().count("\n") == 1
    pred = next((out / "predictions").glob("*_pred.png"))
    from PIL import Image
    assert Image.open(pred).size == (2048, 1024)  # evaluated at full resolution


@real_smoke
def test_paper_preset_tufl_and_test_on_full_resolution_trees(tmp_path, real_trees, weights):
    """The real preset (640x1280 crops after the {0.75..1.5} scale, frozen BN, every group at 10x, weighted CE,
    focal type 2, 647x647 sliding windows on the full-resolution Rome test image): 2 iterations; then
    test.py with TUFL's evaluation protocol on the result."""
    out = tmp_path / "tufl"
    p = run_script("ssada/train_tufl.py", *_argv("train_tufl.py", real_trees, weights), "--iters", "2",
                   "--eval-every", "2", "--save-every", "2", "--max-val", "1", "--workers", "0", "--out", out)
    assert "[done]" in p.stdout
    final = json.loads((out / "final.json").read_text())
    assert "mIoU13" in final["last"]
    ev = tmp_path / "ev"
    run_script("ssada/test.py", "--checkpoint", out / "model.pth", "--target", "crosscity", "--target-root",
               real_trees["crosscity"], "--mode", "sliding", "--crop-size", "647,647", "--eval-size", "full",
               "--stride-rate", "0.8333333", "--out", ev, "--workers", "0", "--save-predictions", "1")
    rep = json.loads((ev / "final.json").read_text())
    assert rep["images"] == 2 and rep["crop_size"] == [647, 647]
