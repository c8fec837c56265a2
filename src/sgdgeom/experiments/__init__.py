"""Experiments: configs, the runner, and (later) sweeps, the result store and plots."""
