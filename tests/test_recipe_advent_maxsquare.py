"""advent_maxsquare/: the real-data presets against the README's recipe tables (issue 13), and a paper-preset
smoke test of every script on full-resolution real-format fixture trees.

Recipe: each table in README.md's "Recipe tables" section names a preset command; the test runs the script's
own parse_args on it, derives the values the script computes from it (input sizes, schedule, evaluation
protocol, lr groups), and compares each row's `key=value` in `ours`; where `why different` is `—` the released
value must be the same, otherwise it must differ (a stale explanation fails too). The README's and the
docstrings' real-data commands must parse.

Smoke: the paper presets themselves (DeepLabV2-R101, 1280x720 / 1024x512, batch 1), --init scratch, 1 step,
one validation image; the log's "inputs" record says what the network was fed.
    python -m pytest -q tests/test_recipe_advent_maxsquare.py
"""
import importlib.util
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, run_script, real_smoke
from common import runtime as rt
from common.datasets import DOMAINS, eval_set, train_set
from common.models import make_segmenter
from common.transforms import Compose, Resize

README = ROOT / "advent_maxsquare" / "README.md"
SCRIPTS = ["train_source.py", "train_adaptseg.py", "train_advent.py", "train_maxsquare.py", "test.py"]
D = "--source gta5 --source-root /data/GTA5 --target cityscapes --target-root /data/cityscapes"
GTA5_ALL, CITYSCAPES_TRAIN = 24966, 2975  # the real datasets' sizes (for MaxSquare's round-based length)
# Every hyper-parameter a table must hold (a row cannot silently disappear).
REQUIRED = {
    "train_source.py": "source_images val_on source_size random_mirror blur batch_size lr heads_lr_mult momentum "
                       "weight_decay poly_power iters stop_iter multi lambda_seg freeze_bn init_format eval_every "
                       "eval_input",
    "train_adaptseg.py": "source_images source_size target_size random_mirror blur batch_size lr heads_lr_mult momentum "
                         "weight_decay poly_power iters stop_iter lr_d d_betas lambda_seg lambda_main lambda_aux gan "
                         "multi freeze_bn init_format save_every eval_every eval_input eval_labels",
    "train_advent.py": "mode source_images source_size target_size random_mirror blur batch_size lr heads_lr_mult "
                       "momentum weight_decay poly_power iters stop_iter lr_d d_betas lambda_seg lambda_main lambda_aux "
                       "multi freeze_bn init_format save_every eval_every eval_input eval_labels",
    "train_maxsquare.py": "source_images source_size target_size random_mirror blur batch_size lr heads_lr_mult "
                          "momentum weight_decay poly_power round_num epoch_each_round iters stop_iter eval_every "
                          "target_loss lambda_target iw_ratio multi lambda_seg threshold freeze_bn eval_input "
                          "eval_labels",
    "test.py": "split eval_input eval_labels flip",
}


def load(script):
    spec = importlib.util.spec_from_file_location(f"recipe_{script[:-3]}", ROOT / "advent_maxsquare" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def recipe_tables():
    """{script: (preset command, [[parameter, paper, released, ours, why], ...])} from README.md."""
    text = README.read_text()
    section = text[text.index("## Recipe tables"):text.index("## Deviations from the official code")]
    tables = {}
    for block in section.split("\n### ")[1:]:
        script = re.match(r"`([\w.]+\.py)`", block).group(1)
        cmd = re.search(r"^Preset[^:]*: `python advent_maxsquare/[\w.]+ (.*)`$", block, re.M).group(1)
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
                if line.startswith("| ") and not line.startswith("| parameter")]
        tables[script] = (cmd, rows)
    return tables


def kv(cell):
    """The first `key=value` code span of a cell, or None."""
    m = re.search(r"`(\w+)=([^`]*)`", cell)
    return (m.group(1), m.group(2).strip()) if m else None


def same(a, b):
    a, b = str(a).strip().lower(), str(b).strip().lower()
    try:
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    except ValueError:
        return a == b


def hw(size):
    return f"{size[0]}x{size[1]}"


def argv_of(cmd, tmp_path):
    """A README/docstring command line -> argv for parse_args (placeholder files created)."""
    w = tmp_path / "W.pth"
    w.write_bytes(b"placeholder")  # parse_args only checks that --init-from names a file
    cmd = cmd.replace("$D", D).replace(" ... ", f" {w} ").replace("W.pth", str(w)).replace("SRC.pth", str(w))
    argv = shlex.split(cmd.replace("ROOT", "/data/cityscapes"))
    for i, a in enumerate(argv[:-1]):
        if a == "--init-from":
            argv[i + 1] = str(w)
    return argv


def effective(script, args, toy_root):
    """What the script does with these args: its flags plus the values it derives (same expressions)."""
    eff = dict(vars(args))
    lab = eval_set("toy_cityscapes", toy_root / "toy_cityscapes", 19, "caffe").transform.transforms[0]
    eff["eval_labels"] = hw(lab.size_hw) if lab.resize_label else "full"  # the real domains use the same eval_set
    if script == "test.py":
        eff["eval_input"] = hw(DOMAINS[args.target][4])
        eff["split"] = args.split or DOMAINS[args.target][2]
        return eff
    src = DOMAINS[args.source]
    eff["source_size"] = hw(args.crop_size or src[3])
    eff["target_size"] = hw(getattr(args, "target_crop_size", None) or DOMAINS[args.target][3])
    eff["source_images"] = "all" if src[1] == "all" and not getattr(args, "source_list", None) else "list"
    eff["val_on"] = "source" if getattr(args, "val_source_list", None) else "target"
    eff["eval_input"] = hw(src[3]) if eff["val_on"] == "source" else hw(DOMAINS[args.target][4])
    eff["poly_power"] = inspect.signature(rt.poly_lr).parameters["power"].default
    model, _ = make_segmenter("deeplabv2", "resnet18", 19, "scratch", multi_level=True)
    mults = sorted({g["lr_mult"] for g in rt.sgd_10x(model, 1.0).param_groups})
    eff["heads_lr_mult"] = mults[-1] / mults[0]
    betas = re.search(r"torch\.optim\.Adam\([^)]*betas=\(([^)]*)\)", (ROOT / "advent_maxsquare" / script).read_text())
    eff["d_betas"] = betas.group(1) if betas else None
    if getattr(args, "round_num", 0):
        mod = load(script)
        iters, stop, per_epoch = mod.round_schedule(GTA5_ALL, CITYSCAPES_TRAIN, args.batch_size, args.epoch_each_round,
                                                    args.round_num)
        eff.update(iters=iters, stop_iter=args.stop_iter or stop, eval_every=args.eval_every or per_epoch,
                   save_every=args.save_every or per_epoch)
    eff["eval_every"] = "none" if eff["eval_every"] is None else eff["eval_every"]
    return eff


def test_every_script_has_a_recipe_table():
    assert sorted(recipe_tables()) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_recipe_table_matches_the_preset(script, tmp_path, toy_root):
    cmd, rows = recipe_tables()[script]
    args = load(script).parse_args(argv_of(cmd, tmp_path))
    eff = effective(script, args, toy_root)
    seen = set()
    for param, _paper, released, ours, why in rows:
        o = kv(ours)
        if o is None:
            assert script == "test.py", f"{script} recipe row {param!r}: no `key=value` in the 'ours' column"
            continue
        key, value = o
        seen.add(key)
        assert key in eff, f"{script} recipe row {param!r}: the script has no {key!r}"
        assert same(eff[key], value), f"{script} recipe row {param!r}: README says {key}={value}, script does {eff[key]}"
        r = kv(released)
        assert r is not None and r[0] == key, f"{script} recipe row {param!r}: released column lacks `{key}=...`"
        if why == "—":
            assert same(r[1], value), f"{script} {param!r}: released {r[1]} != ours {value} but no reason given"
        else:
            assert not same(r[1], value), f"{script} {param!r}: released and ours agree, yet a reason is given"
    assert set(REQUIRED[script].split()) <= seen, f"{script}: rows missing for {set(REQUIRED[script].split()) - seen}"


def _commands(text):
    """`python advent_maxsquare/X.py ...` commands (continuation lines joined) that use real data."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        m = re.match(r"\s*python (advent_maxsquare/[\w.]+\.py) (.*)", line)  # not the rendered diff's +/- lines
        if m and ("$D" in line or "--source gta5" in line or "--target cityscapes" in line):
            yield m.group(1).split("/")[1], re.sub(r"\s+#.*$", "", m.group(2).split("`")[0])


def test_readme_and_docstring_real_data_commands_parse(tmp_path, capsys):
    """A command a user copies must be accepted by the script (e.g. `--multi 1`, `--freeze-bn`, sizes)."""
    found = 0
    sources = [(README.read_text(), None)] + [(load(s).__doc__, s) for s in SCRIPTS]
    for text, only in sources:
        for script, rest in _commands(text):
            if only and script != only:
                continue
            if "--source synthia" in rest and "--num-classes" not in rest:
                continue
            argv = argv_of(rest.replace("/data/GTA5 \\", "/data/GTA5"), tmp_path)
            try:
                load(script).parse_args(argv)
            except SystemExit:
                pytest.fail(f"{script} rejects the documented command: {rest}\n{capsys.readouterr().err}")
            found += 1
    assert found >= 10


def test_maxsquare_round_schedule_is_upstreams():
    """solve_gta5.py:156 iter_max = num_iterations (2,976 for 2,975 Cityscapes images) x 2 x 5; each epoch is
    zip(source, target): the 2,975 target steps; batch 2 halves both."""
    ms = load("train_maxsquare.py")
    assert ms.round_schedule(24966, 2975, 1, 2, 5) == (2976 * 10, 2975 * 10, 2975)
    assert ms.round_schedule(12403, 2975, 1, 2, 5) == (2976 * 10, 2975 * 10, 2975)
    assert ms.round_schedule(1000, 2975, 2, 2, 1) == (1488 * 2, 500 * 2, 500)  # a smaller source ends the pass
    assert ms.round_schedule(24966, 20000, 1, 1, 1) == (5000, 20000, 20000)  # upstream's ITER_MAX cap


@pytest.mark.parametrize("mode", ["all", "stem", "none"])
def test_freeze_bn_modes(mode):
    """all: every BN's affine frozen (AdaptSegNet/ADVENT); stem: only the ResNet's bn1 (MaxSquare)."""
    ms = load("train_maxsquare.py")
    args = ms.parse_args(["--freeze-bn"] if mode == "all" else ["--freeze-bn", mode])
    assert args.freeze_bn == mode
    model, _ = make_segmenter("deeplabv2", "resnet18", 19, "scratch", multi_level=True)
    if args.freeze_bn != "none":
        rt.freeze_bn_affine(model.backbone.bn1 if args.freeze_bn == "stem" else model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for n in (n + ".weight", n + ".bias")}
    expected = {"all": bn, "stem": {"backbone.bn1.weight", "backbone.bn1.bias"}, "none": set()}[mode]
    assert frozen == expected
    in_optimizer = {id(q) for g in rt.sgd_10x(model, 1.0).param_groups for q in g["params"]}
    assert in_optimizer == {id(q) for q in model.parameters() if q.requires_grad}  # frozen = never updated


# ------------------------------------------------------------------------------ paper-preset smoke (real formats)
def _one_image_cityscapes(real_trees, dst):
    """The fixture's Cityscapes tree with its 4 train images and ONE val image (symlinks)."""
    cs = real_trees["cityscapes"]
    keep = sorted((cs / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0].name[: -len("_leftImg8bit.png")]
    for f in sorted(cs.rglob("*.png")):
        rel = f.relative_to(cs)
        if rel.parts[1] == "val" and not rel.name.startswith(keep + "_"):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).symlink_to(f)
    return dst


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _inputs(out):
    return next(r for r in _log(out) if r.get("event") == "inputs")


def _ignore_shares(name, root, classes, size_hw):
    """Share of ignore pixels in each fixture image after what the preset should do (a plain resize to the
    preset size, as upstream): a padded or cropped input would give another share."""
    data = train_set(name, root, classes, "caffe", Compose([Resize(size_hw)]))
    return [round((data[i]["label"] == 255).float().mean().item(), 5) for i in range(len(data))]


def _check_fed(out, source_hw, target_hw=None, classes=19, shares=None):
    rec = _inputs(out)
    assert rec["source"] == [1, 3, *source_hw], rec  # the preset's real size, batch 1: no crop, no rescale
    if target_hw:
        assert rec["target"] == [1, 3, *target_hw], rec
    labels = [v for v in rec["labels"] if v != 255]
    assert labels and max(labels) < classes, rec  # the label space of the run
    assert len(labels) >= classes - 1, rec  # the fixture holds every class: a wrong mapping loses most
    assert any(abs(rec["ignore_share"] - s) < 2e-4 for s in shares), (rec, shares)  # no padding, no crop
    final = json.loads((out / "final.json").read_text())
    assert len(final["last"]["per_class"]) == classes and 0 <= final["last"]["mIoU"] <= 100
    return rec


@pytest.fixture(scope="module")
def preset_runs(real_trees, tmp_path_factory):
    """The folder's paper presets, one step each (R101 at the real sizes: heavy, so run once per module)."""
    tmp = tmp_path_factory.mktemp("am_presets")
    cs = _one_image_cityscapes(real_trees, tmp / "cityscapes")
    gta = ["--source", "gta5", "--source-root", real_trees["gta5"], "--target", "cityscapes", "--target-root", cs]
    syn = ["--source", "synthia", "--source-root", real_trees["synthia"], "--target", "cityscapes",
           "--target-root", cs, "--num-classes", "16"]
    one = ["--init", "scratch", "--init-format", "caffe", "--stop-iter", "1", "--workers", "0"]
    runs = {"gta5_shares": _ignore_shares("gta5", real_trees["gta5"], 19, (720, 1280)),
            "synthia_shares": _ignore_shares("synthia", real_trees["synthia"], 16, (760, 1280))}
    runs["source"] = tmp / "source"  # MaxSquare stage 1 (multi-level): shared by train_maxsquare and test.py
    run_script("advent_maxsquare/train_source.py", *gta, *one, "--multi", "1", "--out", runs["source"], timeout=900)
    runs["adaptseg"] = tmp / "adaptseg"  # SYNTHIA (16-bit labels, 16 classes) -> Cityscapes
    run_script("advent_maxsquare/train_adaptseg.py", *syn, *one, "--out", runs["adaptseg"], timeout=900)
    runs["advent"] = tmp / "advent"
    run_script("advent_maxsquare/train_advent.py", *gta, *one, "--out", runs["advent"], timeout=900)
    runs["maxsquare"] = tmp / "maxsquare"  # MS+IW+Multi recipe, from the stage-1 checkpoint
    run_script("advent_maxsquare/train_maxsquare.py", *gta, "--init-from", runs["source"] / "model.pth",
               "--stop-iter", "1", "--workers", "0", "--target-loss", "iw_maxsquare", "--multi", "1",
               "--lambda-target", "0.09", "--target-crop-size", "640,1280", "--out", runs["maxsquare"], timeout=900)
    for name, extra in (("test", []), ("test_resized", ["--resize-labels"])):  # ADVENT's protocol, MaxSquare's
        runs[name] = tmp / name
        run_script("advent_maxsquare/test.py", "--checkpoint", runs["maxsquare"] / "model.pth", "--target",
                   "cityscapes", "--target-root", cs, "--workers", "0", "--save-predictions", "0",
                   "--save-label-ids", runs[name] / "ids", *extra, "--out", runs[name], timeout=900)
    return runs


@real_smoke
def test_paper_preset_smoke_source_only(preset_runs):
    out = preset_runs["source"]
    _check_fed(out, (720, 1280), shares=preset_runs["gta5_shares"])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["backbone"], cfg["batch_size"], cfg["freeze_bn"], cfg["random_mirror"], cfg["blur"]) == \
        ("resnet101", 1, "stem", 1, 1)


@real_smoke
def test_paper_preset_smoke_adaptseg_synthia_16_classes(preset_runs):
    out = preset_runs["adaptseg"]
    _check_fed(out, (760, 1280), (512, 1024), classes=16, shares=preset_runs["synthia_shares"])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["freeze_bn"], cfg["random_mirror"], cfg["blur"], cfg["multi"]) == ("all", 0, 0, 1)
    assert "mIoU13" in json.loads((out / "final.json").read_text())["last"]  # SYNTHIA: mIoU16 and mIoU13


@real_smoke
def test_paper_preset_smoke_advent(preset_runs):
    out = preset_runs["advent"]
    _check_fed(out, (720, 1280), (512, 1024), shares=preset_runs["gta5_shares"])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["freeze_bn"], cfg["random_mirror"], cfg["blur"], cfg["mode"]) == ("all", 0, 0, "advent")


@real_smoke
def test_paper_preset_smoke_maxsquare_and_test(preset_runs):
    out = preset_runs["maxsquare"]
    _check_fed(out, (720, 1280), (640, 1280), shares=preset_runs["gta5_shares"])
    sched = next(r for r in _log(out) if r.get("event") == "schedule")
    # the fixture's 2 GTA5 x 4 Cityscapes train images: 2 steps a pass, 10 passes, poly over (4 + 1) x 10
    assert (sched["steps_per_epoch"], sched["iters"], sched["stop_iter"]) == (2, 50, 1)
    ev = json.loads((preset_runs["test"] / "final.json").read_text())
    assert ev["images"] == 1 and ev["split"] == "val" and 0 <= ev["mIoU"] <= 100 and not ev["resize_labels"]
    # predictions at the label's resolution: 2048x1024 (AdaptSegNet/ADVENT), 1024x512 with --resize-labels (MaxSquare)
    for name, size in (("test", (2048, 1024)), ("test_resized", (1024, 512))):
        ids = sorted((preset_runs[name] / "ids").rglob("*.png"))
        assert len(ids) == 1 and Image.open(ids[0]).size == size, (name, ids)


def test_source_list_and_validation_on_the_source(tmp_path, toy_root):
    """MaxSquare's stage 1: train on a listed source split, keep the checkpoint by a held-out source split."""
    names = sorted(p.name for p in (toy_root / "toy_gta5" / "images").iterdir())
    (tmp_path / "train.txt").write_text("\n".join(names[:4]) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(names[4:6]) + "\n")
    out = tmp_path / "run"
    run_script("advent_maxsquare/train_source.py", "--iters", "1", "--batch-size", "2", "--workers", "0",
               "--source-list", tmp_path / "train.txt", "--val-source-list", tmp_path / "val.txt", "--out", out)
    final = json.loads((out / "final.json").read_text())
    assert final["target"] == "toy_gta5" and final["eval_split"] == str(tmp_path / "val.txt")
    p = run_script("advent_maxsquare/train_source.py", "--iters", "1", "--workers", "0", "--source-list",
                   tmp_path / "missing.txt", "--out", tmp_path / "bad", check=False)
    assert p.returncode != 0 and "missing.txt" in p.stdout + p.stderr
