"""CrypTen's own MPC tests on the replicated backend: a conformance suite (slow set).

The crypten wheel installs its upstream unit tests as the top-level ``test`` package; here
its ``TestMPC`` runs in three processes with ``cfg.mpc.protocol = "rss"``, so every
``MPCTensor`` op it checks (arithmetic, division, matmul, convolutions, comparisons, ...)
goes through this project's backend. Those processes are CrypTen's own (no secure links),
so they use CrypTen's generators: this suite checks correctness, not security.

    python -m pytest tests/test_crypten_conformance.py -m slow [-k test_div]
"""

import importlib
import importlib.util
import os
import sys

import pytest

import cipherdm_torch  # noqa: F401  (CrypTen compatibility first)
import crypten
from crypten.config import cfg

from cipherdm_torch.mpc import prg
from cipherdm_torch.protocols.replicated import backend as rss_backend


def _upstream():
    """CrypTen's ``test`` package (Python's own ``test`` package shadows it on sys.path)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(crypten.__file__)), "test")
    if not os.path.exists(os.path.join(folder, "test_mpc.py")):
        pytest.skip("CrypTen's upstream tests are not installed", allow_module_level=True)
    current = sys.modules.get("test")
    if current is None or os.path.dirname(getattr(current, "__file__", "") or "") != folder:
        for name in [m for m in sys.modules if m == "test" or m.startswith("test.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "test", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules["test"] = module
        spec.loader.exec_module(module)
    return (importlib.import_module("test.test_mpc"),
            importlib.import_module("test.multiprocess_test_case").MultiProcessTestCase)


upstream, MultiProcessTestCase = _upstream()

rss_backend.install()  # runs in CrypTen's spawned test processes too (they import this module)
prg.allow_insecure_generators()


@pytest.mark.slow
class TestCryptenMPCOnRSS(MultiProcessTestCase, upstream.TestMPC):
    def setUp(self):
        self._original_protocol = cfg.mpc.protocol
        cfg.mpc.protocol = rss_backend.NAME
        super().setUp(world_size=3)

    def tearDown(self):
        cfg.mpc.protocol = self._original_protocol
        super().tearDown()

    @classmethod
    def setUpClass(cls):  # already wrapped below
        pass


# CrypTen wraps each test in setUpClass so that the main process joins its spawned parties;
# pytest binds the test methods before setUpClass runs, so wrap them up front.
for _name in [n for n in dir(TestCryptenMPCOnRSS) if n.startswith("test")]:
    setattr(TestCryptenMPCOnRSS, _name,
            MultiProcessTestCase.join_or_run(getattr(TestCryptenMPCOnRSS, _name)))
