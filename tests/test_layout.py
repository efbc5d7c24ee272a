"""The layout's rules: what may import what, what the CLI imports before it prints, where
the code reads from, and a wheel that carries everything it needs."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import mlx_pager
from mlx_pager.paging.loader import load_paged
from mlx_pager.paging.policies import DEFAULT_POLICY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_import_contracts_hold():
    """import-linter's contracts (pyproject.toml): the engine never imports the app or
    Textual, the app never imports MLX or the engine's paging and storage, and the
    engine's layers import only downward."""
    result = subprocess.run(
        [str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: \d+ kept, 0 broken", result.stdout), result.stdout


def imported_modules(args: list[str], env: dict[str, str]) -> set[str]:
    """Every module a command imports, from Python's own -X importtime report."""
    result = subprocess.run(
        [str(BIN / "mlx-pager"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env, "PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert names, "no import-time report"
    return names


@pytest.mark.parametrize("args", [["--help"], ["settings"], ["settings", "--json"]])
def test_help_and_settings_import_no_mlx(args, tmp_path):
    names = imported_modules(args, {"MLX_PAGER_CONFIG_DIR": str(tmp_path)})
    heavy = sorted(n for n in names if n.split(".")[0] in ("mlx", "mlx_lm", "textual", "torch"))
    assert not heavy, f"`mlx-pager {' '.join(args)}` imports {heavy[:5]}"
    assert "mlx_pager.cli" in names


def test_the_default_policy_is_the_projects_everywhere():
    """load_paged used to default to LRU, so `bench` measured LRU, not the default."""
    assert inspect.signature(load_paged).parameters["policy"].default == DEFAULT_POLICY
    from mlx_pager.settings import Settings

    assert Settings().policy == DEFAULT_POLICY


def test_code_reads_nothing_outside_the_repository():
    """Paths beside the repository (../shared) come in as arguments, never from the code;
    shipped files are found by one helper (mlx_pager.assets.asset_path)."""
    offenders = []
    for folder in ("mlx_pager", "app", "assets", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            patterns = [r"[\"']\.\./", r"/ \"\.\.\"", r"/work/", r"/ \"shared\""]
            if folder != "scripts":  # scripts may write into the repository's own assets/
                patterns += [r"parent\.parent", r"parents\[\d\]"]
            for pattern in patterns:
                if re.search(pattern, text):
                    offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert not offenders


def test_cited_documents_exist():
    """Code that cites a document of the project's cites one in the repository."""
    missing = set()
    for path in [*(ROOT / "mlx_pager").rglob("*.py"), *(ROOT / "app").rglob("*.py")]:
        for doc in re.findall(r"\b(docs/[\w./-]+\.md)", path.read_text()):
            if not (ROOT / doc).exists():
                missing.add(f"{path.relative_to(ROOT)} cites {doc}")
        assert "NOTES.md" not in path.read_text(), f"{path} cites a file not in the repository"
    assert not missing


def test_architecture_doc_names_every_module():
    """docs/architecture.md and the README's table name the files that exist."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    modules = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "mlx_pager").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    ]
    assert [m for m in modules if m not in doc] == []
    named = set(re.findall(r"`((?:mlx_pager|app)/[\w/]+\.py)`", doc))
    named |= set(re.findall(r"`((?:mlx_pager|app)/[\w/]+\.py)`", (ROOT / "README.md").read_text()))
    assert [n for n in sorted(named) if not (ROOT / n).exists()] == []


@pytest.mark.slow
def test_wheel_installs_and_runs_offline(tmp_path):
    """A wheel (not an editable install) carries the embedded model, the catalogue and
    the calibration prompts: in a fresh virtualenv, offline, `generate` answers on the
    embedded model and `models` lists it."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    (wheel,) = wheels.glob("mlx_pager-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The dependencies come from this environment's site-packages (the test has no index
    # to install them from); the package itself only from the wheel: a plain path entry
    # does not run this environment's .pth files, so its editable install stays out.
    ours = Path(sysconfig.get_paths()["purelib"])
    fresh = next((venv / "lib").glob("python3*")) / "site-packages"
    (fresh / "deps.pth").write_text(f"{ours}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(fresh),
         str(wheel)],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    (venv / "bin" / "mlx-pager").write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom mlx_pager_app.entry import main\n"
        "sys.exit(main())\n"
    )
    (venv / "bin" / "mlx-pager").chmod(0o755)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "MLX_PAGER_CONFIG_DIR": str(tmp_path / "config"),
        "MLX_PAGER_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": "",
    }
    work = tmp_path / "elsewhere"  # not the repository: nothing found beside the code
    work.mkdir()

    def run(*args: str) -> str:
        result = subprocess.run([str(venv / "bin" / "mlx-pager"), *args], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    where = run("generate", "--prompt", "def add(a, b):", "--max-tokens", "8", "--json")
    reply = json.loads(where)
    assert reply["tokens"] and reply["paged"]
    listed = json.loads(run("models", "--json"))
    (embedded,) = [r for r in listed if r["embedded"]]
    assert Path(embedded["path"]).is_relative_to(fresh), embedded["path"]
    assert embedded["verdict"] in ("fits", "paged")
    probe = (
        "import mlx_pager, mlx_pager_app; from mlx_pager.assets import asset_path; "
        "print(mlx_pager.__file__); print(asset_path('prompts', 'calibration.jsonl').exists()); "
        "print(asset_path('catalogue.json').exists())"
    )
    result = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=work, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    path, calibration, catalogue = result.stdout.split()
    assert Path(path).is_relative_to(fresh) and calibration == catalogue == "True"
    assert Path(mlx_pager.__file__).is_relative_to(ROOT)  # this run's own: the checkout


# Import name -> distribution, for optional packages that may be absent here (CI does not
# build llama-cpp-python: it compiles llama.cpp for about half an hour).
NOT_INSTALLED_DISTS = {"llama_cpp": "llama-cpp-python"}


def test_every_imported_package_is_declared():
    """What the code imports is a dependency in pyproject.toml (httpx2 was imported but
    not declared)."""
    import ast
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def dist_names(specs: list[str]) -> set[str]:
        return {re.split(r"[<>=!;\[ ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}

    declared = dist_names(project["dependencies"])
    # The at-scale benchmark may also use its own extra (peers), nothing else may.
    peers = declared | dist_names(project["optional-dependencies"]["peers"])
    owners = packages_distributions()
    stdlib = sys.stdlib_module_names
    missing = set()
    for folder in ("mlx_pager", "app", "assets"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in stdlib or top.startswith("mlx_pager"):
                        continue
                    dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                    dists.add(NOT_INSTALLED_DISTS.get(top, top))  # an extra CI leaves out
                    allowed = peers if "benchmark" in path.parts else declared
                    if not dists & allowed and not (top == "mlx" and "mlx" in declared):
                        missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, sorted(missing)
