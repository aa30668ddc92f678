"""The officially released models load (issue 26, item 4): advent_maxsquare/releases.py (ADVENT, AdaptSegNet,
MaxSquare: DeepLab's ResNetMulti) and madan/releases.py (MADAN: CyCADA's VGG16_FCN8s).

No official code or file is needed: each test writes a state dict in the official key layout itself, from our
model by the inverse of the documented renaming (written here, independently of the converters), and checks that
layout against a listing of the official class's state-dict names. Then: a strict load through the converter gives
logits equal to ours (bit for bit), test.py and --init-from accept the file end to end (subprocess, tiny toy copy),
and a missing or unexpected key is an error naming the file and the key. The differential suite
(tests/upstream/, SEGDA_UPSTREAM) checks the same converters against the official model classes."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, run_script
from common import runtime as rt
from common.fcn import FCN8s
from common.models import DeepLabV2, WeightLoadError
from advent_maxsquare import releases as AM
from madan import releases as MR


# ------------------------------------------------------------------------------------------ the official layouts
def to_resnetmulti(sd):
    """Our DeepLabV2 keys -> ResNetMulti's (advent/model/deeplabv2.py, model/deeplab_multi.py of AdaptSegNet and
    MaxSquare): heads to layer5/layer6.conv2d_list, the backbone without its prefix."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head_aux.convs."):
            out["layer5.conv2d_list." + k[len("head_aux.convs."):]] = v
        elif k.startswith("head_main.convs."):
            out["layer6.conv2d_list." + k[len("head_main.convs."):]] = v
        else:
            assert k.startswith("backbone."), k
            out[k[len("backbone."):]] = v
    return out


def resnetmulti_names(layers):
    """ResNetMulti's state-dict names, listed from its definition (Bottleneck conv1..3/bn1..3, a downsample in the
    first block of every layer, ClassifierModule's conv2d_list of 4 in layer5 and layer6)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for layer, n in enumerate(layers, 1):
        for i in range(n):
            p = f"layer{layer}.{i}."
            for j in (1, 2, 3):
                names += [f"{p}conv{j}.weight"] + [f"{p}bn{j}.{s}" for s in bn]
            if i == 0:
                names += [f"{p}downsample.0.weight"] + [f"{p}downsample.1.{s}" for s in bn]
    names += [f"layer{m}.conv2d_list.{i}.{s}" for m in (5, 6) for i in range(4) for s in ("weight", "bias")]
    return set(names)


def test_resnetmulti_layout_is_the_official_one_and_renames_back():
    with torch.device("meta"):
        ours = DeepLabV2(19, "resnet101", multi_level=True, caffe_style=True).state_dict()
    official = to_resnetmulti(ours)
    assert set(official) == resnetmulti_names((3, 4, 23, 3))
    assert set(AM.resnetmulti_to_ours(official)) == set(ours)
    assert official["layer6.conv2d_list.3.weight"].shape == (19, 2048, 3, 3)
    assert official["layer5.conv2d_list.0.weight"].shape == (19, 1024, 3, 3)


VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # make_layers(vgg.cfg['D']): conv, relu, ..., 'M' = pool
MADAN_HEAD = {"fc6.": "vgg_head.0.", "fc7.": "vgg_head.3.", "score_fr.": "vgg_head.6."}


def upsample_filter(size):
    """The fixed bilinear filter of cycada/models/fcn8s.py get_upsample_filter, written out."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.arange(size)
    return torch.from_numpy(np.outer(1 - abs(og - center) / factor, 1 - abs(og - center) / factor)).float()


def bilinear_weight(channels, factor):
    w = torch.zeros(channels, channels, 2 * factor, 2 * factor)
    for i in range(channels):
        w[i, i] = upsample_filter(2 * factor)
    return w


def to_madan(sd, num_classes):
    """Our FCN8s keys -> VGG16_FCN8s's, plus its saved upsampling buffers (upscore2 and upscore_pool4 are one
    Bilinear(2) module registered twice, so the state dict holds it twice)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("features."):
            k = "vgg." + k[len("features."):]
        for ours, theirs in MADAN_HEAD.items():
            if k.startswith(ours):
                k = theirs + k[len(ours):]
        out[k] = v
    w2 = bilinear_weight(num_classes, 2)
    out.update({"upscore2.w": w2, "upscore_pool4.w": w2.clone(), "upscore8.w": bilinear_weight(num_classes, 8)})
    return out


def madan_names():
    names = [f"vgg.{i}.{s}" for i in VGG_CONVS for s in ("weight", "bias")]
    names += [f"vgg_head.{i}.{s}" for i in (0, 3, 6) for s in ("weight", "bias")]
    names += [f"score_pool{i}.{s}" for i in (4, 3) for s in ("weight", "bias")]
    return set(names + ["upscore2.w", "upscore_pool4.w", "upscore8.w"])


def test_vgg16_fcn8s_layout_is_the_official_one_and_renames_back():
    with torch.device("meta"):
        ours = FCN8s(19).state_dict()
    official = to_madan(ours, 19)
    assert set(official) == madan_names()
    assert set(MR.fcn8s_to_ours(official)) == set(ours)
    assert official["vgg_head.0.weight"].shape == (4096, 512, 7, 7) and official["upscore8.w"].shape == (19, 19, 16, 16)


# ------------------------------------------------------------------------------------------ DeepLab releases
def _randomise(net, seed=0):
    """Non-trivial BN statistics and head biases, so that a swapped key would change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.2, 0.2)), (m.running_mean, (-0.2, 0.2)),
                                    (m.running_var, (0.5, 1.5))):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return net


def _cfg(two_branch):
    return {"model": "deeplabv2", "backbone": "resnet50", "num_classes": 19, "caffe_style": True,
            "multi_level": True, "two_branch": two_branch, "norm": "caffe"}


def _legacy_bytes(obj, numpy1_names=False):
    """torch.save in the pre-1.6 (pickle) format the releases were written in; numpy1_names: numpy scalars under
    numpy 1's module name, as a file from 2018-2019 holds them."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if numpy1_names else data


@pytest.fixture(scope="module")
def deeplab(tmp_path_factory):
    """Our ResNet-50 DeepLabV2 (caffe style, multi-level, 19 classes) and the same weights written in each release
    format ({format: file}) and as our checkpoints ({two_branch: file})."""
    d = tmp_path_factory.mktemp("deeplab_releases")
    torch.manual_seed(0)
    sd = _randomise(DeepLabV2(19, "resnet50", multi_level=True, caffe_style=True)).state_dict()
    official = to_resnetmulti(sd)
    files = {"advent": d / "gta2cityscapes_advent.pth", "adaptsegnet": d / "GTA2Cityscapes_multi-ed35151c.pth",
             "maxsquare": d / "GTA5_source.pth"}
    torch.save(official, files["advent"])  # ADVENT: torch.save(model.state_dict())
    # AdaptSegNet (PyTorch 0.3): no BN step counters, the old pickle format
    files["adaptsegnet"].write_bytes(_legacy_bytes({k: v for k, v in official.items()
                                                    if not k.endswith("num_batches_tracked")}))
    # MaxSquare: tools/train_source.py save_checkpoint, DataParallel-wrapped model, numpy mIoU
    files["maxsquare"].write_bytes(_legacy_bytes(
        {"epoch": 3, "iteration": 1200, "state_dict": {"module." + k: v for k, v in official.items()},
         "optimizer": {"state": {}, "param_groups": [{"lr": 2.5e-4, "momentum": 0.9, "params": [0, 1]}]},
         "best_MIou": np.float64(0.369)}, numpy1_names=True))
    ours = {}
    for tb in (False, True):
        ours[tb] = d / f"ours_two_branch{int(tb)}.pth"
        rt.save_checkpoint(ours[tb], model=sd, config=_cfg(tb), iter=0)
    return {"sd": sd, "files": files, "ours": ours, "dir": d}


def _ours(sd, two_branch):
    net = DeepLabV2(19, "resnet50", multi_level=True, caffe_style=True, two_branch=two_branch)
    net.load_state_dict(sd)
    return net.eval()


@pytest.mark.parametrize("fmt", ["advent", "adaptsegnet", "maxsquare"])
def test_release_converter_loads_strictly_with_our_logits(deeplab, fmt):
    net, cfg, how = AM.load_segmenter(deeplab["files"][fmt], fmt)
    two_branch = fmt != "advent"
    assert cfg == _cfg(two_branch) and how == fmt
    ref = _ours(deeplab["sd"], two_branch)
    net.eval()
    g = torch.Generator().manual_seed(1)
    for size in ((41, 73), (64, 128)):
        x = torch.randn(1, 3, *size, generator=g) * 50
        with torch.no_grad():
            a, b = net(x), ref(x)
        assert torch.equal(a["out"], b["out"]) and torch.equal(a["aux"], b["aux"])
    if two_branch:  # the classifier matters: the same weights summed over four branches give other logits
        with torch.no_grad():
            assert not torch.allclose(net(x)["out"], _ours(deeplab["sd"], False)(x)["out"])


def test_auto_detection_only_where_unambiguous(deeplab):
    _, cfg, how = AM.load_segmenter(deeplab["files"]["maxsquare"])
    assert cfg["two_branch"] and how.startswith("maxsquare (auto-detected: a 'state_dict' entry")
    _, cfg, how = AM.load_segmenter(deeplab["ours"][True])
    assert how.startswith("ours (auto-detected") and cfg == _cfg(True)
    for fmt in ("advent", "adaptsegnet"):  # same keys, other classifiers: never guessed
        with pytest.raises(WeightLoadError, match="pass --checkpoint-format advent, adaptsegnet or maxsquare"):
            AM.load_segmenter(deeplab["files"][fmt])


def test_missing_or_unexpected_key_names_the_file_and_the_keys(deeplab, tmp_path):
    official = to_resnetmulti(deeplab["sd"])
    bad = tmp_path / "missing.pth"
    torch.save({k: v for k, v in official.items() if k != "layer2.0.bn2.running_var"}, bad)
    with pytest.raises(WeightLoadError, match=rf"{bad}.*missing keys: backbone\.layer2\.0\.bn2\.running_var"):
        AM.load_segmenter(bad, "advent")
    extra = tmp_path / "unexpected.pth"
    torch.save({**official, "layer5.conv2d_list.4.weight": torch.zeros(19, 1024, 3, 3)}, extra)
    with pytest.raises(WeightLoadError, match=rf"{extra}.*unexpected keys: head_aux\.convs\.4\.weight"):
        AM.load_segmenter(extra, "adaptsegnet")
    with pytest.raises(WeightLoadError, match=rf"{deeplab['ours'][False]} is not a ResNetMulti state dict"):
        AM.load_segmenter(deeplab["ours"][False], "advent")  # ours is not ADVENT's
    # through the script: one error line naming the file and the key, exit 2
    p = run_script("advent_maxsquare/test.py", "--checkpoint", bad, "--checkpoint-format", "advent",
                   "--out", tmp_path / "e", check=False)
    assert p.returncode == 2 and "error:" in p.stderr and str(bad) in p.stderr
    assert "backbone.layer2.0.bn2.running_var" in p.stderr


_EVAL = {}


def _test_py(script, ckpt, tiny, out, *extra):
    p = run_script(script, "--checkpoint", ckpt, *extra, "--target-root", tiny / "toy_cityscapes", "--amp", "off",
                   "--workers", "0", "--save-predictions", "0", "--out", out)
    return p, json.loads((out / "final.json").read_text())


@pytest.mark.parametrize("fmt,flag", [("advent", "advent"), ("adaptsegnet", "adaptsegnet"), ("maxsquare", "auto")])
def test_test_py_evaluates_a_release_as_ours(deeplab, tiny_toy, tmp_path, fmt, flag):
    two_branch = fmt != "advent"
    if two_branch not in _EVAL:
        _EVAL[two_branch] = _test_py("advent_maxsquare/test.py", deeplab["ours"][two_branch], tiny_toy,
                                     deeplab["dir"] / f"eval_ours{int(two_branch)}")[1]
    p, rep = _test_py("advent_maxsquare/test.py", deeplab["files"][fmt], tiny_toy, tmp_path / "eval",
                      "--checkpoint-format", flag)
    assert f"format {fmt}" in p.stdout and rep["checkpoint_format"].startswith(fmt)
    ref = _EVAL[two_branch]
    assert rep["images"] == ref["images"] == 4
    assert rep["last"]["per_class"] == ref["last"]["per_class"] and rep["mIoU"] == ref["mIoU"]


@pytest.mark.parametrize("script,fmt,extra", [
    ("advent_maxsquare/train_advent.py", "advent", ["--mode", "minent", "--multi", "1"]),
    ("advent_maxsquare/train_maxsquare.py", "auto", [])])
def test_init_from_a_release(deeplab, tiny_toy, tmp_path, script, fmt, extra):
    """--init-from an official file: the run starts from exactly its weights (lr 0: one step changes no parameter,
    only BN running statistics) and keeps the release's architecture (two_branch) in its model.pth. (train_adaptseg.py
    has the same model block: its parser is checked below.)"""
    name = {"train_advent": "advent", "train_adaptseg": "adaptsegnet", "train_maxsquare": "maxsquare"}
    fmt_name = name[script.split("/")[1][:-3]]
    out = tmp_path / "run"
    run_script(script, "--init-from", deeplab["files"][fmt_name], "--checkpoint-format", fmt, *extra,
               "--iters", "1", "--batch-size", "1", "--lr", "0", "--eval-every", "1", "--workers", "0", "--amp", "off",
               "--source-root", tiny_toy / "toy_gta5", "--target-root", tiny_toy / "toy_cityscapes", "--out", out)
    init = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"event": "init"' in line][0]
    assert init["checkpoint_format"].startswith(fmt_name) and init["config"] == _cfg(fmt_name != "advent")
    saved = torch.load(out / "model.pth", map_location="cpu", weights_only=True)
    assert saved["config"] == _cfg(fmt_name != "advent")
    params = {n for n, _ in _ours(deeplab["sd"], False).named_parameters()}
    for k in params:
        assert torch.equal(saved["model"][k], deeplab["sd"][k]), k


def test_every_adaptation_script_takes_the_formats(tmp_path):
    import importlib
    init = tmp_path / "r.pth"
    init.write_bytes(b"placeholder")
    for name in ("train_adaptseg", "train_advent", "train_maxsquare"):
        mod = importlib.import_module(f"advent_maxsquare.{name}")
        args = mod.parse_args(["--source", "gta5", "--target", "cityscapes", "--init-from", str(init),
                               "--checkpoint-format", "adaptsegnet"])
        assert args.checkpoint_format == "adaptsegnet" and args.init_from == str(init)


# ------------------------------------------------------------------------------------------ MADAN releases
@pytest.fixture(scope="module")
def fcn(tmp_path_factory):
    """Our FCN8s (19 classes) with random half-precision weights (a smaller file; the values are exact in fp32),
    trained-looking (non-zero) skip layers; written as MADAN's release and as our checkpoints."""
    d = tmp_path_factory.mktemp("madan_releases")
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FCN8s(19).state_dict().items()}
    sd = {k: (torch.rand(s, generator=g) * 0.02 - 0.01).half() for k, s in shapes.items()}
    sd.update({k: (torch.rand(s, generator=g) * 0.2 - 0.1).half() for k, s in shapes.items() if k.endswith(".bias")})
    release = d / "Multi_Source_SAD_CCD.pth"
    torch.save(to_madan(sd, 19), release)  # train_fcn.py / train_fcn_adda.py: torch.save(net.module.state_dict())
    as_upstream = {k: torch.zeros_like(v) if k.startswith("score_pool") else v for k, v in sd.items()}
    cfg = {"model": "fcn8s", "backbone": "vgg16", "num_classes": 19, "caffe_style": False, "multi_level": False,
           "two_branch": False, "norm": "imagenet"}
    ours = d / "ours_as_upstream_loads.pth"
    rt.save_checkpoint(ours, model=as_upstream, config=cfg, iter=0)
    return {"sd": sd, "as_upstream": as_upstream, "release": release, "ours": ours, "cfg": cfg, "dir": d}


def _fcn(sd):
    net = FCN8s(19)
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    return net.eval()


def test_madan_converter_loads_strictly_with_our_logits(fcn):
    x = torch.randn(1, 3, 37, 53, generator=torch.Generator().manual_seed(1))
    outs = {}
    for fmt, ref in (("madan", fcn["as_upstream"]), ("madan_all", fcn["sd"])):
        net, cfg, how = MR.load_segmenter(fcn["release"], fmt)
        assert cfg == fcn["cfg"] and how == fmt
        with torch.no_grad():
            outs[fmt] = net.eval()(x)["out"]
            assert torch.equal(outs[fmt], _fcn(ref)(x)["out"]), fmt
        del net
    # upstream's load (skip layers at zero) and the file's full weights are different networks
    assert not torch.allclose(outs["madan"], outs["madan_all"])
    _, _, how = MR.load_segmenter(fcn["release"])
    assert how.startswith("madan (auto-detected: vgg.* and vgg_head.* keys")


def test_madan_missing_key_or_wrong_kernel_names_the_file(fcn, tmp_path):
    official = to_madan(fcn["sd"], 19)
    bad = tmp_path / "missing.pth"
    torch.save({k: v for k, v in official.items() if k != "vgg.28.bias"}, bad)
    with pytest.raises(WeightLoadError, match=rf"{bad}.*missing keys: features\.28\.bias"):
        MR.load_segmenter(bad, "madan")
    kern = tmp_path / "kernel.pth"
    torch.save({**official, "upscore8.w": official["upscore8.w"] * 2}, kern)
    with pytest.raises(WeightLoadError, match=rf"{kern}: upscore8\.w .* is not the fixed bilinear kernel"):
        MR.load_segmenter(kern)
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightLoadError, match=rf"{other}: not a format this folder reads"):
        MR.load_segmenter(other)


def test_madan_test_py_evaluates_a_release_as_upstream_loads_it(fcn, tiny_toy, tmp_path):
    _, ref = _test_py("madan/test.py", fcn["ours"], tiny_toy, tmp_path / "ours")
    p, rep = _test_py("madan/test.py", fcn["release"], tiny_toy, tmp_path / "release")  # auto -> madan
    assert "format madan (auto-detected" in p.stdout and rep["checkpoint_format"].startswith("madan")
    assert rep["images"] == ref["images"] == 4
    assert rep["last"]["per_class"] == ref["last"]["per_class"] and rep["mIoU"] == ref["mIoU"]


@pytest.mark.parametrize("script", ["madan/train_adda.py", "madan/train_segmenter.py", "madan/train_mdan.py",
                                    "madan/test.py"])
def test_madan_scripts_take_the_formats(script):
    assert "--checkpoint-format {auto,ours,madan,madan_all}" in run_script(script, "--help").stdout


# ------------------------------------------------------------------------------------------ README commands (item 5)
@pytest.mark.parametrize("folder,heading", [("advent_maxsquare", "## Evaluating the official releases"),
                                            ("madan", "### Evaluating the released segmenters")])
def test_readme_release_commands_parse(folder, heading, tmp_path):
    """Every command of the README's release section is accepted by its script's parser (files named by
    --init-from exist as placeholders: the parsers check that)."""
    import importlib
    import re
    import shlex
    text = (ROOT / folder / "README.md").read_text()
    section = text[text.index(heading):]
    block = section[section.index("```bash\n") + 8:section.index("```\n", section.index("```bash\n") + 8)]
    env = {"D": "--source gta5 --source-root /data/GTA5 --target cityscapes --target-root /data/cityscapes"}
    placeholder = tmp_path / "release.pth"
    placeholder.write_bytes(b"placeholder")
    n = 0
    for line in block.replace("\\\n", " ").splitlines():
        m = re.match(r'(\w+)="([^"]*)"', line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        if not line.startswith("python "):
            continue
        for k, v in env.items():
            line = line.replace(f"${k}", v)
        argv = shlex.split(re.sub(r"\s+#.*$", "", line))
        for i, a in enumerate(argv[:-1]):
            if a == "--init-from":
                argv[i + 1] = str(placeholder)
        mod = importlib.import_module(f"{folder}.{Path(argv[1]).stem}")
        args = mod.parse_args(argv[2:])
        assert args.checkpoint_format in ("auto", "advent", "adaptsegnet", "madan", "madan_all"), line
        n += 1
    assert n >= {"advent_maxsquare": 10, "madan": 5}[folder]
