"""advent_maxsquare/releases.py against the official model classes (issue 26, item 4): a randomised upstream
ResNetMulti (ADVENT, AdaptSegNet, MaxSquare) written as that repository writes its checkpoints, read back through our
converter (strict), gives the official class's logits. MADAN's FCN8s: tests/upstream/test_madan.py.
Run: SEGDA_UPSTREAM=DIR python -m pytest -q tests/upstream/test_release_formats.py -m upstream"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from upstream import harness as H
from advent_maxsquare import releases as AM

C = 19
CLASSES = {  # format: (folder, module, how the repository saves a model, output order)
    "advent": ("ADVENT", "advent.model.deeplabv2", "advent/domain_adaptation/train_UDA.py: torch.save(model.state_dict())",
               ("aux", "out")),
    "adaptsegnet": ("AdaptSegNet", "model.deeplab_multi",
                    "train_gta2cityscapes_multi.py: torch.save(model.state_dict()), pre-1.6 format, no BN counters",
                    ("aux", "out")),
    "maxsquare": ("MaxSquareLoss", "graphs.models.deeplab_multi",
                  "tools/train_source.py:save_checkpoint: {'state_dict': DataParallel's, 'best_MIou': numpy, ...}",
                  ("out", "aux")),
}


def _save(fmt, model, path):
    sd = model.state_dict()
    if fmt == "adaptsegnet":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "maxsquare":
        wrapped = torch.nn.DataParallel(model)  # on a CPU machine it only wraps: 'module.' keys, as upstream's
        torch.save({"epoch": 3, "iteration": 1200, "state_dict": wrapped.state_dict(),
                    "optimizer": {"state": {}, "param_groups": [{"lr": 2.5e-4, "params": [0]}]},
                    "best_MIou": np.float64(0.369)}, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("fmt", ["advent", "adaptsegnet", "maxsquare"])
def test_release_format_gives_the_official_logits(fmt, tmp_path):
    folder, module, how, order = CLASSES[fmt]
    m = H.load(folder, module)
    kw = {"multi_level": True} if fmt == "advent" else {}
    theirs = H.randomize(m.ResNetMulti(m.Bottleneck, [3, 4, 6, 3], C, **kw), seed=11).eval()
    path = tmp_path / f"{fmt}.pth"
    _save(fmt, theirs, path)
    ours, cfg, used = AM.load_segmenter(path, "auto" if fmt == "maxsquare" else fmt)
    assert used.startswith(fmt) and cfg["two_branch"] == (fmt != "advent") and cfg["backbone"] == "resnet50"
    ours.eval()
    for i, (h, w) in enumerate([(65, 65), (41, 73)]):
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(20 + i)) * 50
        with torch.no_grad():
            out_t = dict(zip(order, theirs(x)))
            out_o = ours(x)
        for level in ("out", "aux"):
            o = out_o[level]
            if fmt == "maxsquare":  # its forward upsamples to the input size
                o = F.interpolate(o, size=(h, w), mode="bilinear", align_corners=True)
            H.compare(f"{fmt} release through releases.py: {level} logits {h}x{w}", o, out_t[level],
                      official=f"{module.replace('.', '/')}.py:ResNetMulti.forward", note=how)
