"""Failure handling, through the scripts as a user runs them (subprocess, tiny budgets): inputs are checked
before the run folder is touched, --resume refuses what it cannot continue, every unreadable checkpoint is a
one-line error naming the file, Ctrl-C / SIGTERM stop with the resume command, a stop past the schedule is
clamped, and a default run keeps only its checkpoint and final model."""
import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, TEST_DEVICE, EXACT, run_script

SRC = "advent_maxsquare/train_source.py"
TINY = ["--iters", "2", "--batch-size", "2", "--eval-every", "2", "--save-every", "2", "--workers", "0"]


def roots(tiny):
    return ["--source-root", tiny / "toy_gta5", "--target-root", tiny / "toy_cityscapes"]


def error_line(p):
    """The script's stderr must be exactly one `script: error: ...` line (no traceback)."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "weights_only=False" not in p.stderr, p.stderr
    assert len(lines) == 1 and ": error: " in lines[0], p.stderr
    return lines[0]


def snapshot(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(Path(folder).rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_toy):
    """A finished tiny train_source run (2 iterations), default flags otherwise."""
    out = tmp_path_factory.mktemp("failures") / "run"
    p = run_script(SRC, *TINY, *roots(tiny_toy), "--out", out)
    assert "[done]" in p.stdout
    return out


def test_default_run_keeps_checkpoint_and_final_model_only(finished_run):
    names = {f.name for f in finished_run.iterdir()}
    assert {"checkpoint.pth", "model.pth", "final.json", "config.json", "log.jsonl"} <= names
    assert "best_model.pth" not in names and "snapshots" not in names  # by --keep-snapshots only


def _broken_source(tiny, tmp_path, kind):
    """A copy (symlinks) of the tiny toy source with half its labels missing, or one label of another size."""
    src, dst = tiny / "toy_gta5", tmp_path / f"gta5_{kind}"
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).symlink_to(f.resolve())
    names = (dst / "lists" / "train.txt").read_text().split()
    if kind == "missing":
        for n in names[::2]:
            (dst / "labels" / n).unlink()
        return dst, f"{len(names[::2])} of {len(names)}", str(dst / "labels" / names[0])
    lbl = dst / "labels" / names[1]
    h, w = Image.open(lbl).size[::-1]
    lbl.unlink()
    Image.new("L", (w + 4, h)).save(lbl)
    return dst, f"image {dst / 'images' / names[1]} is {h}x{w} but label {lbl} is {h}x{w + 4}", str(lbl)


@pytest.mark.parametrize("kind", ["missing", "size"])
def test_bad_dataset_fails_before_the_run_folder_is_touched(finished_run, tiny_toy, tmp_path, kind):
    root, expect, named = _broken_source(tiny_toy, tmp_path, kind)
    before = snapshot(finished_run)
    p = run_script(SRC, *TINY, "--source-root", root, "--target-root", tiny_toy / "toy_cityscapes",
                   "--out", finished_run, check=False)
    line = error_line(p)
    assert expect in line and named in line and "source dataset toy_gta5" in line, line
    assert snapshot(finished_run) == before  # not moved aside, config.json not rewritten
    assert not list(finished_run.parent.glob("run.old-*"))


def test_resume_without_checkpoint_says_where_it_looked(tmp_path, tiny_toy):
    out = tmp_path / "nothing"
    p = run_script(SRC, *TINY, *roots(tiny_toy), "--resume", "--out", out, check=False)
    line = error_line(p)
    assert f"no checkpoint to resume from in {out} (looked for {out / 'checkpoint.pth'})" in line, line
    assert not out.exists()


def test_resume_with_another_model_changes_nothing(finished_run, tiny_toy):
    before = snapshot(finished_run)
    p = run_script(SRC, *TINY, *roots(tiny_toy), "--backbone", "resnet34", "--resume", "--out", finished_run,
                   check=False)
    line = error_line(p)
    assert f"cannot resume from {finished_run / 'checkpoint.pth'}" in line, line
    assert "--backbone resnet18 (checkpoint) vs resnet34 (this command)" in line, line
    assert snapshot(finished_run) == before


def _bad_checkpoints(model_pth, d):
    """name -> (path, words the error must contain)."""
    d.mkdir()
    data = model_pth.read_bytes()
    (d / "empty.pth").write_bytes(b"")
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "random.pth").write_bytes(b"\x13" + os.urandom(4095))  # not a pickle/zip magic byte
    (d / "text.pth").write_text("epoch 10, loss 0.3\n" * 20)
    torch.save([1, 2, 3], d / "list.pth")
    state = torch.load(model_pth, map_location="cpu", weights_only=True)
    torch.save({"model": state["model"]}, d / "noconfig.pth")
    torch.save({"model": {"conv.weight": torch.zeros(1)}, "config": {"model": "bisenetv1", "num_classes": 19}},
               d / "bisenet.pth")
    torch.save({"model": {"conv.weight": torch.zeros(1)}, "config": {**state["config"]}}, d / "wrongkeys.pth")
    return {"empty": (d / "empty.pth", "is empty (0 bytes"),
            "truncated": (d / "truncated.pth", "is truncated or corrupt"),
            "random": (d / "random.pth", "is not a PyTorch checkpoint (binary data"),
            "text": (d / "text.pth", "is not a PyTorch checkpoint (a text file (starts 'epoch 10"),
            "list": (d / "list.pth", "holds a list, not a dict of tensors"),
            "noconfig": (d / "noconfig.pth", "has no 'config' entry"),
            "bisenet": (d / "bisenet.pth", "holds a bisenetv1 model, which ssada's scripts (e.g. ssada/test.py) read"),
            "wrongkeys": (d / "wrongkeys.pth", "does not match the model DeepLabV2: missing keys: backbone."),
            "missing": (d / "absent.pth", "checkpoint not found")}


SCRIPT_CASES = ("empty", "text", "bisenet", "wrongkeys")  # through test.py; the others in-process (same reader)


def test_every_bad_checkpoint_is_a_one_line_error(finished_run, tiny_toy, tmp_path):
    from common.models import segmenter_from_checkpoint
    from common.runtime import InputError
    cases = _bad_checkpoints(finished_run / "model.pth", tmp_path / "bad")
    for name, (path, words) in cases.items():
        if name in SCRIPT_CASES:
            p = run_script("advent_maxsquare/test.py", "--checkpoint", path, "--target-root",
                           tiny_toy / "toy_cityscapes", "--out", tmp_path / "ev", "--workers", "0", check=False)
            line = error_line(p)
        else:
            with pytest.raises(InputError) as e:
                segmenter_from_checkpoint(path)
            line = str(e.value)
            assert "\n" not in line and "weights_only=False" not in line, line
        assert str(path) in line and words in line, (name, line)
        if name not in ("missing", "wrongkeys", "bisenet"):
            assert "expected a segmenter checkpoint of this project" in line, (name, line)
    assert not (tmp_path / "ev").exists()


def test_init_from_with_another_class_count_is_refused_up_front(finished_run, tiny_toy, tmp_path):
    out = tmp_path / "adv"
    p = run_script("advent_maxsquare/train_advent.py", *TINY, *roots(tiny_toy), "--init-from",
                   finished_run / "model.pth", "--num-classes", "16", "--out", out, check=False)
    line = error_line(p)
    assert f"{finished_run / 'model.pth'} holds a 19-class deeplabv2; this run expects 16 classes" in line, line
    assert not out.exists()


def test_stop_past_the_schedule_is_clamped(tmp_path, tiny_toy):
    out = tmp_path / "clamp"
    p = run_script(SRC, *TINY, "--stop-iter", "50", *roots(tiny_toy), "--out", out)
    assert "[config] --stop-iter 50 is past the end of the schedule (--iters 2): stopping at 2" in p.stdout
    assert "[config] --source=" in p.stdout and "[done]" in p.stdout
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["iter"] == 2


def _interrupt(args, sig, out):
    """Start a run, wait for its first checkpoint, send sig; return (returncode, stdout, stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if TEST_DEVICE == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen([sys.executable, SRC, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoint.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    so, se = proc.communicate(timeout=120)
    return proc.returncode, so, se


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_interrupt_prints_the_resume_command_and_resume_is_exact(tmp_path, tiny_toy, sig, code, word):
    args = ["--iters", "6", "--batch-size", "2", "--eval-every", "6", "--save-every", "2", "--workers", "0",
            *roots(tiny_toy)]
    b = tmp_path / "b"
    rc, so, se = _interrupt([*args, "--out", b], sig, b)
    assert rc == code and "Traceback" not in se, (rc, se[-3000:])
    stopped = [ln for ln in se.splitlines() if ln.strip()]
    assert len(stopped) == 1 and stopped[0].startswith(f"[stopped] {word}: last checkpoint {b / 'checkpoint.pth'} "
                                                       "at iteration "), se
    it = int(re.search(r"at iteration (\d+);", stopped[0]).group(1))
    assert it == torch.load(b / "checkpoint.pth", map_location="cpu", weights_only=True)["iter"] and it % 2 == 0
    cmd = stopped[0].split("resume with: ", 1)[1]
    assert cmd == shlex.join(["python", SRC, *map(str, args), "--out", str(b), "--resume"])
    if sig != signal.SIGINT:
        return
    p = run_script(*shlex.split(cmd)[1:])  # the printed command, as the user would paste it
    assert "resumed" in p.stdout and "[done]" in p.stdout
    a = tmp_path / "a"
    run_script(SRC, *args, "--out", a)
    wa = torch.load(a / "model.pth", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "model.pth", map_location="cpu", weights_only=True)["model"]
    for k in wa if EXACT else ():
        assert torch.equal(wa[k], wb[k]), k


def test_help_texts_have_no_joined_continuation_lines():
    """A docstring's shell continuation (backslash-newline) must reach --help as written (a raw docstring),
    not join two command lines into one with a long run of spaces."""
    scripts = [p for d in ("advent_maxsquare", "mada", "d2ada", "madan", "ssada") for p in (ROOT / d).glob("*.py")]
    for path in scripts:
        src = path.read_text()
        doc = ast.get_docstring(ast.parse(src), clean=False) or ""
        written = src[: src.find('"""', src.find('"""') + 3)]
        assert written.count("\\\n") == doc.count("\\\n"), f"{path.name}: make the docstring raw (r\"\"\"...)"


def test_every_method_script_runs_under_run_main():
    """Every script of a method folder ends in `rt.run_main(main, parse_args...)`: bad input is one error line,
    Ctrl-C / SIGTERM one [stopped] line with what to do next (no traceback)."""
    missing = []
    for d in ("advent_maxsquare", "mada", "d2ada", "madan", "ssada"):
        for path in sorted((ROOT / d).glob("*.py")):
            if path.name.startswith("bench_"):  # the selection micro-benchmarks: no run, nothing to resume
                continue
            tree = ast.parse(path.read_text())
            mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
            if mains and "run_main(main, parse_args" not in ast.unparse(mains[0]):
                missing.append(f"{d}/{path.name}")
    assert not missing, missing


def test_last_checkpoint_looks_in_subfolders_only_when_the_folder_has_none(tmp_path):
    """A script that trains one run per subfolder (madan/train_classifiers.py) reports the newest of theirs."""
    from common.runtime import last_checkpoint
    assert last_checkpoint(tmp_path) == (None, None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save({"iter": 4}, tmp_path / "a" / "checkpoint.pth")
    time.sleep(0.05)
    torch.save({"iter": 2}, tmp_path / "b" / "checkpoint.pth")
    assert last_checkpoint(tmp_path) == (tmp_path / "b" / "checkpoint.pth", 2)
    torch.save({"iter": 6}, tmp_path / "checkpoint.pth")  # the folder's own checkpoint comes first
    assert last_checkpoint(tmp_path) == (tmp_path / "checkpoint.pth", 6)


def test_zero_or_negative_intervals_are_refused():
    """--eval-every 0 used to die mid-run with ZeroDivisionError after the first iteration."""
    for flag, value in (("--eval-every", "0"), ("--save-every", "-1"), ("--iters", "0"), ("--batch-size", "x")):
        p = subprocess.run([sys.executable, SRC, flag, value], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 2 and f"argument {flag}: expected a whole number >= 1" in p.stderr, (flag, p.stderr)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_stop_signal_to_the_process_group_with_loader_workers(tmp_path, tiny_toy, sig, code, word):
    """A terminal's Ctrl-C and the benchmark's stop signal the whole process group, DataLoader workers included:
    the run must still end with the one [stopped] line (it used to end in torch's 'DataLoader worker (pid N) is
    killed by signal' traceback)."""
    out = tmp_path / "g"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, SRC, "--iters", "40", "--batch-size", "2", "--eval-every", "40",
                             "--save-every", "2", "--workers", "2", *map(str, roots(tiny_toy)), "--out", str(out)],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # mid-step, workers busy
    os.killpg(proc.pid, sig)
    so, se = proc.communicate(timeout=120)
    lines = [ln for ln in se.splitlines() if ln.strip()]
    assert proc.returncode == code and "Traceback" not in se, (proc.returncode, se[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"[stopped] {word}: last checkpoint {out / 'checkpoint.pth'}"), se


def test_a_stopped_pipeline_says_the_same_command_continues(tmp_path):
    """mada/run_pipeline.py (a chain of scripts, each in a subprocess) stopped mid-step: exit 130, no traceback,
    one line saying that the same command continues (it skips finished steps and resumes a training step)."""
    out = tmp_path / "pipe"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "mada/run_pipeline.py", "--quick", "--variants", "random", "--out",
                             str(out)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "warmup" / "config.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # the pipeline's own process; it ends the running step
    so, se = proc.communicate(timeout=120)
    lines = [ln for ln in se.splitlines() if ln.strip()]
    assert proc.returncode == 130 and "Traceback" not in se, (proc.returncode, se[-3000:])
    assert lines == ["[stopped] Ctrl-C: run the same command again: finished steps are skipped and an interrupted "
                     "training step resumes from its checkpoint"], se
    assert not (out / "warmup" / "final.json").exists()


def test_a_stop_silences_the_dataloader_sigchld_handler():
    """Once a stop signal arrives, the workers' deaths (SIGCHLD) must not raise in the main process: torch's
    DataLoader handler raised 'worker killed by signal' inside the stop report, a traceback after [stopped]."""
    from common import runtime as rt

    def dataloader_like(signum, frame):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    old = signal.getsignal(signal.SIGCHLD)
    try:
        signal.signal(signal.SIGCHLD, dataloader_like)
        with pytest.raises(rt.Terminated):
            rt._on_sigterm(signal.SIGTERM, None)
        assert rt._STOP == [143]
        os.kill(os.getpid(), signal.SIGCHLD)  # a worker ends: its handler must now be a no-op
        time.sleep(0.05)
    finally:
        rt._STOP.clear()
        signal.signal(signal.SIGCHLD, old)
