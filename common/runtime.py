"""Training plumbing shared by every script: devices and torchrun, mixed precision, seeding, the run
folder, JSON-lines logging, poly learning rate, and atomic full-state checkpoints.
No method-specific choice lives here."""
import contextlib
import datetime
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# ------------------------------------------------------------------------------------------------
# Devices, torchrun
# ------------------------------------------------------------------------------------------------


def setup_distributed(device_arg="auto"):
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Returns (rank, world_size, device).
    One process without torchrun: (0, 1, device). gloo on CPU, nccl on CUDA."""
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if want_cuda:
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        return rank, world, device
    return 0, 1, torch.device("cuda" if want_cuda else device_arg if device_arg != "auto" else "cpu")


def is_main(rank):
    return rank == 0


def wrap_ddp(model, device, world_size, find_unused=False, compile_model=False):
    """The module the training loop calls: DDP under torchrun, optionally torch.compile'd (--compile).
    Checkpoints keep saving the bare `model` (its state_dict keys carry no wrapper prefix)."""
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)
    return torch.compile(model) if compile_model else model


def unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if hasattr(model, "module") else model


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Mixed precision (--amp {auto,bf16,fp16,off})
# ------------------------------------------------------------------------------------------------
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def cpu_has_fast_bf16():
    """True where the CPU has native bf16 matmul units (AVX512-BF16 or AMX), so autocast pays off."""
    cpu = getattr(torch.backends, "cpu", None)
    isa = cpu.get_cpu_capability() if cpu is not None else ""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or bf16) and "AVX512" in isa.upper()


def amp_dtype(mode, device):
    """The autocast dtype for a --amp choice on a device, or None for fp32. auto = bf16 where the
    device runs it natively (CUDA with bf16 support; CPUs with AVX512-BF16/AMX), otherwise off."""
    device = torch.device(device)
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if mode != "auto":
        raise ValueError(f"--amp must be one of {AMP_CHOICES}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def autocast(device, dtype):
    """Autocast context for the forward pass and the losses (a no-op when dtype is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device, dtype):
    """A GradScaler only where fp16 needs one (CUDA fp16); otherwise a disabled one."""
    return torch.amp.GradScaler(torch.device(device).type,
                                enabled=(dtype == torch.float16 and torch.device(device).type == "cuda"))


def memory_format(dtype):
    """channels_last goes with autocast (that is where the fast kernels are); fp32 stays contiguous."""
    return torch.channels_last if dtype is not None else torch.contiguous_format


def to_device(x, device, dtype_amp=None):
    """Move an input batch to the device, in channels_last when autocast is on (4-D tensors only)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=memory_format(dtype_amp)) if x.dim() == 4 else x


# ------------------------------------------------------------------------------------------------
# Seeding, learning rate
# ------------------------------------------------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def poly_lr(base_lr, it, max_iters, power=0.9):
    """DeepLab's poly schedule: base_lr * (1 - it / max_iters) ** power."""
    return base_lr * (1 - it / max_iters) ** power


def set_lr(optimizer, lr):
    """Set every param group to lr * its 'lr_mult' (heads carry lr_mult 10). Returns lr."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


def sgd_10x(model, lr, momentum=0.9, weight_decay=5e-4):
    """SGD with the backbone at lr and the heads at 10x lr (DeepLab practice). Frozen params skipped."""
    backbone, heads = model.param_groups()
    groups = [{"params": [p for p in backbone if p.requires_grad], "lr": lr, "lr_mult": 1.0},
              {"params": [p for p in heads if p.requires_grad], "lr": 10 * lr, "lr_mult": 10.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def freeze_bn_affine(model):
    """AdaptSegNet/ADVENT's frozen BN: affine parameters not trained (running stats still update
    in train mode, as upstream)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Run folder, logging
# ------------------------------------------------------------------------------------------------
RESULT_FILES = ("checkpoint.pth", "final.json", "log.jsonl")


def prepare_run_dir(out, args, rank=0, resume=False):
    """Create the run folder and save the effective configuration. A folder that already holds
    results is never overwritten: unless resuming, it is moved aside to OUT.old-<time> (printed)."""
    out = Path(out)
    if rank == 0:
        if out.exists() and not resume and any((out / f).exists() for f in RESULT_FILES):
            aside = out.with_name(out.name + ".old-" + time.strftime("%Y%m%d-%H%M%S"))
            shutil.move(str(out), str(aside))
            print(f"[run] {out} held results from an earlier run: moved to {aside}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        cfg["argv"] = sys.argv
        atomic_write_text(out / "config.json", json.dumps(cfg, indent=2))
    barrier()
    return out


def atomic_write_text(path, text):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunLogger:
    """Rank-0 logging: a JSON line per record in OUT/log.jsonl, a short printed line, and TensorBoard
    scalars when the `tensorboard` package is installed and --tensorboard is given."""

    def __init__(self, out, rank=0, tensorboard=False):
        self.on = rank == 0
        self.path = Path(out) / "log.jsonl"
        self.tb = None
        if self.on and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out) / "tb"))
            except Exception as e:  # optional dependency
                print(f"[run] TensorBoard unavailable ({e}); logging to {self.path} only")

    def log(self, record, echo=True):
        if not self.on:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "iter" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("iter", "time"):
                    self.tb.add_scalar(k, v, record["iter"])
        if echo:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items() if k != "time" and not isinstance(v, dict)), flush=True)


def print_config(args, rank=0):
    if rank == 0:
        print("[config] " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()), flush=True)


# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic, full state, loadable with weights_only=True
# ------------------------------------------------------------------------------------------------


def rng_state():
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[1][-1]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **state):
    """torch.save to a temporary file, then rename: an interrupted save never leaves a broken file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None


def save_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2))
