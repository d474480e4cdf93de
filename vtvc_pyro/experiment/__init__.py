"""Experiments (``vtvc run``): typed YAML configs, the methods comparison, run directories, tables, plots."""

from vtvc_pyro.experiment.config import ConfigError, ExperimentConfig, load_config
from vtvc_pyro.experiment.rundir import RunDirectoryError
from vtvc_pyro.experiment.runner import run_experiment

__all__ = ["ConfigError", "ExperimentConfig", "RunDirectoryError", "load_config", "run_experiment"]
