"""``python -m vtvc_pyro ...`` is the ``vtvc`` command. Under ``torchrun --nproc_per_node=K -m vtvc_pyro run
CONFIG`` every process runs the experiment: the SVI fits, pre-trained features and evaluations are split
across the processes (:mod:`vtvc_pyro.distributed`) and rank 0 alone writes the run directory."""

from vtvc_pyro.cli import main

if __name__ == "__main__":
    main()
