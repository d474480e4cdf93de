"""Shared test set-up: offline, seeded, and a clean Pyro param store for every test."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Triton kernels run on CPU tensors through the interpreter; this must precede the first `import triton`.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# The models under test are tiny: one thread is faster than two and immune to a busy neighbour.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The ``micro`` zoo, built once per test session into a session temp dir (``$VTVC_CACHE_DIR``)."""
    from vtvc_pyro.zoo import load_zoo

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VTVC_CACHE_DIR", str(tmp_path_factory.mktemp("vtvc_cache")))
        yield load_zoo("micro")
