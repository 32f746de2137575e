"""The README's example and the demo module stay runnable."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_demo_module_runs():
    out = subprocess.run([sys.executable, "-m", "moejax.demo"], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=300)
    assert "expert load" in out.stdout and "dropped=" in out.stdout


def test_ci_runs_the_readme_test_command():
    # The first command .ci/run runs is the README's test command, exactly; its second pass (Python 3.12, newest
    # packages) runs the same suite with the same pytest arguments.
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    first = next(line for line in commands if "pytest" in line)
    assert first in readme and first.startswith('python3 -m pip install -e ".[test]" && python3 -m pytest ')
    pytest_args = first.split("python3 -m pytest ", 1)[1]
    assert commands[-1] == f'"$venv/bin/python" -m pytest {pytest_args}'


def test_kernels_importable_as_moejax_kernels():
    import moejax.kernels  # noqa: F401
