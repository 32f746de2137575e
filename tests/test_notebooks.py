"""The notebooks in notebooks/ run top to bottom, are committed with their outputs, and open in Colab.

Each notebook is executed with nbclient in a fresh Jupyter kernel running *this* Python (a kernelspec for
``sys.executable`` is written to a temporary ``JUPYTER_PATH``, so whatever ``python3`` kernel a machine has
installed is never used). The kernel gets ``MOEJAX_NOTEBOOK_SMOKE=1``, which every notebook reads to shrink its
sizes and step counts, and a single CPU device: conftest's 8 simulated devices are for the sharding tests, while
a notebook should run as it does for a user (Colab's CPU runtime has one device).
"""
from __future__ import annotations

import os
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec", reason="the test extra installs ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "moejax-test-python"
COLAB_BADGE = re.compile(r"\(https://colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/main/"
                         r"(notebooks/[^)\s]+\.ipynb)\)")
MAX_NOTEBOOK_BYTES = 1_000_000


def _readme_notebooks_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Notebooks\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Notebooks' section"
    return match.group(1)


def _repository_url() -> str:
    """The one GitHub URL the README states for the notebooks (badges and Colab install cells)."""
    urls = set(re.findall(r"`(https://github\.com/[^`\s]+)`", _readme_notebooks_section()))
    assert len(urls) == 1, f"the Notebooks section must name exactly one repository URL in backticks, found {urls}"
    return urls.pop()


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kernelspec that launches ``sys.executable -m ipykernel_launcher``, found through ``JUPYTER_PATH``."""
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    ipykernel_kernelspec.write_kernel_spec(str(jupyter_path / "kernels" / KERNEL_NAME),
                                           overrides={"display_name": "moejax tests"})
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(jupyter_path)] + ([old] if old else []))
    yield KERNEL_NAME
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert "01_moe_layer_internals.ipynb" in names and "02_train_and_analyse.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_with_smoke_settings(path: pathlib.Path, kernel_name: str,
                                               monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path):
    monkeypatch.setenv("MOEJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")               # no GUI backend, ever; the notebooks plot inline
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("TMPDIR", str(tmp_path))           # workdirs and caches the notebooks create go here
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")   # smoke sizes compile faster unoptimised
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel_name, allow_errors=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()          # raises CellExecutionError, naming the cell, on the first error

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook drew no plot"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_was_run_top_to_bottom_and_is_small(path: pathlib.Path):
    """GitHub shows the saved outputs: every code cell ran once, in order, without errors; PNGs stay small."""
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} was saved without its plots"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_first_code_cell_installs_from_the_readme_url_only_in_colab(path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    assert f'MOEJAX_REPO = "{_repository_url()}"' in first
    assert 'if "google.colab" in sys.modules:' in first
    assert 'os.environ.get("MOEJAX_NOTEBOOK_SMOKE") == "1"' in first


def test_readme_links_every_notebook_with_a_colab_badge():
    section = _readme_notebooks_section()
    repo = _repository_url().removeprefix("https://github.com/")
    badges = COLAB_BADGE.findall(section)
    assert {owner_repo for owner_repo, _ in badges} == {repo}
    linked = {nb_path for _, nb_path in badges}
    assert linked == {f"notebooks/{p.name}" for p in NOTEBOOKS}
    assert section.count("colab-badge.svg") == len(NOTEBOOKS)
    for p in NOTEBOOKS:
        assert f"](notebooks/{p.name})" in section, f"no plain link to {p.name}"
    # Each notebook's own Colab link (in its title cell) points at itself in the same repository.
    for p in NOTEBOOKS:
        title = nbformat.read(p, as_version=4).cells[0].source
        assert f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{p.name}" in title


def test_kernelspec_runs_this_python(kernel_name: str):
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    assert spec.argv[0] == sys.executable


def _moejax_imports() -> list[str]:
    """Every ``import moejax...`` / ``from moejax... import ...`` line of the notebooks' code cells."""
    lines = set()
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                lines.update(line.strip() for line in cell.source.splitlines()
                             if re.match(r"^\s*(import moejax|from moejax[.\w]* import [^(]+$)", line))
    return sorted(lines)


def test_the_colab_install_cell_installs_a_moejax_the_notebooks_can_import(tmp_path: pathlib.Path):
    # What the Colab cells do (a non-editable pip install of the repository, here from this clone instead of the
    # URL), into a folder of its own: the installed package (kernels/ mapped to moejax.kernels, no source tree beside
    # it) must serve every moejax import of the notebooks, on whichever Python runs the suite (CI runs it on 3.11
    # and on 3.12 with the newest packages, as Colab has).
    import subprocess
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    imports = _moejax_imports()
    assert len(imports) >= 5, imports
    code = "\n".join(["import moejax", *imports, "print(moejax.__file__)"])
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target)), out.stdout
