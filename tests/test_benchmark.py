"""The benchmark driver's scheduler: shared steps run once and in order, failures skip only their dependents."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))

import run as bench  # noqa: E402


def _write(path, value):
    # a step: append to a log (order check), then write the pipeline's result
    return (f"{{py}} -c \"import json, pathlib, time; time.sleep(0.2); "
            f"p = pathlib.Path('{path}'); p.parent.mkdir(parents=True, exist_ok=True); "
            f"p.write_text(json.dumps({{{{'mIoU': {value}}}}}))\"")


def test_parallel_runs_shared_steps_once_in_order_and_isolates_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "MACHINE", "test machine")
    shared = "{base}/chain/first.json"
    pipes = [
        dict(name="head", method="m", labels="none", steps=[(_write(shared, 1), shared)], result=shared),
        dict(name="tail", method="m", labels="none", steps=[
            (_write(shared, 1), shared),  # shared with "head": must not run again
            ("{py} -c \"import json, pathlib; v = json.loads(pathlib.Path('{base}/chain/first.json').read_text()); "
             "pathlib.Path('{base}/chain/second.json').write_text(json.dumps({{'mIoU': v['mIoU'] + 1}}))\"",
             "{base}/chain/second.json")], result="{base}/chain/second.json"),
        dict(name="independent", method="m", labels="none", steps=[(_write("{run}/r.json", 7), "{run}/r.json")],
             result="{run}/r.json"),
        dict(name="broken", method="m", labels="none", steps=[("{py} -c \"raise SystemExit(3)\"", "{base}/b/x")],
             result="{base}/b/x"),
        dict(name="after broken", method="m", labels="none", steps=[(_write("{base}/b/y", 2), "{base}/b/y")],
             result="{base}/b/y"),
    ]
    assert bench.folders(pipes[1]) == {"chain"}
    ok = bench.run_parallel(pipes, [0, 1], tmp_path, jobs=4)
    assert not ok
    for seed in (0, 1):
        base = tmp_path / f"seed{seed}"
        assert json.loads((base / "chain/second.json").read_text())["mIoU"] == 2
        assert json.loads((base / "independent/r.json").read_text())["mIoU"] == 7
        assert not (base / "b/y").exists()  # skipped: it shares folder b with the failed pipeline
        # the shared step ran once per seed: "tail" recorded only its own second step
        assert (base / "tail/log.txt").read_text().count("$ ") == 1
        assert json.loads((base / "head/bench.json").read_text())["machine"] == "test machine"


# ---- issue 16 items 1-2: progress, where results go, --list filters -------------------------------------------
FAKE_STEP = '''
import argparse, json, pathlib, time
ap = argparse.ArgumentParser()
ap.add_argument("--out"); ap.add_argument("--iters", type=int); ap.add_argument("--miou", type=float)
ap.add_argument("--sleep", type=float, default=0.0); ap.add_argument("--workers", type=int, default=2)
a = ap.parse_args()
out = pathlib.Path(a.out); out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({"iters": a.iters, "stop_iter": a.iters, "workers": a.workers}))
with open(out / "log.jsonl", "a") as f:
    for it in range(a.iters):
        f.write(json.dumps({"time": time.time(), "iter": it, "loss": 1.0}) + "\\n"); f.flush()
        if it == 1:
            f.write(json.dumps({"time": time.time(), "iter": it + 1, "val_mIoU": a.miou}) + "\\n"); f.flush()
        time.sleep(a.sleep)
(out / "final.json").write_text(json.dumps({"mIoU": a.miou}))
'''


def _fake_rows(tmp_path, sleep=0.0):
    script = tmp_path / "fake_step.py"
    script.write_text(FAKE_STEP)
    def row(name, method, folder, miou):
        return dict(name=name, method=method, labels="none", result=f"{{base}}/{folder}/final.json", steps=[
            (f"{{py}} {script} --out {{base}}/{folder} --iters 4 --miou {miou} --sleep {sleep}",
             f"{{base}}/{folder}/final.json")])
    return [row("Fake source", "fake", "src", 10.0), row("Fake oracle", "fake", "orc", 30.0),
            row("Fake other", "other", "oth", 20.0)]


def _published(tmp_path, monkeypatch, rows):
    pub = tmp_path / "published" / "results"
    pub.parent.mkdir()
    pub.with_suffix(".json").write_text(json.dumps(rows))
    pub.with_suffix(".md").write_text("published table\n")
    monkeypatch.setattr(bench, "PUBLISHED", pub)
    return pub


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_report_on_a_fresh_tree_says_so_and_writes_nothing(tmp_path):
    import subprocess
    committed = {p.name: p.read_bytes() for p in (ROOT / "benchmark").glob("results*.*")}
    r = subprocess.run([sys.executable, "benchmark/run.py", "--report", "--out", str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "no finished row" in r.stdout and "nothing written" in r.stdout
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in (ROOT / "benchmark").glob("results*.*")} == committed


def test_a_run_writes_under_out_and_publishes_only_with_the_flag(tmp_path, monkeypatch, capsys):
    kept = {"name": "Fake other", "method": "other", "labels": "none", "n": 3, "seeds": [0, 1, 2], "mean": 5.0,
            "std": 0.0, "seconds": 60.0, "peak_mib": 1.0, "per_seed": [5.0] * 3, "machine": "m", "ref": "other",
            "toy_version": 3}
    pub = _published(tmp_path, monkeypatch, [
        {**kept, "name": "Fake source", "method": "fake", "ref": "fake", "seconds": 120.0}, kept,
        {**kept, "name": "A row no longer in the benchmark"}])
    monkeypatch.setattr(bench, "PIPELINES", _fake_rows(tmp_path))
    monkeypatch.setitem(bench.REFS, "fake", ("Fake source", "Fake oracle"))
    monkeypatch.setattr(bench, "machine", lambda: "m")  # (not importing torch keeps the test fast)
    before = _snapshot(pub.parent)
    out = tmp_path / "out"
    assert bench.main(["--methods", "fake", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # the plan: rows, seeds, steps, and the estimate from the recorded time of the one row that has one
    assert "2 rows x 1 seed(s) [0]" in text and "2 steps" in text and "estimate: ~2m00s" in text
    assert "1 row(s) have no recorded time" in text
    assert _snapshot(pub.parent) == before  # the published table is untouched without --publish
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["Fake source", "Fake oracle"]
    # every step got the benchmark's --workers (default 0: data loaded in the step's own process)
    assert json.loads((out / "seed0" / "src" / "config.json").read_text())["workers"] == 0
    assert (out / "results.md").exists() and (out / "results.png").exists()
    # --publish: the rows found in OUT replace theirs, the published row this run did not produce stays
    assert bench.main(["--report", "--publish", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kept as they were: Fake other" in text and "fewer seeds than before: Fake source (3 -> 1)" in text
    assert "dropped from the published table (no longer benchmark rows): A row no longer in the benchmark" in text
    published = json.loads(pub.with_suffix(".json").read_text())
    assert [r["name"] for r in published] == ["Fake source", "Fake oracle", "Fake other"]
    assert published[2] == {**kept, "gap_closed": None}
    assert published[0]["mean"] == 10.0 and published[1]["gap_closed"] == 1.0
    assert pub.with_suffix(".png").exists() and "| Fake oracle |" in pub.with_suffix(".md").read_text()


def test_list_honours_methods_and_only(monkeypatch, capsys):
    assert bench.main(["--list", "--methods", "mada"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    mada = [p["name"] for p in bench.PIPELINES if p["method"] == "mada" and not p.get("extra")]
    assert len(rows) == len(mada) + 1 and all("[mada]" in r for r in rows[:-1])
    assert rows[-1] == f"{len(mada)} of {len(bench.PIPELINES)} rows"
    assert not any("ablation" in r for r in rows)  # extra rows: only with --extra (or named with --only)
    assert bench.main(["--list", "--methods", "mada", "--extra"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == len([p for p in bench.PIPELINES if p["method"] == "mada"]) + 1
    assert bench.main(["--list", "--only", "Source only"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and rows[0].startswith("Source only ")


def test_progress_lines_follow_the_running_steps_log(tmp_path, monkeypatch):
    import io
    monkeypatch.setattr(bench, "MACHINE", "test machine")
    pipes = _fake_rows(tmp_path, sleep=0.4)[:1]
    stream = io.StringIO()
    progress = bench.Progress(total_steps=1, estimates={"Fake source": 3.0}, stream=stream, tty=False, interval=0.1)
    assert bench.run_parallel(pipes, [0], tmp_path / "out", jobs=1, progress=progress)
    text = stream.getvalue()
    assert "[bench] step 1 of 1: Fake source (seed 0)" in text and "[bench] done step 1 of 1" in text
    live = [ln for ln in text.splitlines() if ln.startswith("[1/1] Fake source s0 fake_step.py")]
    assert any("| it 2/4 50%" in ln for ln in live), text  # iteration / total read from log.jsonl
    assert any("| val mIoU 10.0" in ln and "| ETA " in ln for ln in live), text
    assert "[bench] step 1 of 1 | " in text and "ETA ~" in text  # the overall line
    # on a terminal the live lines are redrawn in place
    tty = io.StringIO()
    progress = bench.Progress(total_steps=1, stream=tty, tty=True)
    progress.running[("row", 0)] = {"k": 1, "t_step": 0.0, "t_pipe": 0.0, "script": "x.py", "tail": None}
    progress.refresh(force=True)
    progress.refresh(force=True)
    assert tty.getvalue().count("\x1b[2F\x1b[J") == 1 and tty.getvalue().count("[1/1] row s0 x.py") == 2


def test_schedule_length_of_each_kind_of_run():
    assert bench.schedule_length({"iters": 600, "stop_iter": 600}) == 600
    assert bench.schedule_length({"iters": 200000, "stop_iter": 80000}) == 80000
    assert bench.schedule_length({"source_iters": 300, "iters": 150, "stop_iter": None}) == 450  # TUFL
    assert bench.schedule_length({"epochs": 5, "epoch_iters": 40, "iters": None, "stop_iter": None}) == 200
    assert bench.schedule_length({"max_epoch": 4, "epoch_iters": 200, "stop_iter": None}) == 800
    assert bench.schedule_length({"epochs": 200, "epoch_iters": None, "iters": None}) is None


def test_ctrl_c_stops_the_step_keeps_finished_ones_and_exits_130(tmp_path):
    import signal
    import subprocess
    import time
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmark')!r}); import run, pathlib\n"
              f"run.machine = lambda: 'test machine'\n"
              f"rows = run.PIPELINES = {_fake_rows(tmp_path)[:1]!r}\n"
              f"rows.append(dict(rows[0], name='Slow', result='{{base}}/slow/final.json', steps=[(rows[0]['steps'][0][0]"
              f".replace('src', 'slow').replace('--sleep 0.0', '--sleep 30'), '{{base}}/slow/final.json')]))\n"
              f"sys.exit(run.main(['--out', {str(tmp_path / 'out')!r}, '--progress-every', '0.2']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log, done = tmp_path / "out/seed0/slow/log.jsonl", tmp_path / "out/seed0/src/final.json"
    for _ in range(600):  # the slow step running and the fast one (run beside it, --jobs 2) finished
        if log.exists() and done.exists():
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the runner sees the fast step's exit
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, text
    assert time.time() - t0 < 20  # the 2-minute step was stopped, not awaited
    assert "Traceback" not in text and "[bench] interrupted after" in text and "1 step(s) finished" in text, text
    assert "KeyboardInterrupt" not in text, text  # a stopped step's log tail is not shown (it is not a failure)
    assert (tmp_path / "out/seed0/src/final.json").exists() and not (tmp_path / "out/seed0/slow/final.json").exists()


def test_an_interrupted_training_step_resumes_from_its_checkpoint(tmp_path):
    cmd = f"python x/train.py --seed 0 --out {tmp_path}/run"
    assert bench.resumable(cmd) == cmd  # nothing there: start
    (tmp_path / "run").mkdir()
    (tmp_path / "run/log.jsonl").write_text("")
    assert bench.resumable(cmd) == cmd  # no checkpoint yet: start over
    (tmp_path / "run/checkpoint.pth").write_bytes(b"")
    assert bench.resumable(cmd) == cmd + " --resume"
    assert bench.resumable(cmd + " --resume") == cmd + " --resume"
    assert bench.resumable("python x/test.py --split test") == "python x/test.py --split test"


def test_the_log_reader_counts_rounds_and_restarts_the_rate_after_a_resume(tmp_path):
    run = tmp_path / "ada"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"iters": 60, "stop_iter": 60, "rounds": 5}))
    import time
    now = time.time()
    lines = [{"round": 0, "val_mIoU": 30.0}, {"time": now - 415, "round": 1, "iter": 0},
             {"time": now - 405, "round": 1, "iter": 20}, {"time": now - 15, "event": "resumed", "round": 2, "iter": 20},
             {"time": now - 5, "round": 2, "iter": 40}, {"time": now, "round": 2, "iter": 50}, '{"half": ']
    (run / "log.jsonl").write_text("\n".join(ln if isinstance(ln, str) else json.dumps(ln) for ln in lines))
    it, total, eta, val = bench.LogTail(run, since=0).poll().progress()
    assert (it, total, val) == (60 + 50, 5 * 60, 30.0)  # round 2, iteration 50 of 5 rounds x 60
    # 0.5 s / iteration since the resume, not 3.8 s / iteration across the pause before it
    assert eta is not None and (300 - 110) * 0.5 - 30 < eta <= (300 - 110) * 0.5


def test_selection_histogram_matches_a_direct_count(tmp_path, tiny_toy):
    """benchmark/selection_histogram.py: the class shares of a MADA-style selection and of the target split,
    against a direct count over the label files."""
    root = tiny_toy / "toy_cityscapes"
    imgs = sorted(str(p.relative_to(root)) for p in (root / "leftImg8bit" / "train").rglob("*.png"))
    sel = tmp_path / "out" / "seed0" / "mada" / "select_x"
    sel.mkdir(parents=True)
    (sel / "selected.json").write_text(json.dumps({"root": str(root)}))
    (sel / "selected.txt").write_text("\n".join(imgs[:2]) + "\n")
    p = subprocess.run([sys.executable, "benchmark/selection_histogram.py", "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    from conftest import class_share
    tgt, picked = 100 * class_share(root, imgs), 100 * class_share(root, imgs[:2])
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("| road |"))
    assert "x (n=1)" in p.stdout
    assert [float(v) for v in row.split("|")[2:4]] == [round(tgt[0], 2), round(picked[0], 2)], row


def test_rows_are_paired_with_their_control_seed_by_seed(tmp_path, monkeypatch, capsys):
    rows = _fake_rows(tmp_path)
    rows[1]["control"] = "Fake source"  # oracle (30) minus source (10) at each seed
    rows[0]["control"] = "Fake oracle"  # a control listed after its row counts too
    monkeypatch.setattr(bench, "PIPELINES", rows)
    monkeypatch.setattr(bench, "machine", lambda: "m")
    out = tmp_path / "out"
    assert bench.main(["--methods", "fake", "--seeds", "0", "1", "--out", str(out)]) == 0
    table = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    vc = table["Fake oracle"]["vs_control"]
    assert vc["control"] == "Fake source" and vc["seeds"] == [0, 1] and vc["per_seed"] == [20.0, 20.0]
    assert table["Fake source"]["vs_control"]["per_seed"] == [-20.0, -20.0]
    md = (out / "results.md").read_text()
    assert "+20.0 (+20.0, +20.0) vs [c2]" in md and "[c2] Fake source" in md and "[c1] Fake oracle" in md
    assert json.loads((out / "seed0" / "fake_oracle" / "bench.json").read_text())["toy_version"] == 3


def test_every_step_that_loads_images_takes_the_workers_flag(capsys):
    """run.py gives every step `--workers N` unless its script is in NO_LOADER: each such script must accept the
    flag (its --help lists it), and a NO_LOADER script must not (else it would silently keep its own default)."""
    import importlib
    import re as _re
    scripts = sorted({m for p in bench.PIPELINES for cmd, _ in p["steps"]
                      for m in _re.findall(r"\{py\} (\S+\.py)", cmd)})
    assert len(scripts) > 15 and set(bench.NO_LOADER) <= set(scripts)
    for script in scripts:
        mod = importlib.import_module(script[:-3].replace("/", "."))
        with pytest.raises(SystemExit):
            mod.parse_args(["--help"])
        takes = "--workers" in capsys.readouterr().out
        assert takes == (script not in bench.NO_LOADER), script
    assert bench.with_workers("{py} mada/test.py --out x", 0).endswith("--out x --workers 0")
    assert bench.with_workers("{py} mada/select_active.py --out x", 0) == "{py} mada/select_active.py --out x"
    assert bench.with_workers("{py} mada/test.py --workers 3", 0) == "{py} mada/test.py --workers 3"


# ---- issue 28: budget curves (--budget-scale, --eval-split val) ------------------------------------------------
def test_budget_variant_scales_the_training_steps_renames_their_folders_and_pairs_controls():
    k = 4
    by_name = {p["name"]: p for p in bench.budget_variant(bench.PIPELINES, k, "val")}
    ada = by_name["AdaptSegNet (output-space adversarial) [x4, val]"]
    train, test = ada["steps"]
    toy = bench.toy_preset("advent_maxsquare/train_adaptseg.py")
    assert f"--iters {k * toy['iters']}" in train[0] and f"--eval-every {k * toy['eval_every']}" in train[0]
    assert "--out {base}/adaptseg_x4" in train[0] and train[1] == "{base}/adaptseg_x4/final.json"
    assert "{base}/source/model.pth" in train[0]  # the unscaled source model is shared by every K
    assert "--checkpoint {base}/adaptseg_x4/model.pth --split val" in test[0]
    assert ada["control"] == "Source only, continued (control) [x4, val]"
    # a step reading a scaled folder writes a renamed folder too (stage 2 of the 4x stage-1 model), unscaled itself
    st2 = by_name["MADA stage 2 (5% images) [x4, val]"]["steps"]
    assert all("{base}/mada/stage1_mada/" not in c for c, _ in st2)
    assert "--out {base}/mada/stage2_mada_x4" in st2[2][0] and "--iters" not in st2[2][0]
    # D2ADA: K x the per-round iterations; its per-round evaluation rows read the scaled run; selection stats too
    d2 = by_name["D2ADA (5 rounds, 5% target pixels) [x4, val]"]
    assert f"--iters {k * bench.toy_preset('d2ada/train_ada.py')['iters']}" in d2["steps"][0][0]
    assert d2["selection"] == ("d2ada", "{base}/d2ada_ada_x4")
    assert "{base}/d2ada_ada_x4/checkpoint02.pth" in by_name["D2ADA after round 2 (2% target pixels) [x4, val]"]["steps"][0][0]
    # rows with no scaled step keep their steps (and only gain the split tag); K=1 on test changes nothing
    assert by_name["Source only [val]"]["steps"][0] == bench.PIPELINES[0]["steps"][0]
    assert bench.budget_variant(bench.PIPELINES, 1, "test") == bench.PIPELINES
    # the masked-anchor ablation's folders are not touched by the renaming of stage1_mada
    masked = by_name["MADA stage 2, absent classes masked (ablation) [x4, val]"]["steps"]
    assert any("{base}/mada/stage1_mada_mask_x4/model.pth" in c for c, _ in masked)


def test_rows_that_only_read_a_shared_model_run_side_by_side():
    rows = {p["name"]: p for p in bench.PIPELINES}
    src, ada, ent = (rows[n] for n in ("Source only", "AdaptSegNet (output-space adversarial)", "ADVENT MinEnt"))
    assert bench.depends(ada, src) and bench.depends(ent, src)  # both read {base}/source, which "Source only" writes
    assert not bench.depends(ent, ada)  # neither writes what the other touches
    v4 = {p["name"]: p for p in bench.budget_variant(bench.PIPELINES, 4, "val")}
    assert not bench.depends(v4["ADVENT MinEnt [x4, val]"], ent)  # scales of one row are independent


def test_budget_curves_pair_rows_with_their_control_and_apply_the_rule(tmp_path, monkeypatch):
    """The curve of a row is its val mIoU minus its control's at the same seed and K; the rule (mean difference >
    twice the control's seed std) is applied per point. Results are written by fake finished runs."""
    sys.path.insert(0, str(ROOT))
    import budget_curves as bc
    chosen = bc.grid_rows(["d2ada"], {})
    vals = {("D2ADA (5 rounds, 5% target pixels)", 1): [20.0, 21.0, 22.0],
            ("D2ADA baseline: random regions (5%)", 1): [20.0, 20.5, 21.0],
            ("D2ADA (5 rounds, 5% target pixels)", 4): [25.0, 26.0, 27.0],
            ("D2ADA baseline: random regions (5%)", 4): [21.0, 21.5, 22.0]}
    for p in chosen:
        for seed in (0, 1, 2):
            fmt = bench.fmt_of(p, seed, tmp_path)
            res = Path(p["result"].format(**fmt))
            res.parent.mkdir(parents=True, exist_ok=True)
            v = vals.get((p["base_name"], p["scale"]), 10.0)
            res.write_text(json.dumps({"mIoU": v[seed] if isinstance(v, list) else v, "last": {}}))
            (fmt["run"] / "bench.json").write_text(json.dumps({"seconds": 60.0, "peak_mib": 1.0, "toy_version": 3,
                                                                "machine": "test"}))
            (fmt["run"] / "diagnostics.json").write_text("{}")
    recs = {r["scale"]: r for r in bc.curves(tmp_path, [0, 1, 2], chosen)}
    assert recs[1]["minus_control"] == [0.0, 0.5, 1.0] and recs[1]["spread"] == 0.5 and not recs[1]["separates"]
    assert recs[4]["mean"] == 4.5 and recs[4]["separates"]  # 4.5 > 2 x 0.5
    assert recs[2]["minus_control"] == [0.0, 0.0, 0.0] and not recs[2]["separates"]  # a tie never separates
    bc.plot(list(recs.values()), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_budget_long_is_the_long_preset_and_refuses_its_own_flags(capsys):
    assert bench.main(["--budget", "long", "--list"]) == 0
    out = capsys.readouterr().out
    assert "D2ADA (5 rounds, 5% target pixels) [x2]" in out and "D2ADA baseline: random regions (5%) [x2]" in out
    assert "3 of" in out
    with pytest.raises(SystemExit):
        bench.main(["--budget", "long", "--budget-scale", "4", "--list"])
    with pytest.raises(SystemExit):  # val results are never published into the held-out test table
        bench.main(["--eval-split", "val", "--publish", "--list"])
