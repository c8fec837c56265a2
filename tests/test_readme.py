"""The README and the guide run: every Python block as it stands, every command line at
small size, and every page is well-formed Markdown.

The pages are ``README.md`` and ``docs/guide/*.md``; a block moved from one to another is
still run. Each Python block is self-contained and runs in a fresh namespace in a temporary
folder (a block shown on two pages runs once). Each ``.venv/bin/sgdgeom`` line of their
shell blocks is in :data:`COMMANDS`, which says how a test runs it: the same command on a
copy of its config trained for one epoch on a few samples (the full sizes are the pages'
own), or where else it is tested. A line missing from :data:`COMMANDS`, or an entry whose
line left every page, fails the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.test_cli import sgdgeom
from tests.test_data import make_mnist_root

ROOT = Path(__file__).parents[1]
LIGHTNING = ROOT / "docs/guide/lightning.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs/guide").glob("*.md"))]
MARKDOWN = [*PAGES, *sorted((ROOT / "docs").glob("*.md"))]


def blocks(language: str, text: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


PYTHON = list(
    dict.fromkeys(
        block for page in PAGES if page != LIGHTNING for block in blocks("python", page.read_text())
    )
)
LIGHTNING_PAGE = LIGHTNING.read_text()
LINES = sorted(
    {
        line.split("#")[0].strip()
        for page in PAGES
        for block in blocks("bash", page.read_text())
        for line in block.splitlines()
        if line.startswith(".venv/bin/sgdgeom")
    }
)

SMALL = {"train": {"epochs": 1}, "data": {"n_train": 128, "n_test": 64}}


def shrink(config: dict) -> dict:
    """A config (experiment, comparison base or sweep base) at one epoch on a few samples."""
    for section, values in SMALL.items():
        if isinstance(config.get(section), dict):
            config[section].update(values)
    if isinstance(config.get("base"), dict):
        shrink(config["base"])
    return config


def small_copy(tmp_path: Path, name: str, edit=shrink) -> Path:
    """``configs/NAME`` shrunk, at the same relative path under ``tmp_path``."""
    target = tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(edit(yaml.safe_load((ROOT / name).read_text()))))
    return target


def fashion_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_mnist_root(root, name="fashion-mnist", n=(64, 32))
    return root


def my_fashion(tmp_path: Path) -> None:
    config = shrink(yaml.safe_load((ROOT / "configs/quick/mnist5k-fc2-sgd.yaml").read_text()))
    config["data"] = {"name": "fashion-mnist", "batch_size": 32}
    (tmp_path / "my-fashion.yaml").write_text(yaml.safe_dump(config))


def quick(name: str):
    return lambda tmp_path: small_copy(tmp_path, f"configs/quick/{name}")


def sweep_two_runs(tmp_path: Path) -> None:
    def edit(config):
        shrink(config)
        config["grid"] = {"seed": [0]}
        config["variants"] = dict(list(config["variants"].items())[:2])
        for override in config["variants"].values():
            if isinstance(override, dict) and "grid" in override:
                override["grid"] = {k: v[:1] for k, v in override["grid"].items()}
        return config

    small_copy(tmp_path, "configs/quick/sweeps/musso-4.2-mnist5k-fc2.yaml", edit)


def rbm_small(tmp_path: Path) -> None:
    def edit(config):
        config.update(epochs=2, n_train=200)
        return config

    small_copy(tmp_path, "configs/quick/rbm/digits.yaml", edit)


def demo_checkpoint(tmp_path: Path) -> None:
    proc = sgdgeom(
        "train", small_copy(tmp_path, "configs/quick/mnist5k-fc2-sgd.yaml"),
        "--out", "runs/demo/runs/sgd", "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


RAY_TEST = "tests/test_sweep.py::test_ray_engine_stores_what_the_local_engine_stores"

# README line -> (a preparation in tmp_path, the arguments to run there instead of the
# line's own, or None to run the line's own) or a string naming where it is tested.
COMMANDS = {
    ".venv/bin/sgdgeom train configs/quick/mnist5k-fc2-sgd.yaml --out runs/mine": (
        quick("mnist5k-fc2-sgd.yaml"), None),
    ".venv/bin/sgdgeom train configs/quick/mnist5k-fc2-sgd.yaml --out runs/mine --resume": (
        quick("mnist5k-fc2-sgd.yaml"), None),
    ".venv/bin/sgdgeom datasets --data-root ~/data": (
        fashion_root, ["datasets", "--data-root", "data"]),
    ".venv/bin/sgdgeom train my-fashion.yaml --data-root ~/data": (
        lambda t: (fashion_root(t), my_fashion(t)),
        ["train", "my-fashion.yaml", "--data-root", "data", "--out", "runs/fashion"]),
    ".venv/bin/sgdgeom spectrum --model fc --dataset mnist5k --out runs/spectrum": (
        None, ["spectrum", "--model", "fc", "--dataset", "mnist5k", "--n", "200",
               "--out", "runs/spectrum"]),
    ".venv/bin/sgdgeom spectrum --model fc --model-option width=256 --dataset mnist5k --n "
    "1000 --k 10 --hessian --out runs/spectrum-top": (
        None, ["spectrum", "--model", "fc", "--dataset", "mnist5k", "--n", "60", "--k", "3",
               "--hessian", "--model-option", "width=64", "--out", "runs/spectrum-top"]),
    ".venv/bin/sgdgeom spectrum --checkpoint runs/demo/runs/sgd/checkpoint.pt --out "
    "runs/spectrum-trained": (demo_checkpoint, None),
    ".venv/bin/sgdgeom compare configs/quick/mnist5k-optimizers.yaml --out runs/optimizers": (
        quick("mnist5k-optimizers.yaml"), None),
    ".venv/bin/sgdgeom train configs/quick/mnist5k-fig1-relu.yaml --out runs/fig1-relu": (
        quick("mnist5k-fig1-relu.yaml"), None),
    ".venv/bin/sgdgeom temperature runs/fig1-relu": (
        lambda t: sgdgeom("train", quick("mnist5k-fig1-relu.yaml")(t), "--out", "runs/fig1-relu",
                          "--no-progress", cwd=t), None),
    ".venv/bin/sgdgeom rbm configs/quick/rbm/digits.yaml --out runs/digits-rbm": (
        rbm_small, None),
    ".venv/bin/sgdgeom sweep configs/quick/sweeps/musso-4.2-mnist5k-fc2.yaml --workers 2": (
        sweep_two_runs, None),
    ".venv/bin/sgdgeom sweep CONFIG --engine ray [--address HOST:PORT] [--workers N] "
    "[--gpus-per-run 1]": RAY_TEST,
    ".venv/bin/sgdgeom sweep CONFIG --set train.epochs=1758": (
        "tests/test_cli.py::test_sweep_command_runs_reports_and_refuses_bad_sweeps"),
    ".venv/bin/sgdgeom sweep CONFIG --only 'plea_R=0.01_*'": (
        "tests/test_cli.py::test_sweep_command_runs_reports_and_refuses_bad_sweeps"),
    ".venv/bin/sgdgeom report runs/musso-4.2-mnist5k-fc2": (
        lambda t: (sweep_two_runs(t), sgdgeom(
            "sweep", "configs/quick/sweeps/musso-4.2-mnist5k-fc2.yaml", cwd=t)), None),
    ".venv/bin/sgdgeom merge GPU_OUT --into runs/musso-4.2-mnist5k-fc2": (
        "tests/test_merge.py::test_merge_command"),
    ".venv/bin/sgdgeom archive runs/musso-4.2-mnist5k-fc2 --out fc2.json.xz": (
        "tests/test_archive.py::test_archive_command"),
    ".venv/bin/sgdgeom merge fc2.json.xz --into runs/musso-4.2-mnist5k-fc2": (
        "tests/test_archive.py::test_archive_command"),
    ".venv/bin/sgdgeom steady-state configs/quick/steady-state/aligned.yaml --out runs/steady": (
        quick("steady-state/aligned.yaml"), None),
    ".venv/bin/sgdgeom table1": (None, None),
    ".venv/bin/sgdgeom noise --model mlp --dataset digits --n 500 --out runs/noise": (None, None),
    ".venv/bin/sgdgeom noise --checkpoint runs/demo/runs/sgd/checkpoint.pt --k 5 --out "
    "runs/noise-trained": (
        demo_checkpoint, ["noise", "--checkpoint", "runs/demo/runs/sgd/checkpoint.pt", "--n",
                          "200", "--k", "5", "--out", "runs/noise-trained"]),
}  # fmt: skip


def test_every_readme_command_is_covered():
    assert sorted(LINES) == sorted(COMMANDS)


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(PYTHON[index], f"python block {index + 1} of the pages", "exec"), {})


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_are_well_formed_markdown(page):
    """Code fences pair up, and a closing fence is bare: a closing fence that carries text
    (```` ``` On one H100, ... ````) opens a new block instead, and turns the rest of the
    page into code. Relative links point at files that exist."""
    inside, opened = False, 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if not line.lstrip().startswith("```"):
            continue
        fence = line.strip()
        if inside:
            assert fence == "```", f"{page.name}:{number}: a closing fence carries text: {line!r}"
            inside = False
        else:
            assert re.fullmatch(r"```[\w+-]*", fence), f"{page.name}:{number}: {line!r}"
            inside, opened = True, number
    assert not inside, f"{page.name}:{opened}: a code block is never closed"
    for target in re.findall(r"\]\(([^)#:]+?)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name}: a link to {target} leads nowhere"


def test_lightning_page_runs(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch")
    monkeypatch.chdir(tmp_path)
    (code,) = blocks("python", LIGHTNING_PAGE)
    exec(compile(code, "docs/guide/lightning.md", "exec"), {})


@pytest.mark.slow
@pytest.mark.parametrize("line", [k for k, v in COMMANDS.items() if not isinstance(v, str)])
def test_command_runs(line, tmp_path):
    prepare, args = COMMANDS[line]
    if prepare is not None:
        prepare(tmp_path)
    args = args if args is not None else line.split()[1:]
    proc = sgdgeom(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_examples_elsewhere_exist():
    for line, where in COMMANDS.items():
        if isinstance(where, str):
            path, _, name = where.partition("::")
            assert f"def {name}(" in (ROOT / path).read_text(), line
