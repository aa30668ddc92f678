"""--amp: autocast is really active where asked, inputs/models go channels_last, and the losses and softmax
statistics come out in fp32 whatever the autocast dtype."""
import torch

from common import runtime as rt
from common.losses import cross_entropy, entropy_map, ohem_cross_entropy, self_information
from common.models import DeepLabV2


def test_amp_choices():
    cpu = torch.device("cpu")
    assert rt.amp_dtype("off", cpu) is None
    assert rt.amp_dtype("bf16", cpu) is torch.bfloat16 and rt.amp_dtype("fp16", cpu) is torch.float16
    assert rt.amp_dtype("auto", cpu) is (torch.bfloat16 if rt.cpu_has_fast_bf16() else None)
    assert not rt.grad_scaler(cpu, torch.bfloat16).is_enabled()  # a scaler only for CUDA fp16
    assert rt.memory_format(torch.bfloat16) is torch.channels_last and rt.memory_format(None) is torch.contiguous_format


def test_autocast_is_active_and_losses_stay_fp32():
    amp = torch.bfloat16
    model = DeepLabV2(19, "resnet18").to(memory_format=rt.memory_format(amp))
    seen = {}
    model.backbone.layer2.register_forward_hook(lambda m, i, o: seen.update(layer2=o))  # returns None
    x = rt.to_device(torch.randn(2, 3, 32, 64), torch.device("cpu"), amp)
    assert x.is_contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 19, (2, 32, 64))
    with rt.autocast("cpu", amp):
        out = model(x)
        logits = torch.nn.functional.interpolate(out["out"], size=(32, 64), mode="bilinear", align_corners=True)
        assert seen["layer2"].dtype == torch.bfloat16 and out["out"].dtype == torch.bfloat16
        for loss in (cross_entropy(logits, y), ohem_cross_entropy(logits, y, 0.7, 100),
                     entropy_map(logits), self_information(torch.softmax(logits, 1))):
            assert loss.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    with rt.autocast("cpu", None):
        assert model(x.float())["out"].dtype == torch.float32


def _load(folder, name):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location(f"amp_{folder}_{name}", ROOT / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_method_statistics_are_fp32_under_bf16_autocast():
    """The issue's list: entropy and MaxSquare losses, GMM/region features, anchor distances, TUFL's focal
    loss: computed in fp32 from bf16 network outputs, inside an active bf16 autocast region."""
    ms = _load("advent_maxsquare", "train_maxsquare")
    mada_core = _load("mada", "core")
    d2_regions = _load("d2ada", "regions")
    ss_losses = _load("ssada", "losses")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 8, 12, generator=g).bfloat16()
    feat = torch.randn(2, 16, 8, 12, generator=g).bfloat16()
    with rt.autocast("cpu", torch.bfloat16):
        assert torch.mm(torch.randn(4, 4), torch.randn(4, 4)).dtype == torch.bfloat16  # autocast is on
        for name in ("maxsquare", "iw_maxsquare", "entropy"):
            assert ms.target_loss(name, logits, 0.2).dtype == torch.float32, name
        vec, counts = mada_core.objective_vectors(feat, logits, logits.argmax(1), 19, min_pixels=1)
        anchors = torch.randn(3, 19, 16, generator=g)
        assert vec.dtype == torch.float32
        assert mada_core.anchor_distances(vec, counts >= 1, anchors).dtype == torch.float32
        loss, *_ = mada_core.batch_anchor_loss(feat, logits, anchors, 19, min_pixels=1)
        assert loss.dtype == torch.float32
        sp = torch.randint(0, 5, (16, 24), generator=g)
        st = d2_regions.region_stats(feat[0], logits[0], sp)
        assert st["feat"].dtype == st["prob"].dtype == st["entropy"].dtype == torch.float32
        fl, _ = ss_losses.unsup_focal_loss(logits, logits.flip(0), thresh=0.5)
        assert fl.dtype == torch.float32


def test_compile_flag_wraps_the_training_forward_only():
    """--compile: the loop calls a torch.compile'd module (lazily compiled at its first call, so nothing
    is compiled here); unwrap() returns the bare model, whose state_dict keys carry no wrapper prefix."""
    from common import cli
    import argparse
    p = argparse.ArgumentParser()
    cli.add_common_args(p)
    assert p.parse_args([]).compile is False and p.parse_args(["--compile"]).compile is True
    model = DeepLabV2(19, "resnet18")
    fwd = rt.wrap_ddp(model, torch.device("cpu"), 1, compile_model=True)
    assert fwd is not model and rt.unwrap(fwd) is model
    assert list(fwd.state_dict())[0].startswith("_orig_mod.") and not list(model.state_dict())[0].startswith("_orig")
    assert rt.wrap_ddp(model, torch.device("cpu"), 1) is model
