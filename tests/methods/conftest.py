import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The method tests run tiny tensors: one intra-op thread avoids OpenMP wake-ups, which on a
    shared 2-core machine cost far more than the work. Restored afterwards for the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
