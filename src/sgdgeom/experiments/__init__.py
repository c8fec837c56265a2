"""Experiments: configs, the training runner, sweeps and their result store, figures and
reports, and the experiment kinds of the papers, each a module registered under the name
of its ``sgdgeom`` subcommand (:data:`~sgdgeom.experiments.kinds.KINDS`).

Importing this package registers every built-in experiment kind: one import line per
module below.
"""

from sgdgeom.experiments import (  # noqa: F401 (registrations)
    demo,
    geodesic,
    noise,
    rbm,
    spectrum,
    steady_state,
    table1,
    temperature,
)
from sgdgeom.experiments.kinds import KINDS, ExperimentKind, RunContext, register_kind

__all__ = ["KINDS", "ExperimentKind", "RunContext", "register_kind"]
