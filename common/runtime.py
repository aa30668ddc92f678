"""Training plumbing shared by every script: devices and torchrun, mixed precision, seeding, the run
folder, JSON-lines logging, poly learning rate, atomic full-state checkpoints, and the peak-memory probe of
the benchmark commands.
No method-specific choice lives here."""
import contextlib
import datetime
import json
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
import zipfile
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


def last_quarter(pairs, total):
    """Mean of the logged (iter, value) pairs in the last quarter of a `total`-iteration schedule (the
    diagnostics final.json reports, e.g. the discriminator's accuracy at the end); None when there are none."""
    vals = [v for i, v in pairs if i >= 0.75 * total]
    return round(sum(vals) / len(vals), 4) if vals else None


def poly_lr(base_lr, it, max_iters, power=0.9):
    """DeepLab's poly schedule: base_lr * (1 - it / max_iters) ** power."""
    return base_lr * (1 - it / max_iters) ** power


def set_lr(optimizer, lr):
    """Set every param group to lr * its 'lr_mult' (heads carry lr_mult 10). Returns lr."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


def sgd_10x(model, lr, momentum=0.9, weight_decay=5e-4, released_repeats=False):
    """SGD with the backbone at lr and the heads at 10x lr (DeepLab practice). Frozen params skipped.
    released_repeats: the backbone group as AdaptSegNet, ADVENT, MaxSquare and Adversarial_DA_Exp build it
    (get_1x_lr_params_NOscale: `for j in b[i].modules(): for k in j.parameters()` over conv1, bn1, layer1-4), i.e.
    each weight once per enclosing module (stem conv1 once, a block's weights 3x, a downsample's 4x), and SGD steps
    it once per occurrence: a 3-4x larger backbone step than the stated lr (advent_maxsquare README, deviation 17)."""
    backbone, heads = model.param_groups()
    if released_repeats:
        b = model.backbone
        backbone = [p for top in (b.conv1, b.bn1, b.layer1, b.layer2, b.layer3, b.layer4)
                    for m in top.modules() for p in m.parameters()]
        import warnings
        with warnings.catch_warnings():  # the duplicates are the point here (torch warns about them)
            warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
            return torch.optim.SGD([{"params": [p for p in backbone if p.requires_grad], "lr": lr, "lr_mult": 1.0},
                                    {"params": [p for p in heads if p.requires_grad], "lr": 10 * lr, "lr_mult": 10.0}],
                                   lr=lr, momentum=momentum, weight_decay=weight_decay)
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
# The flags that fix a model's architecture: a --resume must repeat them as the run folder recorded them.
MODEL_KEYS = ("model", "backbone", "num_classes", "multi", "two_branch", "init_format", "init_from")


class InputError(RuntimeError):
    """Bad input (a flag, a dataset, a checkpoint): run_main prints it as one line, no traceback."""


def check_inputs(out, args, resume=False):
    """Everything a run needs, checked before the run folder is touched: --resume has a checkpoint whose
    model configuration matches this command; every checkpoint named by a flag is readable; every
    dataset named by --source/--target is complete (common.datasets.check_domain)."""
    out = Path(out)
    if resume:
        found = sorted(out.glob("checkpoint*.pth"))
        if not found:
            raise InputError(f"--resume: no checkpoint to resume from in {out} (looked for {out / 'checkpoint.pth'}); "
                             f"run without --resume to start from iteration 0")
        old = {}
        if (out / "config.json").is_file():
            try:
                old = json.loads((out / "config.json").read_text())
            except ValueError:
                old = {}
        ck_path = out / "checkpoint.pth" if (out / "checkpoint.pth").exists() else found[-1]
        ck_cfg = read_checkpoint(ck_path, "a resumable checkpoint").get("config") or {}
        new = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        diff = [f"--{k.replace('_', '-')} {old[k]} (checkpoint) vs {new[k]} (this command)"
                for k in MODEL_KEYS if k in old and k in new and new[k] is not None and old[k] != new[k]]
        diff += [f"{k} {ck_cfg[k]} (checkpoint) vs {new[k]} (this command)" for k in ("model", "backbone", "num_classes")
                 if k in ck_cfg and new.get(k) is not None and ck_cfg[k] != new[k] and not any(d.startswith(f"--{k} ")
                                                                                               for d in diff)]
        if diff:
            raise InputError(f"cannot resume from {ck_path}: its model configuration differs in " + "; ".join(diff)
                             + f". Nothing in {out} was changed: repeat the run's flags, or start a new --out")
    for flag in ("init", "init_from", "checkpoint", "ensemble"):
        path = getattr(args, flag, None)
        if path in (None, "", "scratch") or not isinstance(path, (str, Path)):
            continue
        what = "backbone weights (a state dict)" if flag == "init" else "a checkpoint of this project"
        ck = read_checkpoint(path, what, numpy_scalars=True)  # official releases hold numpy numbers (MaxSquare's)
        cfg = ck.get("config") if isinstance(ck.get("config"), dict) else {}
        n = getattr(args, "num_classes", None)
        if flag != "init" and n is not None and cfg.get("num_classes") not in (None, n):
            raise InputError(f"{path} holds a {cfg['num_classes']}-class {cfg.get('model', 'model')}; this run "
                             f"expects {n} classes (--num-classes {n})")
    from .datasets import check_domain  # noqa: E402 (datasets imports nothing of runtime)
    n = getattr(args, "num_classes", None)
    for role in ("source", "target"):
        names, roots = getattr(args, role, None), getattr(args, role + "_root", None)
        if not isinstance(names, str):
            continue
        names = [x for x in names.split(",") if x]
        roots = [x for x in str(roots).split(",")] if roots else [None] * len(names)
        for name, root in zip(names, roots + [None] * (len(names) - len(roots))):
            check_domain(name, root, role, n)


def prepare_run_dir(out, args, rank=0, resume=False):
    """Check the inputs (check_inputs), then create the run folder and save the effective configuration.
    A folder that already holds results is never overwritten: unless resuming, it is moved aside to
    OUT.old-<time> (printed). Prints the [config] line."""
    out = Path(out)
    check_inputs(out, args, resume)
    if rank == 0:
        if out.exists() and not resume and any((out / f).exists() for f in RESULT_FILES):
            aside = out.with_name(out.name + ".old-" + time.strftime("%Y%m%d-%H%M%S"))
            shutil.move(str(out), str(aside))
            print(f"[run] {out} held results from an earlier run: moved to {aside}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        cfg["argv"] = sys.argv
        atomic_write_text(out / "config.json", json.dumps(cfg, indent=2))
    print_config(args, rank)
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


_PRINTED = []


def print_config(args, rank=0):
    """The effective configuration as one [config] line (printed once per process)."""
    if rank == 0 and not _PRINTED:
        _PRINTED.append(True)
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


class CheckpointError(InputError):
    pass


def _what_is(path, head):
    """A few words on what a file that is not a PyTorch checkpoint looks like."""
    try:
        text = head.decode("utf-8")
        return f"a text file (starts {text[:24].strip()!r})" if text.isprintable() or "\n" in text else "binary data"
    except UnicodeDecodeError:
        return "binary data, not a PyTorch file"


def read_checkpoint(path, what="a checkpoint", need=(), numpy_scalars=False):
    """THE checkpoint reader of every script: torch.load(weights_only=True) on CPU, every failure a one-line
    CheckpointError naming the file, what it is, and what was expected (need: entries that must be there).
    numpy_scalars: also admit numpy numbers and arrays of numbers (officially released checkpoints hold some, e.g.
    MaxSquare's best mIoU): common.safe_pickle's allow-list, the one of the project; still weights_only, no code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected {what})")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a file holding {what}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; an interrupted copy?); expected {what}")
    with open(path, "rb") as f:
        head = f.read(64)
    is_zip, is_pickle = head[:4] == b"PK\x03\x04", head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_what_is(path, head)}, {size} bytes); "
                              f"expected {what}")
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt (an incomplete PyTorch archive of {size} bytes); "
                              f"expected {what}")
    try:
        from .safe_pickle import numpy_globals  # (imports this module: imported here, not at the top)
        with torch.serialization.safe_globals(numpy_globals() if numpy_scalars else []):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle_errors() as e:
        kind = ("holds pickled Python objects beyond tensors and plain containers (not a file this project writes; "
                "it is never unpickled)") if "weights_only" in str(e) or "Unsupported" in str(e) else \
            f"is truncated or corrupt ({type(e).__name__})"
        raise CheckpointError(f"{path} {kind}; expected {what}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors; expected {what}")
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{path} has no {' / '.join(repr(k) for k in missing)} entr"
                              f"{'y' if len(missing) == 1 else 'ies'} (it holds {', '.join(map(repr, list(state)[:5]))}"
                              f"{', ...' if len(state) > 5 else ''}); expected {what}")
    return state


def pickle_errors():
    import pickle
    return (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError, AttributeError,
            IndexError, TypeError, zipfile.BadZipFile)


def load_checkpoint(path):
    """A resumable checkpoint of ours (read_checkpoint: every failure names the file)."""
    return read_checkpoint(path, "a checkpoint of this project")


# ------------------------------------------------------------------------------------------------
# Running a script: one-line errors for bad input; Ctrl-C / SIGTERM stop cleanly with the resume command
# ------------------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    pass


_STOP = []  # exit code of the stop signal received (130 Ctrl-C, 143 SIGTERM), set by the handlers below


def _ignore_signal(signum, frame):
    pass


def _stopping(code):
    _STOP.append(code)
    # The same signal ends the DataLoader workers (one process group), and torch's SIGCHLD handler then raises
    # "DataLoader worker (pid N) is killed by signal" wherever the main process is, e.g. inside run_main's stop
    # report (a traceback after the [stopped] line, seen about once in 30 stops): we are stopping, so the
    # children may end quietly. Set here, before any unwinding: Python runs the pending SIGINT/SIGTERM handler
    # before the SIGCHLD one, which then finds this no-op (not SIG_DFL: a signal already pending when its
    # handler becomes SIG_DFL/SIG_IGN prints "OSError: Signal 17 ignored due to race condition").
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, _ignore_signal)


def _on_sigterm(signum, frame):
    _stopping(143)
    raise Terminated()


def _on_sigint(signum, frame):
    _stopping(130)
    raise KeyboardInterrupt()


def last_checkpoint(out):
    """(path, iteration) of the newest checkpoint*.pth in a run folder, else in its subfolders (a script that
    trains one run per subfolder, as madan/train_classifiers.py), or (None, None)."""
    found = sorted(Path(out).glob("checkpoint*.pth"), key=lambda p: p.stat().st_mtime) if out else []
    if out and not found:
        found = sorted(Path(out).glob("*/checkpoint*.pth"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None, None
    try:
        state = torch.load(found[-1], map_location="cpu", weights_only=True, mmap=True)
        return found[-1], state.get("iter", state.get("round"))
    except Exception:
        return found[-1], None


def resume_command(argv=None):
    """The command that continues this run: the same python command line, with --resume."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(argv[0]) if os.path.isabs(argv[0]) and not os.path.relpath(argv[0]).startswith("..") \
        else argv[0]
    rest = argv[1:] + ([] if "--resume" in argv else ["--resume"])
    return shlex.join(["python", script] + rest)


def run_main(main, parse_args, on_stop=None):
    """`if __name__ == "__main__": rt.run_main(main, parse_args)`: bad input (InputError, a dataset layout
    error) ends with one `error:` line and exit 2; Ctrl-C (exit 130) and SIGTERM (exit 143) stop the run
    and print one line with the last checkpoint's iteration and the exact command that resumes it, or
    `on_stop` (what to do instead, for a script that continues by itself when run again: a pipeline)."""
    from .datasets import DatasetError, DatasetLayoutError
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, _on_sigint)
    args = None
    try:
        args = parse_args()
        main(args)
    except BaseException as e:
        # A signal to the whole process group (Ctrl-C in a terminal, the benchmark's stop) also reaches the
        # DataLoader workers; what then surfaces may be torch's "DataLoader worker ... killed" RuntimeError
        # rather than our KeyboardInterrupt: once a stop signal has arrived, any exception is that stop.
        if not (_STOP or isinstance(e, KeyboardInterrupt)):
            if isinstance(e, (InputError, DatasetLayoutError, DatasetError)):
                print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
                sys.exit(2)
            raise
        code = _STOP[0] if _STOP else (143 if isinstance(e, Terminated) else 130)
        sig = "SIGTERM" if code == 143 else "Ctrl-C"
        if hasattr(signal, "SIGCHLD"):  # (also for a KeyboardInterrupt that did not come through _stopping)
            signal.signal(signal.SIGCHLD, _ignore_signal)
        signal.signal(signal.SIGINT, _ignore_signal)  # a second Ctrl-C / SIGTERM no longer interrupts the report
        signal.signal(signal.SIGTERM, _ignore_signal)
        if int(os.environ.get("RANK", 0)) == 0:
            out = getattr(args, "out", None)
            if on_stop is not None:
                msg = on_stop
            elif args is None or not hasattr(args, "resume"):
                msg = "this script keeps no checkpoint: run the same command again"
            else:
                path, it = last_checkpoint(out)
                msg = (f"no checkpoint was written yet: run the same command again (without --resume)" if path is None
                       else f"last checkpoint {path} at iteration {it}; resume with: {resume_command()}")
            print(f"\n[stopped] {sig}: {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)  # no traceback, no waiting on data-loader workers or process groups


def save_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2))


class PeakMemory:
    """Peak memory above the starting point while the block runs, in bytes (`.peak`): CUDA, the allocator's
    max_memory_allocated; CPU, the resident size sampled every 2 ms. For the benchmark commands
    (benchmark/perf.py, ssada/bench_forward.py)."""

    def __init__(self, device):
        self.device, self.peak = torch.device(device), 0

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self.stop = self.rss(), False

        def watch():
            while not self.stop:
                self.peak = max(self.peak, self.rss() - self.base)
                time.sleep(0.002)
        self.t = threading.Thread(target=watch, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.t.join()
