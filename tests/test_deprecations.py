"""The old spellings of the previous release still work for one release: each warns with
its new spelling and gives the same numbers as the new one."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from sgdgeom._deprecated import SgdgeomDeprecationWarning
from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.experiments.config import parse_config
from sgdgeom.metric import DiffusionMetric
from sgdgeom.optim import DiffusionMetricSGD, PartialLocalEntropy
from tests.cases import make_case


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def two_steps(**options) -> torch.Tensor:
    case = make_case("mlp-relu")
    opt = DiffusionMetricSGD(case.model, lr=0.1, momentum=0.5, **options)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(case.model(case.x), case.y).backward()
        opt.step()
    return flat(case.model)


def test_old_optimizer_keywords_warn_and_step_the_same():
    new = two_steps(inverse="exact", eps_fraction=0.3, sync="host", fused="off")
    with pytest.warns(SgdgeomDeprecationWarning, match="inverse='exact'"):
        old = two_steps(mode="exact", safety=0.3, host_sync=True, fused=False)
    torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_old_optimizer_state_loads_under_the_new_keys():
    case = make_case("mlp-relu")
    opt = DiffusionMetricSGD(case.model, lr=0.1, inverse="exact", eps_fraction=0.3)
    state = opt.state_dict()
    group = state["param_groups"][0]
    group["mode"], group["safety"] = group.pop("inverse"), group.pop("eps_fraction")
    again = DiffusionMetricSGD(make_case("mlp-relu").model, lr=0.1)
    again.load_state_dict(state)
    assert again.param_groups[0]["inverse"] == "exact"
    assert again.param_groups[0]["eps_fraction"] == 0.3


def test_old_metric_keywords_warn_and_agree():
    case = make_case("mlp-tanh")
    D = DiffusionMatrix(case.model, case.loss, (case.x, case.y))
    metric = DiffusionMetric(D, "auto", 0.3)
    with pytest.warns(SgdgeomDeprecationWarning, match="eps_fraction"):
        old = DiffusionMetric(D, "auto", safety=0.3)
    assert old.eps == metric.eps
    with pytest.warns(SgdgeomDeprecationWarning, match="inverse='weak'"):
        weak = metric.gradient(exact=False)
    torch.testing.assert_close(weak, metric.gradient("weak"), rtol=0, atol=0)
    with pytest.warns(SgdgeomDeprecationWarning, match="sync='device'"):
        assert DiffusionMetric(D, 1e-6, host_sync=False).sync == "device"


def test_old_cache_and_batching_spellings():
    case = make_case("mlp-relu")
    with pytest.warns(SgdgeomDeprecationWarning, match="cache='memory'"):
        D = DiffusionMatrix(case.model, case.loss, (case.x, case.y), cache=True)
    assert D.products.storage == "memory"
    with pytest.warns(SgdgeomDeprecationWarning, match="batching='naive'"):
        ple = PartialLocalEntropy(case.model, layers=["fc1"], R=0.1, route="naive")
    with pytest.warns(SgdgeomDeprecationWarning, match="PartialLocalEntropy.batching"):
        assert ple.route == "naive"


@pytest.mark.parametrize(
    ("module", "name", "new"),
    [
        ("sgdgeom.eigen", "top_eigenpairs", "sgdgeom.linalg"),
        ("sgdgeom.diffusion", "conjugate_gradients", "sgdgeom.linalg"),
        ("sgdgeom.monitor", "LayerTemperature", "sgdgeom.monitors"),
        ("sgdgeom.monitor", "analyse_regimes", "sgdgeom.monitors.regimes"),
        ("sgdgeom.steady_state", "SteadyStateMonitor", "sgdgeom.monitors"),
        ("sgdgeom.hessian", "alignment", "sgdgeom.alignment"),
        ("sgdgeom.hessian", "AlignmentMonitor", "sgdgeom.monitors"),
    ],
)
def test_moved_names_resolve_with_a_warning(module, name, new):
    with pytest.warns(SgdgeomDeprecationWarning, match=new.replace(".", r"\.")):
        found = getattr(importlib.import_module(module), name)
    target = {"SteadyStateMonitor": "CurrentMonitor"}.get(name, name)
    assert found is getattr(importlib.import_module(new), target)
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(module), "no_such_name")  # noqa: B009


def test_old_config_spellings_parse_to_the_new_config():
    base = {
        "name": "x",
        "data": {"name": "digits"},
        "model": {"name": "mlp"},
        "train": {"epochs": 1},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = parse_config(
            {
                **base,
                "optimizer": {"name": "diffusion-sgd", "lr": 0.1, "mode": "exact", "safety": 0.3},
                "monitor": {"snr": True, "trace_every": 2, "current_every": 1, "probe_size": 64},
            }
        )
    assert sum(issubclass(w.category, SgdgeomDeprecationWarning) for w in caught) >= 4
    new = parse_config(
        {
            **base,
            "optimizer": {
                "name": "diffusion-metric-sgd",
                "lr": 0.1,
                "inverse": "exact",
                "eps_fraction": 0.3,
            },
            "monitor": {
                "probe_size": 64,
                "temperature": {"snr": True, "trace_every": 2},
                "current": {"every": 1},
            },
        }
    )
    assert old == new
    assert new.optimizer.fused == "off"  # the temperature monitor reads .grad


def test_old_loss_key():
    base = {
        "name": "x",
        "data": {"name": "digits"},
        "model": {"name": "mlp"},
        "train": {"epochs": 1},
        "optimizer": {"name": "sgd", "lr": 0.1},
    }
    with pytest.warns(SgdgeomDeprecationWarning, match="'batching'"):
        old = parse_config({**base, "loss": {"name": "pla", "R": 0.1, "route": "split"}})
    assert old.loss.batching == "split"
