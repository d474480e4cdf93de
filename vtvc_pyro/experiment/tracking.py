"""Live step logging of the SVI fits for TensorBoard (``vtvc run --report-to tensorboard``): every fit's
per-datum objective parts (:class:`~vtvc_pyro.inference.StepInfo`) under
``<run>/tensorboard/<method>/<problem>``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from vtvc_pyro import distributed
from vtvc_pyro.inference import STEP_FIELDS, StepInfo

REPORTERS = ("tensorboard",)


@contextlib.contextmanager
def tensorboard_steps(log_dir: Path) -> Iterator[Callable[[StepInfo], None]]:
    """A step callback writing each :class:`StepInfo` field as a scalar (rank 0 only), closed on exit."""
    if not distributed.is_main():
        yield lambda _info: None
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # pragma: no cover - the extra is part of the dev install
        raise ImportError("--report-to tensorboard needs TensorBoard: pip install 'vtvc_pyro[tensorboard]'") \
            from err
    writer = SummaryWriter(log_dir=str(log_dir))

    def write(info: StepInfo) -> None:
        for name in STEP_FIELDS:
            if name != "step":
                writer.add_scalar(name, getattr(info, name), info.step)

    try:
        yield write
    finally:
        writer.close()
