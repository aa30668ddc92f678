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


@pytest.mark.parametrize("repo,depth", [("MADA", "resnet50"), ("MADAv2", "resnet50"), ("MADA", "resnet101")])
def test_mada_release_gives_the_official_logits(repo, depth, tmp_path, monkeypatch):
    """mada/releases.py against MADA's / MADAv2's own DeepLab (models/deeplab.py, bn='bn', output stride 16): a
    randomised upstream network saved as train_active_stage1.py saves it ({'DeepLab': {'model_state', ...}, 'iter',
    'best_iou' numpy}, torch's legacy format) and read back through our converter (strict) gives upstream's logits
    and decoder feature (cls_feat, what the objective vectors and the anchor loss read) at two sizes; the input
    normalisation our config names ('unit') is upstream's dataset transform (RGB / 255, mean 0). ResNet-101 reads
    ImageNet weights from the authors' disk when built (models/backbone/resnet.py:152-163): that read is skipped, the
    weights are random anyway."""
    from mada import releases as MR
    from common.transforms import to_tensor
    from PIL import Image
    with H.upstream(repo):
        m = __import__("models.deeplab", fromlist=["DeepLab"])
        rn = __import__("models.backbone.resnet", fromlist=["ResNet"])
        monkeypatch.setattr(rn.ResNet, "_load_pretrained_model", lambda self: None)
        theirs = H.randomize(m.DeepLab(backbone=depth, output_stride=16, num_classes=C, bn="bn"), seed=21).eval()
        ds = __import__("data.cityscapes_dataset", fromlist=["Cityscapes_loader"])
    f = tmp_path / "from_gta5_to_cityscapes_on_deeplab101_best_model_stage1.pkl"
    torch.save({"DeepLab": {"model_state": theirs.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
                            "scheduler_state": {"last_epoch": 3}}, "iter": 4, "best_iou": np.float64(0.5)}, f,
               _use_new_zipfile_serialization=False)
    ours, cfg, how = MR.load_segmenter(f)
    assert how.startswith("mada") and cfg["backbone"] == depth and cfg["norm"] == "unit"
    ours.eval()
    off = f"{repo} models/deeplab.py:DeepLab.forward"
    for i, (h, w) in enumerate([(65, 97), (48, 80)]):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(30 + i))
        with torch.no_grad():
            _, _, feat_t, out_t = theirs(x)
            o = ours(x, return_feat=True)
        H.compare(f"{repo} {depth} release through mada/releases.py: logits {h}x{w}", o["out"], out_t, official=off,
                  note=how)
        H.compare(f"{repo} {depth} release through mada/releases.py: decoder feature (cls_feat) {h}x{w}", o["feat"],
                  feat_t, official=off)
    # the input: upstream's Cityscapes_loader.transform (img - mean 0, / 255 with img_norm) == to_tensor(., 'unit')
    img = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    loader = ds.Cityscapes_loader.__new__(ds.Cityscapes_loader)
    loader.mean, loader.img_norm, loader.n_classes, loader.ignore_index = np.array([0.0, 0.0, 0.0]), True, C, 250
    loader.img_size = (6, 10)
    x_t, _ = loader.transform(Image.fromarray(img), Image.fromarray(np.zeros((6, 10), np.uint8)))
    H.compare(f"{repo} input normalisation: to_tensor(img, 'unit') vs Cityscapes_loader.transform",
              to_tensor(Image.fromarray(img), "unit"), torch.as_tensor(np.asarray(x_t), dtype=torch.float32),
              official=f"{repo} data/cityscapes_dataset.py:Cityscapes_loader.transform")
