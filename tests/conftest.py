import contextlib
import os

import pytest
import torch

# Under pytest-xdist (`make test` runs two workers on this 2-core machine) each worker takes one
# core: two OpenMP threads per worker would spin against the other worker's.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@contextlib.contextmanager
def torch_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def one_thread():
    # For modules of small tensors: on a shared 2-core machine two OpenMP threads cost more in
    # barriers than they save (tens of ms per op under load). Restored for the other modules.
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def two_threads():
    # For modules whose bounds were measured on two threads (tests/test_onnx_export.py's end-to-end
    # code agreement depends on the trained weights, which depend on the float reductions' order).
    with torch_threads(2):
        yield


@pytest.fixture(scope="session")
def digits():
    """The digits CNN trained in FP32 (98.7%) and its data, shared by the modules that need it.
    Callers must not modify the model: qcompile's entry points work on copies."""
    from qcompile.testing.models import train_digits_cnn

    # trained on 2 threads under xdist too: the thread count changes the float reductions, so the
    # weights, and the end-to-end code agreement tests/test_onnx_export.py measured on them
    with torch_threads(2):
        return train_digits_cnn()
