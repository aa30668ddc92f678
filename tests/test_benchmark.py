"""The benchmark driver's scheduler: shared steps run once and in order, failures skip only their dependents."""
import json
import sys
from pathlib import Path

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
