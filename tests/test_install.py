"""The library as others install it: core requirements only, extras named when missing,
a wheel that builds, and a version."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sgdgeom

ROOT = Path(__file__).parents[1]
OPTIONAL = (
    "sklearn",
    "mlxtend",
    "mnist1d",
    "kornia",
    "pytorch_optimizer",
    "ray",
    "lightning",
    "numba",
)

WITHOUT_EXTRAS = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import torch
import sgdgeom
from sgdgeom import DiffusionMatrix, DiffusionMetricSGD
model = torch.nn.Linear(3, 2).double()
x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
print("rank", DiffusionMatrix(model, "cross_entropy", (x, y)).rank())
from sgdgeom import PartialLocalEntropy
print("pla", float(PartialLocalEntropy(model, R=0.1, y=2)(x, y)) > 0)
from sgdgeom.data import load_dataset
try:
    load_dataset("digits")
except sgdgeom.MissingExtraError as err:
    print("error", err)
from sgdgeom.data import augmentation
try:
    augmentation("cifar10-crop")
except ImportError as err:
    print("error", err)
"""


def test_core_works_without_any_extra_and_names_the_missing_one():
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "rank 4",  # two classes: the per-sample gradients span 4 of the 8 dimensions
        "pla True",  # without numba, the same draws from torch integer operations
        "error the digits dataset needs scikit-learn, which is not installed: "
        "pip install 'sgdgeom[data]'",
        "error the image augmentations needs kornia, which is not installed: "
        "pip install 'sgdgeom[augment]'",
    ]


@pytest.mark.slow
def test_wheel_builds_with_core_requirements_only(tmp_path):
    pytest.importorskip("build")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("sgdgeom-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
        assert "sgdgeom/integrations/lightning.py" in archive.namelist()
    core = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    names = {req.split(">")[0].split("=")[0].split("<")[0] for req in core}
    assert names == {"torch", "numpy", "scipy", "pyyaml", "pydantic", "typer", "tqdm",
                     "matplotlib"}  # fmt: skip
    assert "torch>=2.4" in core and f"Version: {sgdgeom.__version__}" in metadata


def test_version_on_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "sgdgeom", "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"sgdgeom {sgdgeom.__version__}"
