import warnings
import pytest

warnings.filterwarnings('ignore', message='.*torch.jit.script.*')

def pytest_configure(config):
    config.addinivalue_line('filterwarnings', 'ignore:.*torch.jit.script.*:FutureWarning')
    config.addinivalue_line('markers', 'slow: long-running test (skipped with `-m "not slow"`; CI runs everything)')

@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same random state"
    import torch, random
    import numpy as np
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    yield
