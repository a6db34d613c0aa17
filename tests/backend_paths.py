"""The `backend_path` fixture, shared by the parity tests: each test that takes it runs twice, with
mlx_aim.backend's CPU workarounds and on the portable path (what Metal and CUDA run), so the CPU covers both."""

import pytest

from mlx_aim.backend import cpu_workarounds


@pytest.fixture(params=[True, False], ids=["cpu-workarounds", "portable"])
def backend_path(request) -> bool:
    """True: the CPU workarounds; False: the portable path."""
    with cpu_workarounds(request.param):
        yield request.param
