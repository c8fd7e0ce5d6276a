import warnings
import pytest

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore:.*torch.jit.script.*:FutureWarning")
    config.addinivalue_line("markers", 'slow: long-running test (skipped with `-m "not slow"`; CI runs everything)')


@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same random state"
    import torch, random
    import numpy as np

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def one_thread():
    "One torch thread for the test (exact comparisons of runs; the depthwise speed path's thread rule)"
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
