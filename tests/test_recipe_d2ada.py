"""Recipe parity of d2ada/: the recipe tables in d2ada/README.md ("Recipe: the paper preset against the
released code") against each script's effective real-data preset. A row whose parameter starts with a flag
(`--x`) is checked against the script's arguments after parse_args with real-data flags; one that starts
with a constant (`NAME`) against that module constant. The first backticked value of the "ours" column is
the value the README claims."""
import ast
import math
import re

import pytest

from conftest import ROOT

README = ROOT / "d2ada" / "README.md"
REAL = ["--source", "gta5", "--source-root", "/data/GTA5", "--target", "cityscapes", "--target-root",
        "/data/cityscapes"]
# script -> (module, real-data argv); flags given here explicitly are compared with the module's PAPER dict
SCRIPTS = {
    "warmup.py": ("d2ada.warmup", REAL + ["--init", "/weights/resnet101-imagenet.pth"]),
    "train_ada.py": ("d2ada.train_ada", REAL),
    "superpixels.py": ("d2ada.superpixels", ["--dataset", "cityscapes", "--data-root", "/data/cityscapes"]),
    "test.py": ("d2ada.test", ["--target", "cityscapes", "--target-root", "/data/cityscapes"]),
}
# recipe flags each table must cover (every PAPER key but plumbing, plus the method's own hyper-parameters)
MUST = {
    "warmup.py": {"--model", "--backbone", "--output-stride", "--init", "--warmup", "--iters", "--batch-size",
                  "--lr", "--momentum", "--weight-decay", "--warmup-iters", "--lambda-adv", "--lr-d",
                  "--freeze-bn", "--crop-size", "--eval-every"},
    "train_ada.py": {"--init-from", "--rounds", "--active-selection-size", "--selection", "--alpha", "--beta",
                     "--per-class", "--gmm-max-iter", "--source-sample", "--density-aug", "--density-pca",
                     "--iters", "--batch-size", "--lr", "--momentum", "--weight-decay", "--freeze-bn",
                     "--crop-size", "--eval-every"},
    "superpixels.py": {"PAPER_SEGMENTS", "--compactness"},
    "test.py": {"PAPER_EVAL_SIZE", "--flip"},
}


def recipe_tables():
    """{script: [(key, ours value text, whole row)]} from the README's recipe section."""
    text = README.read_text()
    start = text.index("## Recipe: the paper preset against the released code")
    end = text.index("\n## ", start + 5)
    tables = {}
    for block in text[start:end].split("\n### ")[1:]:
        head, body = block.split("\n", 1)
        script = re.match(r"`([\w.]+)`", head).group(1)
        rows = tables.setdefault(script, [])
        for line in body.splitlines():
            if not line.startswith("|") or line.startswith("|---"):
                continue
            cells = [c.strip() for c in line.strip()[1:-1].split("|")]
            assert len(cells) == 5, f"{README}: recipe row of {script} must have 5 cells: {line}"
            if cells[0] == "parameter":
                continue
            key = re.match(r"`([^`]+)`", cells[0])
            if key and (key.group(1).startswith("--") or key.group(1).isupper()):
                val = re.search(r"`([^`]+)`", cells[3])
                assert val, f"{README}: {script} row {key.group(1)} names no `value` in the 'ours' column"
                rows.append((key.group(1), val.group(1), line))
    return tables


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _same(claimed, actual):
    if isinstance(actual, bool) or isinstance(claimed, bool):
        return bool(claimed) == bool(actual) and type(claimed) in (bool, int) and type(actual) in (bool, int)
    if isinstance(claimed, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(claimed, actual, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(claimed, (tuple, list)) and isinstance(actual, (tuple, list)):
        return len(claimed) == len(actual) and all(_same(a, b) for a, b in zip(claimed, actual))
    return claimed == actual or (isinstance(actual, str) and str(claimed) == actual)


def effective(script):
    import importlib
    mod_name, argv = SCRIPTS[script]
    mod = importlib.import_module(mod_name)
    return mod, mod.parse_args(list(argv)), set(a for a in argv if a.startswith("--"))


def test_every_script_has_a_complete_recipe_table():
    tables = recipe_tables()
    assert set(tables) == set(SCRIPTS), f"recipe tables for {sorted(tables)}; expected {sorted(SCRIPTS)}"
    for script, keys in MUST.items():
        missing = keys - {k for k, _, _ in tables[script]}
        assert not missing, f"{README}: the recipe table of {script} lacks {sorted(missing)}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_recipe_table_matches_the_real_data_preset(script):
    mod, args, given = effective(script)
    wrong = []
    for key, text, line in recipe_tables()[script]:
        claimed = _literal(text)
        if key.startswith("--"):
            dest = key[2:].replace("-", "_")
            if key in given:  # passed on the command line above: the preset's own value is PAPER's
                actual = getattr(mod, "PAPER")[dest]
            else:
                assert hasattr(args, dest), f"{script} has no flag {key} (README row: {line})"
                actual = getattr(args, dest)
        else:
            assert hasattr(mod, key), f"{script} has no constant {key} (README row: {line})"
            actual = getattr(mod, key)
        if not _same(claimed, actual):
            wrong.append(f"{key}: README says {claimed!r}, {script} has {actual!r}")
    assert not wrong, f"{README} recipe table of {script} disagrees with the script:\n" + "\n".join(wrong)


def test_the_checker_catches_a_wrong_value():
    """The comparison is not vacuous: a changed number, size or name is a mismatch."""
    assert not _same(_literal("120000"), 100000) and not _same(_literal("(1024, 2048)"), (512, 1024))
    assert not _same(_literal("train"), "none") and not _same(_literal("None"), "/w.pth")
    assert _same(_literal("0.00025"), 2.5e-4) and _same(_literal("(1024, 2048)"), [1024, 2048])
    assert not _same(_literal("1"), False) and _same(_literal("False"), False)
