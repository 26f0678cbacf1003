"""Test model: kills its tritonserver on every request, as a request that crashes Triton would
(tests/e2e/test_front_differential.py checks that `serve` logs which request was in flight)."""

import os
import signal


class TritonPythonModel:
    def execute(self, requests):
        os.kill(os.getppid(), signal.SIGKILL)
        return []
