"""Architecture guards: the import direction of pipeline/ and stages/, and dvc.yaml against the code.

A. Imports point one way: stages -> {reid, parsing, evaluation, data, dist} -> base modules, with
   the per-package rules of ``FORBIDDEN`` / ``ALLOWED`` below and no cycle between packages. This
   keeps evaluation "features in, metrics out", data free of model code, and every layer testable
   without the ones above it. Imports are read with ``ast`` (module level and inside functions;
   ``if TYPE_CHECKING:`` blocks are skipped), nothing is imported.
B. Each dvc.yaml stage lists exactly the code it runs (the stage script plus the transitive closure
   of its pipeline imports, package ``__init__`` files included) and exactly the params its script
   declares in ``PARAMS``. Too few deps: ``dvc repro`` misses a change; too many: it reruns for code
   the stage never executes.

Both checkers take the project root, so the tests below also prove, on fake trees, that they fail.
"""
import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ("pipeline", "stages")  # top-level folders whose .py files form the module graph

# ---- the whole import policy -------------------------------------------------------------------
BASE = {"pipeline.constants", "pipeline.atomic", "pipeline.progress", "pipeline.threads", "pipeline.cli",
        "pipeline.charts"}
ALLOWED = {  # module -> the only pipeline modules it may import
    **{m: set() for m in BASE},
    "pipeline.charts": {"pipeline.constants"},
    "pipeline.config": {"pipeline.constants", "pipeline.cli"},
    "pipeline.viz": {"pipeline.constants", "pipeline.charts"},
    "pipeline.tracking": BASE,
}
FORBIDDEN = {  # importer prefix -> imported prefixes (pipeline or third-party) it must not use
    "pipeline": ["stages"],
    "pipeline.evaluation": ["pipeline.reid", "pipeline.parsing", "pipeline.data", "pipeline.dist",
                            "torch.distributed", "webdataset"],
    "pipeline.data": ["pipeline.reid", "pipeline.parsing", "pipeline.evaluation",
                      "torchvision", "segmentation_models_pytorch"],
    "pipeline.dist": ["pipeline.reid", "pipeline.parsing", "pipeline.evaluation", "pipeline.data"],
    "pipeline.parsing": ["pipeline.reid", "pipeline.evaluation"],
    "pipeline.reid": ["pipeline.parsing"],  # reid -> evaluation is allowed (in-loop validation)
}


# ---- A. the module graph -----------------------------------------------------------------------
def under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or inside it (dotted names or slash paths)."""
    sep = "/" if "/" in prefix or "/" in name else "."
    return name == prefix or name.startswith(prefix.rstrip(sep) + sep)


def module_files(root: Path) -> dict:
    """Dotted module name -> path relative to root, for every .py file under pipeline/ and stages/."""
    out = {}
    for top in LOCAL:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.relative_to(root).as_posix()
    return out


def is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def import_nodes(node: ast.AST):
    """Every Import/ImportFrom in ``node`` at any depth, skipping the body of ``if TYPE_CHECKING:``."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    for child in node.orelse if is_type_checking(node) else ast.iter_child_nodes(node):
        yield from import_nodes(child)


def imports_of(root: Path, module: str, path: str, modules: dict) -> list:
    """[(imported name, line)]: pipeline modules resolved to files, third-party names dotted."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in import_nodes(ast.parse((root / path).read_text(), path)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
            continue
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
        base = ".".join(anchor + ([node.module] if node.module else []))  # `from ..x import y` -> pipeline.x
        for alias in node.names:
            full = f"{base}.{alias.name}"
            local = base.split(".")[0] in LOCAL
            is_module = full in modules or (root / full.replace(".", "/")).is_dir()
            found.append((full if alias.name != "*" and (is_module or not local) else base, node.lineno))
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def build_graph(root: Path) -> tuple:
    modules = module_files(root)
    return modules, {m: imports_of(root, m, p, modules) for m, p in modules.items()}


def group(module: str, root: Path) -> str:
    """Package-level node: stages, pipeline.<subpackage>, or the base modules as one group."""
    parts = module.split(".")
    if parts[0] != "pipeline":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 and (root / "pipeline" / parts[1]).is_dir() else "pipeline (base)"


def rule_violation(importer: str, target: str) -> str:
    if importer in ALLOWED and under(target, "pipeline") and target not in ALLOWED[importer]:
        return f"{importer} may import only {sorted(ALLOWED[importer]) or 'nothing'} from pipeline"
    for prefix, banned in FORBIDDEN.items():
        for bad in banned:
            if under(importer, prefix) and under(target, bad):
                return f"{prefix} must not import {bad}"
    return ""


def cycle_problems(root: Path, modules: dict, graph: dict) -> list:
    edges = {}  # (group, group) -> first "path:line" that makes the edge
    for m, found in graph.items():
        for target, line in found:
            a, b = group(m, root), group(target, root)
            if under(target, "pipeline") and a != b:
                edges.setdefault((a, b), f"{modules[m]}:{line}")

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for a, b in edges:
                if a == node and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    groups = {g for edge in edges for g in edge}
    cycles = {frozenset(h for h in groups if h in reach(g) and g in reach(h)) for g in groups if g in reach(g)}
    return [f"package cycle among {', '.join(sorted(c))}: "
            + "; ".join(f"{a} -> {b} at {where}" for (a, b), where in sorted(edges.items()) if {a, b} <= c)
            for c in sorted(cycles, key=sorted)]


def import_problems(root: Path) -> list:
    modules, graph = build_graph(root)
    problems = [f"{modules[m]}:{line} imports {target}: {reason}"
                for m, found in graph.items() for target, line in found
                if (reason := rule_violation(m, target))]
    return problems + cycle_problems(root, modules, graph)


# ---- B. dvc.yaml against the code -------------------------------------------------------------
def docstring_only(path: Path) -> bool:
    """Empty, or nothing but a docstring: running it can't change behaviour."""
    body = ast.parse(path.read_text()).body
    return not body or (len(body) == 1 and isinstance(body[0], ast.Expr)
                        and isinstance(getattr(body[0].value, "value", None), str))


def code_closure(root: Path, script_module: str) -> dict:
    """File -> the file that pulled it in, for everything running ``script_module`` executes."""
    modules, graph = build_graph(root)
    via, todo = {script_module: None}, [script_module]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a/ and a/b/ __init__
        for name in parents + [target for target, _ in graph[m]]:
            if name in modules and name not in via:
                via[name] = m
                todo.append(name)
    return {modules[m]: modules[by] if by else None for m, by in via.items()
            if not (modules[m].endswith("__init__.py") and docstring_only(root / modules[m]))}


def declared_params(script: Path):
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", None) == "PARAMS" for t in targets):
                return ast.literal_eval(node.value)
    return None


def stage_problems(root: Path, name: str, stage: dict) -> list:
    script = f"stages/{name}.py"
    where = f"stage {name}"
    if script not in str(stage.get("cmd", "")):
        return [f"{where}: cmd must run {script}, found {stage.get('cmd')!r}"]
    if not (root / script).is_file():
        return [f"{where}: {script} does not exist"]
    closure = code_closure(root, f"stages.{name}")
    deps = [d.rstrip("/") for d in stage.get("deps", []) if isinstance(d, str) and "${" not in d]
    code_deps = [d for d in deps if d.split("/")[0] in LOCAL and ((root / d).is_dir() or d.endswith(".py"))]
    problems = [f"{where}: add `{f}` to deps (imported by {by or 'the cmd'})"
                for f, by in closure.items() if not any(under(f, d) for d in code_deps)]
    for dep in code_deps:
        if (root / dep).is_dir():
            files = [p.relative_to(root).as_posix() for p in sorted((root / dep).rglob("*.py"))
                     if not (p.name == "__init__.py" and docstring_only(p))]
            unused, used = [f for f in files if f not in closure], [f for f in files if f in closure]
            if unused or not used:
                never = ", ".join(unused) or "no .py files"
                problems.append(f"{where}: dep `{dep}` covers code the stage never imports ({never}); "
                                + (f"list its files instead: {', '.join(used)}" if used else "remove it"))
        elif dep not in closure:
            problems.append(f"{where}: remove `{dep}` from deps (the stage never imports it)")
    declared = declared_params(root / script)
    listed = [p for p in stage.get("params", []) if isinstance(p, str)]
    if not isinstance(declared, tuple) or not all(isinstance(k, str) for k in declared):
        return problems + [f"{where}: {script} must define a module-level PARAMS tuple of strings "
                           f"(dvc.yaml lists {tuple(listed)})"]
    problems += [f"{where}: `{k}` is listed twice in {src}" for src, keys in
                 [(f"{script} PARAMS", declared), ("dvc.yaml params", listed)]
                 for k in sorted({k for k in keys if keys.count(k) > 1})]
    problems += [f"{where}: add `{k}` to params in dvc.yaml ({script} PARAMS reads it)"
                 for k in sorted(set(declared) - set(listed))]
    problems += [f"{where}: remove `{k}` from params in dvc.yaml (not in {script} PARAMS)"
                 for k in sorted(set(listed) - set(declared))]
    return problems


def pipeline_stages(root: Path) -> dict:
    """Every stage of the root dvc.yaml and of the sub-pipelines one folder down (tune/dvc.yaml,
    kept out of the default `dvc repro`), which must run from the root (``wdir: ..``)."""
    stages = dict(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    for sub in sorted(root.glob("*/dvc.yaml")):
        for name, stage in yaml.safe_load(sub.read_text())["stages"].items():
            assert stage.get("wdir") == "..", f"{sub}: stage {name} must set wdir: .. (paths are the root's)"
            assert name not in stages, f"{sub}: stage {name} is defined twice"
            stages[name] = stage
    return stages


def dvc_problems(root: Path) -> list:
    return [p for name, stage in pipeline_stages(root).items() for p in stage_problems(root, name, stage)]


# ---- tests ------------------------------------------------------------------------------------
def write_tree(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_imports_follow_the_layering():
    problems = import_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_import_checker_reports_violations(tmp_path):
    write_tree(tmp_path, {
        "pipeline/__init__.py": '"""Root."""\n',
        "pipeline/atomic.py": "import os\n",
        "pipeline/constants.py": "from .atomic import os\n",
        "pipeline/reid/model.py": "from pipeline.evaluation import x\n",
        "pipeline/evaluation/x.py": "import numpy\n\n\ndef f():\n    from pipeline.reid import model\n",
        "pipeline/evaluation/y.py": ("from typing import TYPE_CHECKING\nfrom . import x\n"
                                     "from ..reid.model import M\nfrom torch import distributed\n"
                                     "if TYPE_CHECKING:\n    from pipeline.data import records\n"),
        "stages/run.py": "from pipeline.reid import model\n",
    })
    problems = import_problems(tmp_path)
    assert [p.split(": ")[0] for p in problems] == [
        "pipeline/constants.py:1 imports pipeline.atomic",
        "pipeline/evaluation/x.py:5 imports pipeline.reid.model",
        "pipeline/evaluation/y.py:3 imports pipeline.reid.model",
        "pipeline/evaluation/y.py:4 imports torch.distributed",
        "package cycle among pipeline.evaluation, pipeline.reid",
    ], "\n".join(problems)


@pytest.mark.parametrize("name", sorted(pipeline_stages(ROOT)))
def test_dvc_stage_lists_exactly_its_code_and_params(name):
    stage = pipeline_stages(ROOT)[name]
    problems = stage_problems(ROOT, name, stage)
    assert not problems, "\n".join(problems)


def test_dvc_checker_reports_drift(tmp_path):
    write_tree(tmp_path, {
        "pipeline/__init__.py": '"""Docstring only: not a dep."""\n',
        "pipeline/a.py": "X = 1\n",
        "pipeline/b.py": "X = 1\n",
        "pipeline/pkg/__init__.py": "from .c import C\n",
        "pipeline/pkg/c.py": "C = 1\n",
        "pipeline/other/x.py": "X = 1\n",
        "stages/s.py": 'from pipeline import a\nfrom pipeline.pkg.c import C\nPARAMS = ("seed", "s")\n',
        "dvc.yaml": yaml.safe_dump({"stages": {"s": {
            "cmd": "python stages/s.py",
            "deps": ["stages/s.py", "pipeline/pkg", "pipeline/other", "pipeline/b.py", "${data.root}",
                     "cluster/job.sbatch"],
            "params": ["seed", "other", {"extra.yaml": ["k"]}]}}}),
    })
    assert sorted(dvc_problems(tmp_path)) == [
        "stage s: add `pipeline/a.py` to deps (imported by stages/s.py)",
        "stage s: add `s` to params in dvc.yaml (stages/s.py PARAMS reads it)",
        "stage s: dep `pipeline/other` covers code the stage never imports (pipeline/other/x.py); remove it",
        "stage s: remove `other` from params in dvc.yaml (not in stages/s.py PARAMS)",
        "stage s: remove `pipeline/b.py` from deps (the stage never imports it)",
    ]
