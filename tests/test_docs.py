"""The README checks itself: every --flag it names exists, and every Quick start command parses."""

import os
import re
import shlex

import pytest

import generate
from config import parse_config
from conftest import ROOT


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def flags_of(script):
    """The --flags a script accepts, read from its own parser (--help lists them)."""
    if script == "train.py":
        parser_help = help_text(lambda: parse_config(["--help"]))
    elif script == "generate.py":
        parser_help = help_text(lambda: generate.parse_args(["--help"]))
    else:
        with open(os.path.join(ROOT, script), encoding="utf-8") as f:
            return set(re.findall(r'"(--\w+)"', f.read()))  # add_argument("--name", ...)
    return set(re.findall(r"(--\w+)", parser_help))


def help_text(print_help):
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        print_help()
    return out.getvalue()


def commands(text):
    """(script, argv) for every `python X.py ...` or `torchrun ... X.py ...` line in code blocks,
    continuation lines joined and comments dropped."""
    found = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
            if scripts and words[0] in ("python", "torchrun") and words[1] != "-m":
                i = scripts[0]
                found.append((words[i], words[i + 1:]))
    return found


def test_every_flag_the_readme_names_exists_in_some_script():
    known = set()
    for script in ("train.py", "generate.py", "bench.py", "model.py", "explore.py"):
        known |= flags_of(script)
    torchrun_flags = {"--standalone", "--nproc_per_node"}  # torchrun's own, not ours
    named = set(re.findall(r"(?<![\w-])(--[a-z]\w*)", readme())) - torchrun_flags
    assert len(named) > 20, "the README names almost no flags?"
    assert named - known == set()


def test_every_command_in_the_readme_uses_flags_of_its_own_script():
    found = commands(readme())
    assert {script for script, _ in found} >= {"train.py", "generate.py"}
    for script, argv in found:
        unknown = {w.split("=")[0] for w in argv if w.startswith("--")} - flags_of(script)
        assert not unknown, f"{script} has no {unknown}"


def quick_start_commands():
    section = readme().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return commands(section)


def test_quick_start_commands_parse():
    found = quick_start_commands()
    assert [script for script, _ in found] == ["train.py", "generate.py"]
    for script, argv in found:
        if script == "train.py":
            config, preset = parse_config(argv)
            assert preset == "cpu" and config.n_layer == 3
        else:
            args = generate.parse_args(argv)
            assert args.prompt == "ROMEO:" and args.max_new_tokens == 300


def test_quick_start_installs_the_test_dependencies():
    section = readme().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    requirements = re.findall(r"pip install -r (\S+)", section)[0]  # the first is the command
    with open(os.path.join(ROOT, requirements)) as f:
        lines = [line.split("#")[0].strip() for line in f]
    assert "pytest" in lines and "-r requirements.txt" in lines
    assert "python -m pytest -q tests" in section


def test_the_reading_guides_line_ranges_hold_what_it_names():
    """The guide sends readers to line ranges: each must begin a definition (or the file) and
    end one, and hold the functions named beside it, so an edit above cannot shift it quietly."""
    guide = readme().split("## Reading guide")[1].split("\n## ")[0]
    model_ranges = re.search(r"`model\.py` top to bottom first: lines (\d+)-(\d+) .*?\slines "
                             r"(\d+)-(\d+) are path", guide, re.S).groups()
    ranges = [("model.py", *model_ranges[:2], "GPTModel"), ("model.py", *model_ranges[2:], "KVCache")]
    for file, start, end, names in re.findall(r"`(\w+\.py)` lines (\d+)-(\d+): ([^|]+)\|", guide):
        ranges += [(file, start, end, name) for name in re.findall(r"`(\w+)`", names)]
    assert len(ranges) >= 5
    for file, start, end, name in ranges:
        with open(os.path.join(ROOT, file), encoding="utf-8") as f:
            lines = f.read().splitlines()
        start, end = int(start), int(end)
        held = "\n".join(lines[start - 1:end])
        begins = ("def ", "class ", "@", "# ----")  # a definition, or a section's rule
        assert start == 1 or lines[start - 1].lstrip().startswith(begins), (file, start)
        after = next((line for line in lines[end:] if line.strip()), "")  # the next line
        if name == "GPTModel":  # model.py's split lies inside GPTModel, as the guide says
            assert after.lstrip().startswith(begins), (file, end)
        else:  # the range ends where the outermost definition it holds does, not inside one
            depths = [len(line) - len(line.lstrip()) for line in lines[start - 1:end]
                      if line.lstrip().startswith(begins)]
            assert len(after) - len(after.lstrip()) <= min(depths), (file, end)
        assert re.search(rf"^\s*(def |class )?{name}\b\s*[(:=]", held, re.M), (file, name)


def test_every_name_the_reading_guide_gives_is_defined_in_its_file():
    """`file.py: a`, `b` in the guide: a and b are defined in file.py, so a rename or a move
    cannot send a reader looking for what is not there."""
    guide = readme().split("## Reading guide")[1].split("\n## ")[0]
    named = re.findall(r"`(\w+\.py): ([\w.]+)`((?:,? (?:and )?`[\w.]+`)*)", guide)
    assert len(named) >= 20
    for file, first, more in named:
        with open(os.path.join(ROOT, file), encoding="utf-8") as f:
            source = f.read()
        for name in [first] + re.findall(r"`([\w.]+)`", more.split(" and `")[0]):
            last = name.split(".")[-1]  # CharTokenizer.encode: its method encode
            assert re.search(rf"^\s*(def |class )?{last}\b\s*[(:=]", source, re.M), (file, name)
