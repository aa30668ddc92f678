"""THE reader of the pickle-based files that the official repositories released (architecture.md rule 8):
MADA's and MADAv2's anchors (`anchors/cluster_centroids_*.pkl`: torch.save of a numpy array, in torch's legacy
non-zip format), D2ADA's datalists (`datalist_0X.pkl`: pickle.dump of a dict of lists), and the official
checkpoints the converters read (D2ADA `checkpoint0X.tar`, SS-ADA `best.pth`, which holds a numpy float).

Nothing here runs code from the file. What a file may hold: dicts, lists, tuples, sets, strings, bytes, numbers,
tensors, and numpy arrays or scalars of numbers or strings. Anything else (a function, a class, an object array)
is refused before it is built, with a one-line error naming the file and what it asked for.

- load_torch(path): torch.load(weights_only=True), zip or legacy format, with numpy_globals() admitted for the
  duration of the call only (torch's allow-list is a process-wide set; it is restored on exit).
- load_pickle(path): a pickle.Unpickler whose find_class admits only numpy_globals()' names (and set, frozenset,
  bytearray, complex, OrderedDict).
- load_file(path): either, by the file's first bytes (zip archive / torch legacy magic number / plain pickle).
"""
import _compat_pickle
import codecs
import collections
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .runtime import InputError

# torch's legacy (non-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c (protocol 2, LONG1)
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
NUMPY_KINDS = "biufcUS"   # bool, ints, floats, complex, str, bytes: no object ('O'), void/structured ('V'), datetime


class UnsafeFileError(InputError):
    """A file asked for something beyond plain data (refused, nothing was run), or is not a readable pickle."""


def _core():
    return getattr(np, "_core", None) or np.core      # numpy 2 / numpy 1


def numeric_dtype(*args):
    """np.dtype(*args) for the kinds of NUMPY_KINDS only: an object or structured dtype is refused (an object
    array would be the way to smuggle arbitrary objects through an array)."""
    dt = np.dtype(*args)
    if dt.kind not in NUMPY_KINDS or dt.hasobject or dt.fields is not None:
        raise pickle.UnpicklingError(f"numpy dtype {dt!r} (only arrays of numbers or strings are read)")
    return dt


def latin1_encode(obj, encoding="latin1"):
    """`_codecs.encode`, which protocol-2 pickles use for bytes (torch.save's default protocol): latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return codecs.encode(obj, "latin1")


def _allowed():
    """{'module.name': object} of everything a file may name: numpy's array and scalar reconstruction (protocol 5:
    from a buffer) under numpy 1's and numpy 2's module names, the checked dtype constructor, plain containers."""
    mm = _core().multiarray
    out = {"numpy.ndarray": np.ndarray, "numpy.dtype": numeric_dtype, "_codecs.encode": latin1_encode,
           "builtins.set": set, "builtins.frozenset": frozenset, "builtins.bytearray": bytearray,
           "builtins.complex": complex, "collections.OrderedDict": collections.OrderedDict}
    for mod in ("numpy.core", "numpy._core"):
        out[f"{mod}.multiarray._reconstruct"] = mm._reconstruct
        out[f"{mod}.multiarray.scalar"] = mm.scalar
        out[f"{mod}.numeric._frombuffer"] = _core().numeric._frombuffer   # pickle protocol 5's arrays
    return out


def _dtype_classes():
    """numpy 2's per-kind dtype classes (Float32DType, ...) of the admitted kinds: torch's weights_only
    unpickler builds (BUILD, __setstate__) only instances of admitted types."""
    kinds = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128, np.str_, np.bytes_]
    return sorted({type(np.dtype(k)) for k in kinds}, key=lambda t: t.__name__)


def numpy_globals():
    """The explicit allow-list for torch.serialization.safe_globals: (object, 'module.name') pairs."""
    pairs = [(obj, name) for name, obj in _allowed().items() if not name.startswith(("builtins.", "collections."))]
    return pairs + [(t, f"{t.__module__}.{t.__name__}") for t in _dtype_classes() if t is not np.dtype]


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the names of _allowed(); any other global is refused before it is
    imported, so nothing of the file's choosing is ever called."""

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:   # python-2 names, as pickle's own find_class maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _allowed().get(f"{module}.{name}")
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"persistent id {pid!r}")


def _check_file(path, what):
    path = Path(path)
    if not path.exists():
        raise UnsafeFileError(f"file not found: {path} (expected {what})")
    if path.is_dir():
        raise UnsafeFileError(f"{path} is a folder; expected a file holding {what}")
    size = path.stat().st_size
    if size == 0:
        raise UnsafeFileError(f"{path} is empty (0 bytes; an interrupted download?); expected {what}")
    with open(path, "rb") as f:
        head = f.read(len(TORCH_LEGACY_MAGIC))
    return path, size, head


def _refused(path, detail, what):
    return UnsafeFileError(f"{path} was refused: it asks for {detail}, which is not plain data (tensors, numbers, "
                           f"strings, containers, numpy arrays of numbers); nothing in it was run. Expected {what}")


def _corrupt(path, size, detail, what):
    return UnsafeFileError(f"{path} is truncated or corrupt ({size} bytes: {detail}); expected {what}")


def _scan(path, count):
    """Walk the opcodes of the file's first `count` pickles without executing any (pickletools): a truncated or
    garbled pickle is reported as such here, before an unpickler could mistake half a name for a request."""
    with open(path, "rb") as f:
        for _ in range(count):
            for _op in pickletools.genops(f):
                pass


# What torch's weights_only unpickler says when it refuses (its messages, torch 2.6 - 2.14) -> the refused name
_TORCH_REFUSALS = (r"unsupported GLOBAL (\S+) whose module", r"Unsupported global: GLOBAL (\S+) was not",
                   r"reduce for unrecognized function (.+?)(?: which|$)", r"(Can only build .+)",
                   r"(Can only create new object .+)", r"(Unsupported operand \S+)",
                   r"(numpy dtype .+?) \(only", r"(_codecs.encode with \S+)")


def load_torch(path, what="a PyTorch file of tensors or numpy arrays"):
    """torch.load(path, weights_only=True) on the CPU with numpy_globals() admitted for this call: zip and legacy
    formats. Every failure is one UnsafeFileError naming the file."""
    path, size, head = _check_file(path, what)
    if head[:4] == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            raise _corrupt(path, size, "an incomplete zip archive", what)
    elif head == TORCH_LEGACY_MAGIC:
        try:
            _scan(path, 5)   # magic number, protocol, system info, the object, its storage keys
        except Exception as e:
            raise _corrupt(path, size, f"a PyTorch legacy file whose pickle ends early ({e})", what) from None
    else:
        raise UnsafeFileError(f"{path} is not a PyTorch file (neither a zip archive nor torch's legacy format"
                              + ("; a plain pickle: read it with load_pickle" if head[:1] == b"\x80" else "")
                              + f"); expected {what}")
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for refusals and damage alike
        msg = " ".join(str(e).split())
        for pattern in _TORCH_REFUSALS:
            m = re.search(pattern, msg)
            if m and m.group(1).strip(". "):
                raise _refused(path, m.group(1).strip()[:160], what) from None
        raise _corrupt(path, size, f"{type(e).__name__}: {msg[-160:]}", what) from None


def load_pickle(path, what="a pickle of plain data"):
    """A plain pickle (protocol 0-5) through RestrictedUnpickler. Every failure is one UnsafeFileError naming the
    file."""
    path, size, head = _check_file(path, what)
    if head[:4] == b"PK\x03\x04" or head == TORCH_LEGACY_MAGIC:
        raise UnsafeFileError(f"{path} is a PyTorch file, not a plain pickle: read it with load_torch "
                              f"(expected {what})")
    try:
        _scan(path, 1)
    except Exception as e:
        raise _corrupt(path, size, f"the pickle ends early or is garbled ({e})", what) from None
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        msg = str(e)
        if msg.startswith(("global ", "persistent id", "numpy dtype", "_codecs.encode")):
            raise _refused(path, msg.split(" (only")[0], what) from None
        raise _corrupt(path, size, f"UnpicklingError: {msg[:160]}", what) from None
    except Exception as e:  # EOFError, ValueError, ... : damage
        raise _corrupt(path, size, f"{type(e).__name__}: {str(e)[:160]}", what) from None


def load_file(path, what="a released file of plain data"):
    """A torch file (zip archive, or legacy format by its magic number) through load_torch, anything else
    through load_pickle."""
    path, size, head = _check_file(path, what)
    if head[:4] == b"PK\x03\x04" or head == TORCH_LEGACY_MAGIC:
        return load_torch(path, what)
    return load_pickle(path, what)


def to_numpy(obj):
    """A loaded array (numpy array or tensor) as a numpy array; anything else is None."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    return obj if isinstance(obj, np.ndarray) else None
