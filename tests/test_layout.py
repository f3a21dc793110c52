"""The house's layout, as a Detectron2 maintainer would review it: no import cycle between
modules, no back edge from the model to the checkpoint tools, tools/ as thin scripts,
one module per dataset format with everything its format needs, and the transfer suite
refusing a protocol that the environment's fine-tuning path cannot run."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.plain


def _modules():
    mods = {}
    for d, _, files in os.walk(os.path.join(ROOT, "scrl_d2")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _import_graph():
    """module -> the scrl_d2 modules it imports, at any level (a lazy import inside a
    function is an edge too), and the packages above them (importing ``a.b.c`` runs
    ``a.b``'s ``__init__`` first). A part importing its own package is not an edge (Python
    imports the package first); a package importing its parts is."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                parts = t.split(".")
                for above in (".".join(parts[:i]) for i in range(2, len(parts) + 1)):  # scrl_d2.x, ..., t
                    if above in mods and above != m and not m.startswith(above + "."):
                        graph[m].add(above)
    return graph


def _cycles(graph):
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(n):
        index[n] = low[n] = len(index)
        stack.append(n)
        on.add(n)
        for w in graph[n]:
            if w not in index:
                visit(w)
                low[n] = min(low[n], low[w])
            elif w in on:
                low[n] = min(low[n], index[w])
        if low[n] == index[n]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == n:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for n in graph:
        if n not in index:
            visit(n)
    return out


def test_no_module_imports_itself_through_others():
    graph = _import_graph()
    assert len(graph) > 80 and graph["scrl_d2.data.builtin"] >= {"scrl_d2.data.catalog", "scrl_d2.data.demo"}
    assert _cycles(graph) == []
    # importing a module of another package runs that package's __init__: an edge to it
    assert "scrl_d2.data" in graph["scrl_d2.detection.sampler"]  # from ..data.workers import ...
    # the check sees a cycle where there is one
    graph["scrl_d2.data.catalog"].add("scrl_d2.data.builtin")
    assert _cycles(graph) and "scrl_d2.data.catalog" in _cycles(graph)[0]


def test_no_back_edges():
    graph = _import_graph()
    modeling = [m for m in graph if m.startswith("scrl_d2.modeling")]
    assert not [(m, t) for m in modeling for t in graph[m] if t.startswith(("scrl_d2.checkpoint", "scrl_d2.engine",
                                                                             "scrl_d2.detection", "scrl_d2.transfer",
                                                                             "scrl_d2.cli"))]
    assert not [t for t in graph["scrl_d2.data.catalog"] if t.startswith(("scrl_d2.data.demo", "scrl_d2.data.scenes"))]
    lib = [m for m in graph if not m.startswith(("scrl_d2.cli", "scrl_d2.engine.slurm"))]
    # the library never imports a tool's command line (submitit's job pickles train_net's entry point)
    assert not [(m, t) for m in lib for t in graph[m] if t.startswith("scrl_d2.cli")]


def test_tools_are_thin_scripts_over_the_library():
    tools = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))
    assert {"train_net.py", "transfer.py", "benchmark.py", "convert.py", "demo_pipeline.py"} <= set(tools)
    for f in tools:
        tree = ast.parse(open(os.path.join(ROOT, "tools", f)).read())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                and ast.unparse(n) != "import sys"]  # sys.exit(main()) is allowed
        kinds = [type(n).__name__ for n in body]
        assert kinds == ["ImportFrom", "If"], (f, kinds)
        assert body[0].module.startswith("scrl_d2.cli."), f
        assert ast.unparse(body[1].test) == "__name__ == '__main__'", f
        assert len(body[1].body) == 1 and isinstance(body[1].body[0].value, ast.Call), f


def test_each_dataset_format_holds_what_both_paths_and_the_miniature_need():
    from scrl_d2.detection.builtin import PREDEFINED_SPLITS
    from scrl_d2.detection.catalog import DETECTION_DATASETS
    from scrl_d2.detection.formats import FORMATS, DatasetFormat, format_of_evaluator

    modules = {f[:-3] for f in os.listdir(os.path.join(ROOT, "scrl_d2", "detection", "formats"))
               if f.endswith(".py") and f != "__init__.py"}
    assert set(FORMATS) == modules == {"coco", "voc", "cityscapes", "lvis"}  # each module registers its format
    for name, fmt in FORMATS.items():
        cls = type(fmt)
        assert cls.__module__ == f"scrl_d2.detection.formats.{name}", name  # one module per format
        for method in ("detectron2_loader", "build_evaluator", "write_miniature"):
            assert getattr(cls, method) is not getattr(DatasetFormat, method), (name, method)
        for method in ("coco_api", "score"):
            own = getattr(cls, method) is not getattr(DatasetFormat, method)
            assert own == fmt.torchvision, (name, method)
        assert format_of_evaluator(fmt.evaluator_type) is fmt
    assert {fmt for fmt, _, _ in PREDEFINED_SPLITS.values()} == set(FORMATS)
    assert set(PREDEFINED_SPLITS) <= set(DETECTION_DATASETS)
    assert {d.kind for d in DETECTION_DATASETS.values()} <= set(FORMATS)


def test_the_suite_refuses_a_protocol_the_fine_tuning_path_cannot_run(tmp_path, monkeypatch, capsys):
    from scrl_d2.cli.transfer import main
    from scrl_d2.transfer import PROTOCOLS, TransferSuite
    from scrl_d2.utils.errors import InputValueError

    from scrl_d2.detection import FINETUNE_BACKENDS

    assert all(set(p.backends) <= set(FINETUNE_BACKENDS) for p in PROTOCOLS.values())
    d2_only = [p for p in PROTOCOLS.values() if p.backends == ("detectron2",)]
    both = [p for p in PROTOCOLS.values() if "torchvision" in p.backends]
    assert d2_only and both
    monkeypatch.setenv("SCRL_D2_BACKEND", "torchvision")
    suite = TransferSuite(str(tmp_path / "s"), {"random": "random"}, [both[0], d2_only[0]])
    with pytest.raises(InputValueError, match=f"{d2_only[0].name} run.* on detectron2 only.*torchvision"):
        suite.execute()
    assert not os.path.exists(tmp_path / "s")  # refused before anything ran
    for launcher in ("print", "slurm"):  # the commands may run where Detectron2 is installed
        assert not TransferSuite(str(tmp_path / "p"), {"random": "random"}, d2_only, launcher=launcher).runs_here()
    for argv in (["--protocols", d2_only[0].name], ["--protocols", d2_only[0].name, "--miniature", str(tmp_path / "m")]):
        with pytest.raises(SystemExit) as e:
            main(["--output-dir", str(tmp_path / "t"), "--weights", "random=random"] + argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "SCRL_D2_BACKEND=torchvision" in err[0], err
        assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "m")  # nothing written
    # results computed elsewhere are still tabulated here
    main(["--output-dir", str(tmp_path / "t"), "--weights", "random=random", "--protocols", d2_only[0].name,
          "--table-only"])
    assert os.path.isfile(tmp_path / "t" / "table.md") and d2_only[0].title in capsys.readouterr().out


def test_one_place_for_each_repeated_meaning():
    """A config's datasets root, the CUDA fallback, the detection architectures, the NaN ->
    null cleaning and the atomic write each live in one function, called from the places
    that need them (not copied there)."""
    calls = {}
    for m, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                calls.setdefault(name, set()).add(m)
    assert calls["set_datasets_root"] == {"scrl_d2.data.catalog"}  # only through apply_datasets_root
    assert calls["apply_datasets_root"] == {"scrl_d2.data.build", "scrl_d2.detection"}
    sources = {m: open(p).read() for m, p in _modules().items()}
    assert [m for m, s in sources.items() if '"GeneralizedRCNN", "RetinaNet"' in s] == ["scrl_d2.config.detection_defaults"]
    assert [m for m, s in sources.items() if "no GPU is visible: running" in s] == ["scrl_d2.engine.defaults"]
    assert [m for m, s in sources.items() if "allow_nan=False" in s] == ["scrl_d2.utils.fs"]  # strict JSON
    assert [m for m, s in sources.items() if "tempfile.mkstemp(" in s] == ["scrl_d2.utils.fs"]  # atomic writes
    assert [m for m, s in sources.items() if "def generate_once" in s] == ["scrl_d2.utils.fs"]


def test_a_non_editable_install_finds_the_checkout_it_is_run_from(tmp_path):
    """``pip install .`` puts the package in site-packages, away from configs/ and tools/:
    the demos and the transfer suite then use the checkout they are run from."""
    import shutil
    import subprocess

    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "scrl_d2"), site / "scrl_d2",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (site / "configs").mkdir()  # another package's configs/ beside it: not a checkout
    code = "import scrl_d2.utils.fs as f; print(f.__file__); print(f.checkout_root())"

    def where(cwd, path):  # -P: the current folder is not on sys.path, PYTHONPATH decides
        out = subprocess.run([sys.executable, "-P", "-c", code], cwd=str(cwd), capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONPATH=str(path))).stdout.split("\n")
        return out[0], out[1]

    module, root = where(ROOT, site)  # installed copy, run from the checkout
    assert module.startswith(str(site)) and root == ROOT
    module, root = where(tmp_path, site)  # installed copy, run from elsewhere: nothing better than its folder
    assert module.startswith(str(site)) and root == str(site)
    module, root = where(tmp_path, ROOT)  # the editable install: its checkout, wherever it is run from
    assert module.startswith(os.path.join(ROOT, "scrl_d2")) and root == ROOT



def _generate_slowly(root, log, barrier, result):
    """A process that generates the shared folder; all start it at once, the fill overlaps."""
    import time

    from scrl_d2.utils.fs import generate_once

    def fill(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        with open(os.path.join(tmp, "data.txt"), "w") as f:
            f.write("done")

    barrier.wait()
    out = generate_once(root, "1", fill)
    with open(result, "w") as f:
        f.write(open(os.path.join(out, "data.txt")).read())


def test_generate_once_fills_a_shared_folder_once_for_concurrent_processes(tmp_path):
    """Two jobs (or two pytest-xdist workers) asking for the same generated dataset at once:
    one fills it, the others wait and read the finished folder, which is never replaced
    under them."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    root, log, barrier = str(tmp_path / "shared"), str(tmp_path / "fills.log"), ctx.Barrier(3, timeout=120)
    results = [str(tmp_path / f"result{i}") for i in range(3)]
    procs = [ctx.Process(target=_generate_slowly, args=(root, log, barrier, r), daemon=True) for r in results]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(180)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert [open(r).read() for r in results] == ["done"] * 3
    assert len(open(log).read().split()) == 1  # filled once
    assert sorted(os.listdir(tmp_path)) == [".shared.lock", "fills.log", "result0", "result1", "result2", "shared"]
