"""The documentation's commands, paths and links (README.md and docs/**/*.md).

Every documented command that runs a repository script (``python tools/X.py ...``,
``torchrun ... tools/X.py ...``, ``srun ... python tools/X.py ...``, ``python -m scrl_d2...``),
in a fenced shell block or in an inline code span that starts with ``python``, ``torchrun`` or
``srun``, is parsed by that script's own argparse parser (captured from the script itself,
the way it parses: abbreviations of flags refused), so a misspelled or removed flag, a wrong
choice or a value of the wrong type fails here. Its ``--config-file`` must exist, and each
trailing ``KEY VALUE`` override must name a key of the config the command loads (through the
library's loader, ``config_from_args``, with the detection defaults for detection configs as
``tools/train_net.py`` does) and take its value. Every repository path in a command or in
backticks (``tools/``, ``configs/``, ``scrl_d2/``, ``tests/``, ``docs/``) must exist, every
backticked ``scrl_d2.<module>`` name (or a name in such a module) must resolve, and every relative
markdown link must resolve, anchors included.

Placeholders (:data:`PLACEHOLDER`) are not checked; ``...`` stands for arguments left out.
"""
import argparse
import glob
import importlib
import itertools
import importlib.util
import json
import os
import re
import runpy
import shlex
import statistics
import sys
from contextlib import contextmanager
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

from conftest import ROOT

pytestmark = pytest.mark.plain  # the docs hold for a plain install too

# ---------------------------------------------------------------------------- the visible rules
# A value the reader fills in: <name>, $VAR (shell variables), or one of these words used as
# placeholders in the docs (R: a machine rank, "R = 0..3" in the command's comment). A flag whose
# value is a placeholder is parsed with the flag's default instead; an override whose value is
# one is checked for its key only; a placeholder config file is not loaded (its keys are then
# checked against the pretraining and the detection defaults).
PLACEHOLDER = re.compile(r"<[^<>]+>|\$")
PLACEHOLDER_WORDS = {"R"}
# "..." stands for arguments left out: dropped, and a missing required argument is not reported.
ELLIPSIS = "..."
# Which config the trailing overrides of a command apply to when it names none with --config-file:
# demo_pipeline's go to its fine-tuning config, transfer's (after --) to every protocol's run
# (Detectron2's detection defaults); any other script's to its --config-file default (or the
# pretraining defaults).
OVERRIDE_CONFIG = {"tools/demo_pipeline.py": "configs/demo/faster_rcnn_demo.yaml", "tools/transfer.py": "detection"}
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
REPO_PATH = re.compile(r"^(configs|tools|tests|scrl_d2|docs)(/|$)")
# a module named from inside the package, e.g. `config/defaults.py` (scrl_d2/config/defaults.py);
# other repositories' files (MoCo's `detection/configs/*.yaml`) are not .py paths of ours
PACKAGE_FILE = re.compile(r"^(benchmark|checkpoint|cli|config|data|detection|engine|evaluation|modeling|solver|"
                          r"transfer|utils)/[\w/]+\.py$")
# a backticked Python name of the package, e.g. `scrl_d2.data.register_image_folder(name, ...)`
PACKAGE_NAME = re.compile(r"^scrl_d2(\.[A-Za-z_][A-Za-z0-9_]*)+")
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")


def is_placeholder(token: str) -> bool:
    return bool(PLACEHOLDER.search(token)) or token in PLACEHOLDER_WORDS


# ---------------------------------------------------------------------------- reading markdown
def doc_files(root: str = ROOT) -> List[str]:
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "**", "*.md"),
                                                                recursive=True))


class Block(NamedTuple):
    lang: str
    start: int  # 1-based line of the first line inside the fence
    lines: List[str]


_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def split_markdown(text: str) -> Tuple[List[Block], List[Tuple[int, str]]]:
    """The fenced code blocks, and the other lines (1-based number, text)."""
    blocks, prose, fence, lang, start, body = [], [], None, "", 0, []
    for n, line in enumerate(text.split("\n"), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence, lang, start, body = m.group(1), m.group(2).lower(), n + 1, []
            else:
                prose.append((n, line))
        elif line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append(Block(lang, start, body))
            fence = None
        else:
            body.append(line)
    return blocks, prose


def logical_lines(lines: List[str], start: int):
    """(line number, text) with lines continued by a trailing backslash joined."""
    out, buf, first = [], "", None
    for i, line in enumerate(lines):
        if first is None:
            first = start + i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((first, buf + line))
        buf, first = "", None
    if buf:
        out.append((first, buf))
    return out


def paragraphs(prose: List[Tuple[int, str]]):
    """(line number of each line, text) of each paragraph: lines between blank lines or code
    blocks."""
    para: List[Tuple[int, str]] = []
    for n, line in prose + [(0, "")]:
        if para and (not line.strip() or n != para[-1][0] + 1):
            yield [n0 for n0, _ in para], "\n".join(x for _, x in para)
            para = []
        if line.strip():
            para.append((n, line))


_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def inline_spans(prose: List[Tuple[int, str]]):
    """(line number, text) of each inline code span (it may continue on the next line of its
    paragraph; line breaks become spaces)."""
    out = []
    for numbers, text in paragraphs(prose):
        for m in _INLINE.finditer(text):
            out.append((numbers[text.count("\n", 0, m.start())], m.group(1).replace("\n", " ")))
    return out


class Command(NamedTuple):
    where: str  # file:line
    text: str


_STARTS = ("python", "python3", "torchrun", "srun")


def _first_word(text: str) -> str:
    words = text.split()
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before the command
        words = words[1:]
    return words[0] if words else ""


def commands_in(path: str) -> List[Command]:
    text = open(path, encoding="utf-8").read()
    rel = os.path.relpath(path, ROOT)
    blocks, prose = split_markdown(text)
    out = []
    for b in blocks:
        if b.lang not in SHELL_LANGS:
            continue
        for n, line in logical_lines(b.lines, b.start):
            line = re.sub(r"^\s*\$\s+", "", line)
            if _first_word(line) in _STARTS:
                out.append(Command(f"{rel}:{n}", line.strip()))
    for n, span in inline_spans(prose):
        if _first_word(span) in _STARTS:
            out.append(Command(f"{rel}:{n}", span.strip()))
    return out


# ---------------------------------------------------------------------------- the scripts' parsers
class _Captured(Exception):
    def __init__(self, parser, method):
        self.parser, self.method = parser, method


_PARSE_METHODS = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")


@contextmanager
def _environ_kept():
    saved = dict(os.environ)  # e.g. --unsafe-load sets $SCRL_D2_UNSAFE_LOAD when parsed
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@lru_cache(maxsize=None)
def script_parser(script: str) -> Tuple[argparse.ArgumentParser, str]:
    """The parser a script builds, and the method it parses with: the script runs as
    ``__main__`` until its first parse call, which stops it (nothing else runs)."""
    originals = {m: getattr(argparse.ArgumentParser, m) for m in _PARSE_METHODS}

    def stop(method):
        def f(self, *a, **k):
            raise _Captured(self, method)
        return f

    argv = sys.argv[:]
    try:
        for m in _PARSE_METHODS:
            setattr(argparse.ArgumentParser, m, stop(m))
        sys.argv = [script]
        with _environ_kept():
            if script.endswith(".py"):
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
            else:
                runpy.run_module(script, run_name="__main__", alter_sys=True)
    except _Captured as c:
        return c.parser, c.method
    finally:
        for m, f in originals.items():
            setattr(argparse.ArgumentParser, m, f)
        sys.argv = argv
    raise AssertionError(f"{script} parsed no arguments with argparse")


class _ParseError(Exception):
    pass


def parse_command(script: str, args: List[str], partial: bool) -> argparse.Namespace:
    """``args`` parsed by the script's own parser, with the method the script uses; a flag
    abbreviation is refused (a truncated flag is a misspelled one here); in a ``partial``
    command (``...``) required arguments may be missing."""
    parser, method = script_parser(script)
    options = parser._option_string_actions
    args = list(args)
    for i, a in enumerate(args):  # a flag's placeholder value: the flag's default
        if i and is_placeholder(a) and args[i - 1] in options:
            action = options[args[i - 1]]
            if action.choices:
                args[i] = str(list(action.choices)[0])
            elif action.type is not None and action.default is not None:
                args[i] = str(action.default)

    def error(message):
        raise _ParseError(message)

    required = {a: a.required for a in parser._actions}
    saved_error, saved_abbrev = parser.__dict__.get("error"), parser.allow_abbrev
    parser.allow_abbrev, parser.error = False, error
    if partial:
        for a in parser._actions:
            a.required = False
    try:
        with _environ_kept():
            return getattr(parser, method)(args)
    except SystemExit as e:  # --help and the like
        raise _ParseError(f"the parser exited ({e.code})") from None
    finally:
        parser.allow_abbrev = saved_abbrev
        for a, r in required.items():
            a.required = r
        if saved_error is None:
            del parser.error
        else:
            parser.error = saved_error


# ---------------------------------------------------------------------------- configs
@lru_cache(maxsize=None)
def base_config(name: str):
    """``name``: a config file (repository-relative), "" (the pretraining defaults) or
    "detection" (the detection defaults)."""
    from scrl_d2.config import config_from_args, get_cfg

    if name == "detection":
        return get_cfg(detection=True)
    return config_from_args(os.path.join(ROOT, name) if name else "", [])


def has_key(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_overrides(where: str, config: Optional[str], opts: List[str], partial: bool) -> List[str]:
    """Problems with ``KEY VALUE`` overrides applied to ``config`` (None: a placeholder)."""
    problems = []
    if len(opts) % 2 and not partial:
        problems.append(f"{where}: overrides must be KEY VALUE pairs, got {opts}")
    pairs = list(zip(opts[0::2], opts[1::2]))
    bases = [base_config(config)] if config is not None else [base_config(""), base_config("detection")]
    concrete = []
    for key, value in pairs:
        if not CONFIG_KEY.match(key):
            problems.append(f"{where}: {key!r} is not a config key (overrides are UPPER_CASE.DOTTED KEY VALUE)")
        elif not any(has_key(b, key) for b in bases):
            problems.append(f"{where}: config key {key} does not exist in {config or 'the defaults'}")
        elif not is_placeholder(value):
            concrete += [key, value]
    if concrete and config is not None:
        from scrl_d2.config import ConfigError

        cfg = base_config(config).clone()
        cfg.defrost()
        try:
            cfg.merge_from_list(concrete)
        except ConfigError as e:
            problems.append(f"{where}: {e}")
    return problems


# ---------------------------------------------------------------------------- commands
def _script_of(tokens: List[str]) -> Tuple[Optional[str], List[str]]:
    """The repository script a command runs (``tools/X.py`` or a ``scrl_d2`` module) and its
    arguments; (None, []) for anything else (pytest, pip ...)."""
    for i, t in enumerate(tokens):
        if t == "-m" and i + 1 < len(tokens):
            mod = tokens[i + 1]
            return (mod, tokens[i + 2:]) if mod.split(".")[0] == "scrl_d2" else (None, [])
        if t.endswith(".py") and not t.startswith("-"):
            return t[2:] if t.startswith("./") else t, tokens[i + 1:]
    return None, []


def _paths_in(tokens: List[str]) -> List[str]:
    out = []
    for t in tokens:
        t = t.split("=", 1)[1] if t.startswith("--") and "=" in t else t
        if REPO_PATH.match(t) and not is_placeholder(t):
            out.append(t)
    return out


def repo_path_exists(path: str) -> bool:
    """A repository path, ``{a,b}`` alternatives and ``*`` globs allowed (each must match)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if m:
        return all(repo_path_exists(path[:m.start()] + alt + path[m.end():]) for alt in m.group(1).split(","))
    if any(c in path for c in "*?["):
        return bool(glob.glob(os.path.join(ROOT, path)))
    return os.path.exists(os.path.join(ROOT, path.rstrip("/")))


def check_command(cmd: Command) -> Tuple[Optional[str], List[str]]:
    """(the script it runs or None, problems)."""
    try:
        tokens = shlex.split(cmd.text, comments=True)
    except ValueError as e:
        return None, [f"{cmd.where}: cannot split {cmd.text!r}: {e}"]
    script, args = _script_of(tokens)
    problems, reported = _check_script_command(cmd, script, args)
    problems = [f"{cmd.where}: {p} does not exist" for p in _paths_in(tokens)
                if p not in reported and not repo_path_exists(p)] + problems
    return script, problems


def _check_script_command(cmd: Command, script: Optional[str], args: List[str]) -> Tuple[List[str], set]:
    """(problems, the paths they already report)."""
    if script is None:
        return [], set()
    if script.endswith(".py") and not os.path.isfile(os.path.join(ROOT, script)):
        return [f"{cmd.where}: script {script} does not exist"], {script}
    partial = ELLIPSIS in args
    args = [a for a in args if a != ELLIPSIS]
    try:
        ns = parse_command(script, args, partial)
    except _ParseError as e:
        return [f"{cmd.where}: {script} refuses the command line: {e}\n    {cmd.text}"], set()
    config_file = getattr(ns, "config_file", None) or ""
    if config_file and is_placeholder(config_file):
        config: Optional[str] = None
    elif config_file:
        if not os.path.isfile(os.path.join(ROOT, config_file)):
            return [f"{cmd.where}: config file {config_file} does not exist"], {config_file}
        config = config_file
    else:
        config = OVERRIDE_CONFIG.get(script, "")
    opts = [o for o in (getattr(ns, "opts", None) or []) if o != "--"]
    problems = check_overrides(cmd.where, config, opts, partial)
    protocols = getattr(ns, "protocols", "") if script == "tools/transfer.py" else ""
    if protocols and not is_placeholder(protocols):
        from scrl_d2.cli.transfer import select_protocols

        try:
            select_protocols(protocols)
        except Exception as e:  # an unknown protocol or group
            problems.append(f"{cmd.where}: --protocols {protocols}: {e}")
    return problems, set()


def package_name_resolves(dotted: str) -> bool:
    """A module of the package, or a name in one (``scrl_d2.utils.errors.BadInput``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            if importlib.util.find_spec(".".join(parts[:i])) is not None:
                break
        except ImportError:  # a parent that is not a package
            pass
    else:
        return False
    obj = importlib.import_module(".".join(parts[:i]))
    for name in parts[i:]:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


# ---------------------------------------------------------------------------- links and paths
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def github_anchors(path: str) -> set:
    """The anchors GitHub gives the headings of a markdown file."""
    _, prose = split_markdown(open(path, encoding="utf-8").read())
    seen: Dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def check_links_and_paths(path: str) -> List[str]:
    rel = os.path.relpath(path, ROOT)
    _, prose = split_markdown(open(path, encoding="utf-8").read())
    problems = []
    for numbers, text in paragraphs(prose):
        text = _INLINE.sub(lambda m: "`" + re.sub(r"[^\n]", " ", m.group(1)) + "`", text)  # keeps the offsets
        for m in _LINK.finditer(text):
            n, target = numbers[text.count("\n", 0, m.start())], m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(dest):
                problems.append(f"{rel}:{n}: link to {target}: {os.path.relpath(dest, ROOT)} does not exist")
            elif anchor and dest.endswith(".md") and anchor not in github_anchors(dest):
                problems.append(f"{rel}:{n}: link to {target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    for n, span in inline_spans(prose):
        for t in span.split():
            t = t.rstrip(".,;:)")
            if REPO_PATH.match(t) and not is_placeholder(t) and not repo_path_exists(t):
                problems.append(f"{rel}:{n}: `{span}`: {t} does not exist")
            if PACKAGE_FILE.match(t) and not os.path.isfile(os.path.join(ROOT, "scrl_d2", t)):
                problems.append(f"{rel}:{n}: `{span}`: scrl_d2/{t} does not exist")
        m = PACKAGE_NAME.match(span)
        if m and not package_name_resolves(m.group(0)):
            problems.append(f"{rel}:{n}: `{span}`: {m.group(0)} is not a module of scrl_d2 or a name in one")
    return problems


# ---------------------------------------------------------------------------- the tests
def _all_commands(root: str = ROOT) -> List[Command]:
    return [c for f in doc_files(root) for c in commands_in(f)]


def test_the_docs_exist_and_the_readme_stays_short():
    files = doc_files()
    assert all(os.path.isfile(f) for f in files) and len(files) > 10, files
    n = len(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines())
    assert n <= 200, f"README.md has {n} lines: keep it short, move detail to docs/"


def test_every_documented_command_runs_an_existing_script_with_accepted_flags_configs_and_keys():
    problems, seen = [], set()
    commands = _all_commands()
    for cmd in commands:
        script, p = check_command(cmd)
        seen.add(script)
        problems += p
    assert not problems, "\n".join(problems)
    # the extraction itself: the commands of every tool were found (a broken extractor fails here)
    tools = {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "tools", "*.py"))}
    assert tools <= seen, f"tools without a documented command: {sorted(tools - seen)}"
    assert len(commands) >= 40, len(commands)


def test_every_link_and_repository_path_in_the_docs_resolves():
    problems = [p for f in doc_files() for p in check_links_and_paths(f)]
    assert not problems, "\n".join(problems)


BROKEN_DOC = """# Title

```bash
python tools/train_net.py --config-file configs/demo/scrl_demo.yaml --num-gpu 2
python tools/train_net.py --config-file configs/demo/no_such.yaml
python tools/train_net.py --config-file configs/demo/scrl_demo.yaml SOLVER.NO_SUCH_KEY 1
python tools/train_net.py --config-file configs/demo/scrl_demo.yaml \\
    SOLVER.MAX_ITER ten    # a value of the wrong type
python tools/no_such_tool.py --x
python tools/transfer.py --protocols no_such_protocol
python tools/train_net.py --config-file configs/<config> --num-gpus 8 SEED <trial>
python tools/train_net.py --config-file configs/demo/scrl_demo.yaml --num-machines 2 --machine-rank R
```

Run `python tools/convert.py a.pth b.pkl --encoder nope`; see [a page](no_such_page.md),
[a heading](#title), [no heading](#nothing-here), `scrl_d2/no_such_module.py`, `scrl_d2.config.get_cfg()`
and `scrl_d2.config.no_such_name`; `config/defaults.py` but `config/no_such_defaults.py`.
"""


def test_the_checks_catch_a_misspelled_flag_a_missing_config_a_bad_key_and_broken_links(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(BROKEN_DOC)
    cmds = commands_in(str(doc))
    assert [c.where.rsplit(":", 1)[1] for c in cmds] == ["4", "5", "6", "7", "9", "10", "11", "12", "15"]
    found = [check_command(c)[1] for c in cmds]
    assert len(found[0]) == 1 and "unrecognized arguments: --num-gpu" in found[0][0]  # no abbreviations either
    assert found[1] == [f"{cmds[1].where}: config file configs/demo/no_such.yaml does not exist"]
    assert found[2] == [f"{cmds[2].where}: config key SOLVER.NO_SUCH_KEY does not exist in "
                        f"configs/demo/scrl_demo.yaml"]
    assert len(found[3]) == 1 and "SOLVER.MAX_ITER" in found[3][0]
    assert found[4] == [f"{cmds[4].where}: script tools/no_such_tool.py does not exist"]
    assert len(found[5]) == 1 and "no_such_protocol" in found[5][0]
    assert found[6] == [] and found[7] == []  # placeholders
    assert len(found[8]) == 1 and "argument --encoder: invalid choice: 'nope'" in found[8][0]
    links = check_links_and_paths(str(doc))
    assert len(links) == 5, links
    assert "no_such_page.md does not exist" in links[0] and "no heading #nothing-here" in links[1]
    assert "scrl_d2/no_such_module.py does not exist" in links[2]
    assert "scrl_d2.config.no_such_name is not a module of scrl_d2" in links[3]
    assert "scrl_d2/config/no_such_defaults.py does not exist" in links[4]


def test_figures_stated_twice_agree_with_each_other_and_with_the_code():
    """The README repeats a few figures of the docs: the count of protocols (from the table
    in the code), the paper's table (docs/transfer.md) and the demo's timings
    (docs/getting_started.md): each copy says the same."""
    from scrl_d2.transfer.protocols import PROTOCOLS

    readme = open(os.path.join(ROOT, "README.md")).read()
    counts = re.findall(r"\b(\d+) protocols\b", readme)
    assert counts and all(int(n) == len(PROTOCOLS) for n in counts), (counts, len(PROTOCOLS))

    def table(text: str, header: str) -> List[str]:
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(header))
        return list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))

    paper = "| row | pretraining config | paper: Faster box AP"
    transfer = open(os.path.join(ROOT, "docs", "transfer.md")).read()
    rows = table(readme, paper)
    assert len(rows) == 7 and rows == table(transfer, paper)  # header, rule, 5 rows
    started = open(os.path.join(ROOT, "docs", "getting_started.md")).read()
    timings = re.findall(r"\d+ min \d+ s", readme)
    assert len(timings) >= 4 and all(t in started for t in timings), timings


def test_the_per_core_table_comes_from_the_committed_runs():
    """docs/performance.md's per-core table (medians and ranges over the committed runs'
    --json files) and the README's ratio ranges are computed from those files."""
    folder = os.path.join(ROOT, "docs", "benchmarks", "per_core_2026-12-01")
    runs = [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".json")]
    assert len(runs) == 3 and all(r["mode"] == "data" and len(r["rows"]) == 4 for r in runs)
    perf = open(os.path.join(ROOT, "docs", "performance.md")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()

    def spread(values, fmt):
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    rows = {"the release (PIL": 2, "the release's views without": 3, "`INPUT.AUGMENT_DEVICE cpu`": 0,
            "`INPUT.AUGMENT_DEVICE split`, CPU side": 1}
    for label, i in rows.items():
        line = next(ln for ln in perf.splitlines() if ln.startswith("| " + label))
        rate = [r["rows"][i]["img_per_s_per_core"] for r in runs]
        assert spread(rate, ".1f") in line, (label, spread(rate, ".1f"), line)
        if i < 2:
            for key in ("vs_official", "vs_official_pil"):
                assert spread([r["rows"][i][key] for r in runs], ".2f") in line.replace("x (", " ("), (label, key)
        cores = 1000 / statistics.median(rate)
        assert line.rstrip(" |").split("|")[-1].strip().startswith(f"{cores:.2g}" if cores >= 10 else f"{cores:.1f}"), \
            (label, cores, line)
    # the release's two rows against each other
    pil_vs_release = [r["rows"][3]["img_per_s_per_core"] / r["rows"][2]["img_per_s_per_core"] for r in runs]
    line = next(ln for ln in perf.splitlines() if ln.startswith("| the release's views without"))
    assert spread(pil_vs_release, ".2f") in line.replace("x (", " ("), line
    line = next(ln for ln in perf.splitlines() if ln.startswith("| the release (PIL"))
    assert spread([1 / v for v in pil_vs_release], ".2f") in line.replace("x (", " ("), line
    # ToTensor + Normalize: the two release rows' difference, of the release's time per image
    ms = [(r["rows"][2]["ms_per_image"], r["rows"][2]["ms_per_image"] - r["rows"][3]["ms_per_image"]) for r in runs]
    assert (f"{min(d for _, d in ms):.1f}-{max(d for _, d in ms):.1f} ms of its "
            f"{min(t for t, _ in ms):.1f}-{max(t for t, _ in ms):.1f} ms per image") in " ".join(perf.split())
    # the README: these runs' lower bounds with the earlier host's (docs/performance.md) as the upper
    text = " ".join(readme.split())
    cpu_pil = [r["rows"][0]["vs_official_pil"] for r in runs]
    assert f"{min(cpu_pil):.2f}-{max(cpu_pil):.2f}x against its views without the ToTensor" in text
    cpu, split = ([r["rows"][i]["vs_official"] for r in runs] for i in (0, 1))
    assert f"runs {min(cpu):.2f}-1.21x as fast" in text and f"3.5-{max(split):.1f}x with the colour" in text
    assert "1.16-1.21x" in perf and "3.49-3.51x" in perf  # the earlier host's ratios, stated there
    cores = [1000 / statistics.median([r["rows"][i]["img_per_s_per_core"] for r in runs]) for i in (0, 1)]
    assert f"11-{cores[0]:.0f} or 4-{cores[1]:.1f} cores per GPU" in text
