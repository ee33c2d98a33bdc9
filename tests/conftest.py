import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    # For modules of small tensors: on a shared 2-core machine two OpenMP threads cost more in
    # barriers than they save (tens of ms per op under load). Restored for the other modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits():
    """The digits CNN trained in FP32 (98.7%) and its data, shared by the modules that need it.
    Callers must not modify the model: qcompile's entry points work on copies."""
    from qcompile.testing.models import train_digits_cnn

    return train_digits_cnn()
