import os

# Paddle pins OpenMP to one thread on import unless told otherwise; tests use the machine's cores.
os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import paddle
    paddle.seed(0)
    np.random.seed(0)
    yield
