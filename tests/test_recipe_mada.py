"""mada/README.md's recipe tables against the scripts' real-data presets: every row that names a flag
(`--x`) or a constant of mada/core.py (`core.X`) must state, as the first `code` value of its "ours" cell,
the value the script actually uses after parse_args with the table's real-data command line
(<!-- recipe-args: ... -->); and every value of a script's PAPER table must have a row."""
import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from mada import core

README = Path(__file__).resolve().parents[1] / "mada" / "README.md"
# PAPER keys that are run plumbing, not recipe
NOT_RECIPE = {"out", "eval_every", "save_every"}


def parse_tables(text):
    """[(argv list, [(parameter cell, ours cell), ...]), ...] for every recipe table of the README."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"<!-- recipe-args: (.*) -->", line.strip())
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        header = [c.strip() for c in lines[j].strip("|").split("|")]
        assert header == ["parameter", "paper", "released code", "ours", "why different"], header
        rows, j = [], j + 2
        while j < len(lines) and lines[j].startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", lines[j].strip().strip("|"))]
            assert len(cells) == 5, f"README line {j + 1}: {len(cells)} cells"
            rows.append((cells[0], cells[3], j + 1))
            j += 1
        tables.append((shlex.split(m.group(1)), rows))
    return tables


def value(text):
    """`512x896` -> (512, 896); `unset` -> None; Python literals; else the bare string."""
    if re.fullmatch(r"\d+x\d+", text):
        return tuple(int(v) for v in text.split("x"))
    if text == "unset":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def same(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=1e-12)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


TABLES = parse_tables(README.read_text())


def test_every_script_has_a_recipe_table():
    scripts = {argv[0] for argv, _ in TABLES}
    assert scripts >= {"warmup.py", "save_features.py", "cluster_anchors.py", "select_active.py", "train_stage1.py",
                       "train_stage2.py", "train_stage2_semi.py", "test.py"}
    assert any("--recipe" in argv for argv, _ in TABLES)      # MADAv2 step 1 has its own table


@pytest.mark.parametrize("argv,rows", TABLES, ids=[" ".join(a[:3]) for a, _ in TABLES])
def test_recipe_table_matches_preset(argv, rows):
    mod = importlib.import_module("mada." + argv[0][:-3])
    args = vars(mod.parse_args(argv[1:]))
    checked = set()
    for param, ours, line in rows:
        flag = re.search(r"`--([a-z0-9-]+)`", param)
        const = re.search(r"`core\.([A-Z_]+)`", param)
        if not (flag or const):
            continue
        code = re.search(r"`([^`]*)`", ours)
        assert code, f"README line {line}: the ours cell has no `value`"
        stated = value(code.group(1))
        if flag:
            key = flag.group(1).replace("-", "_")
            assert key in args, f"README line {line}: {argv[0]} has no flag --{flag.group(1)}"
            actual = args[key]
            checked.add(key)
        else:
            actual = getattr(core, const.group(1))
        assert same(stated, actual), f"README line {line} ({argv[0]}): table says {stated!r}, preset has {actual!r}"
    paper = getattr(mod, "PAPER_V2" if "madav2" in argv else "PAPER", None)
    if paper:
        missing = set(paper) - NOT_RECIPE - checked
        assert not missing, f"{argv[0]}: PAPER values without a recipe row: {sorted(missing)}"


def test_parser_catches_a_wrong_value():
    """The check can fail: a table row that misstates the preset is reported."""
    text = README.read_text().replace("| `37150` |", "| `37200` |", 1)
    argv, rows = next(t for t in parse_tables(text) if t[0][0] == "train_stage1.py" and "--recipe" not in t[0])
    with pytest.raises(AssertionError, match="37200"):
        test_recipe_table_matches_preset(argv, rows)
