"""The one restricted loader of released pickle files (common/safe_pickle.py, architecture.md rule 8; issue 27
item 2): both of its loaders refuse a pickle whose loading would run a command, with an error naming the file and
nothing run; a truncated file is a clear error naming the file; valid files (MADA's torch legacy format holding a
numpy array, MADAv2's zip archives, D2ADA's plain-pickle datalists, numpy scalars in a checkpoint) round-trip.
Every file here is written by the test itself."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from common import safe_pickle as SP
from common.runtime import InputError


class RunsACommand:
    """Unpickling this calls os.system(command): what a malicious 'anchors.pkl' or 'datalist.pkl' would hold."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class BuildsAnObject:
    """A class of the test module: its unpickling would import this module and set attributes."""

    def __init__(self):
        self.x = 1


def malicious_files(d, marker):
    """name -> (path, the loader that is meant for it)."""
    cmd = f"touch {marker}"
    payload = {"anchors": np.zeros(3, np.float32), "evil": RunsACommand(cmd)}
    files = {}
    torch.save(payload, d / "evil_zip.pth")
    files["torch zip archive"] = (d / "evil_zip.pth", SP.load_torch)
    torch.save(RunsACommand(cmd), d / "evil_legacy.pkl", _use_new_zipfile_serialization=False)
    files["torch legacy format"] = (d / "evil_legacy.pkl", SP.load_torch)
    for proto in (0, 2, 4, 5):
        (d / f"evil_p{proto}.pkl").write_bytes(pickle.dumps(payload, protocol=proto))
        files[f"pickle protocol {proto}"] = (d / f"evil_p{proto}.pkl", SP.load_pickle)
    # written by hand (protocol 0): GLOBAL __builtin__.eval, MARK, the source as a string, TUPLE, REDUCE, STOP
    (d / "evil_eval.pkl").write_bytes(b"c__builtin__\neval\n(V__import__('os').system('" + cmd.encode()
                                      + b"')\ntR.")
    files["builtins.eval via python-2 names"] = (d / "evil_eval.pkl", SP.load_pickle)
    (d / "evil_object.pkl").write_bytes(pickle.dumps([BuildsAnObject()]))
    files["an arbitrary class"] = (d / "evil_object.pkl", SP.load_pickle)
    (d / "object_array.pkl").write_bytes(pickle.dumps({"regions": np.array([1, "a", None], dtype=object)}))
    files["numpy object array"] = (d / "object_array.pkl", SP.load_pickle)
    torch.save(np.array([1, "a"], dtype=object), d / "object_array_legacy.pkl", _use_new_zipfile_serialization=False)
    files["numpy object array, torch legacy"] = (d / "object_array_legacy.pkl", SP.load_torch)
    return files


def test_malicious_pickles_are_refused_by_each_loader_and_nothing_runs(tmp_path):
    marker = tmp_path / "MARKER_the_command_ran"
    for name, (path, loader) in malicious_files(tmp_path, marker).items():
        for fn in (loader, SP.load_file):  # the loader meant for the file, and the dispatching one
            with pytest.raises(SP.UnsafeFileError) as e:
                fn(path)
            msg = str(e.value)
            assert str(path) in msg and "was refused" in msg and "nothing in it was run" in msg, (name, msg)
            assert "\n" not in msg, msg
        assert not marker.exists(), f"{name}: the command ran"
    # the refusal says what was asked for
    with pytest.raises(SP.UnsafeFileError, match=r"system"):
        SP.load_pickle(tmp_path / "evil_p4.pkl")
    with pytest.raises(SP.UnsafeFileError, match=r"system"):
        SP.load_torch(tmp_path / "evil_legacy.pkl")
    with pytest.raises(SP.UnsafeFileError, match=r"dtype\('O'\)"):
        SP.load_pickle(tmp_path / "object_array.pkl")
    assert isinstance(SP.UnsafeFileError("x"), InputError)  # scripts print it as one `error:` line


def test_malicious_datalist_through_the_script_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER_the_command_ran"
    evil = tmp_path / "datalist_01.pkl"
    evil.write_bytes(pickle.dumps({"src_label_im_idx": [], "x": RunsACommand(f"touch {marker}")}))
    p = subprocess.run([sys.executable, str(ROOT / "d2ada/datalist.py"), "summary", str(evil)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"{evil} was refused" in lines[0] and "posix.system" in lines[0], lines[0]
    assert not marker.exists()


def test_truncated_and_damaged_files_are_clear_errors(tmp_path):
    arr = np.arange(48640, dtype=np.float32)
    torch.save(arr, tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    torch.save({"a": arr}, tmp_path / "zip.pth")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"trg_label_suppix": {"a.png": [1, 2]}, "arr": arr}))
    cases = []
    for name in ("legacy.pkl", "zip.pth", "plain.pkl"):
        data = (tmp_path / name).read_bytes()
        for cut in (len(data) // 2, len(data) - 1, 40):
            bad = tmp_path / f"cut{cut}_{name}"
            bad.write_bytes(data[:cut])
            cases.append(bad)
    for bad in cases:
        with pytest.raises(SP.UnsafeFileError) as e:
            SP.load_file(bad)
        assert str(bad) in str(e.value) and "truncated or corrupt" in str(e.value), str(e.value)
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(SP.UnsafeFileError, match="is empty"):
        SP.load_file(tmp_path / "empty.pkl")
    with pytest.raises(SP.UnsafeFileError, match="file not found"):
        SP.load_file(tmp_path / "absent.pkl")
    (tmp_path / "text.pkl").write_text("not a pickle\n")
    with pytest.raises(SP.UnsafeFileError, match="text.pkl"):
        SP.load_pickle(tmp_path / "text.pkl")
    with pytest.raises(SP.UnsafeFileError, match="not a PyTorch file"):
        SP.load_torch(tmp_path / "plain.pkl")


def test_valid_files_round_trip(tmp_path):
    """MADA's anchors: torch.save of faiss's flat centroid array in torch's LEGACY format (torch 1.x default);
    MADAv2's: a (K, 19*256) array in a zip archive; cluster indices: a list of ints / an int64 array; D2ADA's
    datalist: a plain pickle of lists, dicts, strings, ints (and numpy ints, should a file hold them); a checkpoint
    with a numpy float (SS-ADA's previous_best)."""
    rng = np.random.default_rng(0)
    flat = rng.random(10 * 19 * 256, dtype=np.float32)
    torch.save(flat, tmp_path / "cluster_centroids_full_10.pkl", _use_new_zipfile_serialization=False)
    assert (tmp_path / "cluster_centroids_full_10.pkl").read_bytes().startswith(SP.TORCH_LEGACY_MAGIC)
    got = SP.load_torch(tmp_path / "cluster_centroids_full_10.pkl")
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and np.array_equal(got, flat)
    torch.save(flat.reshape(10, 4864), tmp_path / "cluster_centroids_sub_10.pkl")
    assert np.array_equal(SP.load_file(tmp_path / "cluster_centroids_sub_10.pkl"), flat.reshape(10, 4864))
    index = rng.integers(0, 10, 24966).tolist()
    torch.save(index, tmp_path / "cluster_index_full_10.pkl", _use_new_zipfile_serialization=False)
    assert SP.load_file(tmp_path / "cluster_index_full_10.pkl") == index
    torch.save(np.array(index)[:, None], tmp_path / "cluster_index_sub_10.pkl")
    assert np.array_equal(SP.load_file(tmp_path / "cluster_index_sub_10.pkl")[:, 0], index)
    triplet = ["/d/leftImg8bit/train/a/a_1_leftImg8bit.png", "/d/gtFine/train/a/a_1_gtFine_labelIds.png",
               "/d/superpixel/train/a/a_1_superpixel.png"]
    datalist = {"src_label_im_idx": [["images/00001.png", "labels/00001.png", "superpixel/00001.png"]],
                "trg_label_im_idx": [triplet], "trg_pool_im_idx": [triplet],
                "trg_label_suppix": {triplet[2]: [3, np.int64(7)]}, "trg_pool_suppix": {triplet[2]: list(range(8))},
                "extras": (1.5, {2, 3}, frozenset([4]), b"raw", 2 + 1j, np.float32(0.5), np.array(["x", "yy"]),
                           np.arange(6, dtype=np.int16).reshape(2, 3), True, None)}
    for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / f"datalist_p{proto}.pkl").write_bytes(pickle.dumps(datalist, protocol=proto))
        got = SP.load_pickle(tmp_path / f"datalist_p{proto}.pkl")
        assert got.keys() == datalist.keys() and got["trg_label_suppix"] == datalist["trg_label_suppix"]
        for a, b in zip(got["extras"], datalist["extras"]):
            assert np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b and type(a) is type(b), (proto, a, b)
    state = {"model": {"w": torch.ones(2)}, "epoch": 3, "previous_best": np.float64(41.25)}
    torch.save(state, tmp_path / "best.pth")
    got = SP.load_torch(tmp_path / "best.pth")
    assert got["previous_best"] == 41.25 and torch.equal(got["model"]["w"], torch.ones(2))
    torch.save(state, tmp_path / "best_legacy.pth", _use_new_zipfile_serialization=False)
    assert SP.load_torch(tmp_path / "best_legacy.pth")["epoch"] == 3
    # the allow-list is scoped to the call: afterwards torch's own weights_only load refuses numpy again
    with pytest.raises(Exception, match="numpy"):
        torch.load(tmp_path / "cluster_centroids_sub_10.pkl", weights_only=True)
