"""The layout of README's "Layout" section: imports run one way, hub_access <- schedulers <- pipelines <- image_data /
command_line <- checkpoints / evaluation <- training <- the two scripts, and a script never imports the other."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LEVEL = {
    "hub_access": 0,
    "schedulers": 1,
    "pipelines": 2,
    "image_data": 3,
    "command_line": 3,
    "checkpoints": 4,
    "evaluation": 4,
    "training": 5,
}
SCRIPTS = ("train_ddpm", "evaluate_ddpm")


def first_party_imports(path: Path) -> set[str]:
    """The first-party top-level names that `path` imports (at any depth in the file, lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & (set(LEVEL) | set(SCRIPTS))


def product_files() -> list[tuple[str, Path]]:
    files = [(package, path) for package in LEVEL for path in sorted((REPO / package).glob("*.py"))]
    return files + [(script, REPO / f"{script}.py") for script in SCRIPTS]


@pytest.mark.parametrize("room, path", product_files(), ids=lambda value: str(value).replace(str(REPO), ""))
def test_imports_run_one_way(room, path):
    for imported in first_party_imports(path) - {room}:
        assert imported not in SCRIPTS, f"{path.name} imports the script {imported}"
        if room in LEVEL:
            assert LEVEL[imported] < LEVEL[room], (
                f"{room}/{path.name} imports {imported}, a room at its level or above"
            )


def test_the_check_sees_a_wrong_way_import(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from image_data.sources import digits_dataset\n    import evaluate_ddpm\n")
    assert first_party_imports(module) == {"image_data", "evaluate_ddpm"}


def test_no_test_touches_accelerates_private_state():
    """Tests isolate accelerate's process-wide state with `@pytest.mark.fresh_process` (tests/conftest.py)."""
    private = "AcceleratorState." + "_reset_state"  # split, so that this file does not match itself
    assert [path.name for path in sorted((REPO / "tests").glob("*.py")) if private in path.read_text()] == []
