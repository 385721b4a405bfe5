import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # tests import `tasks` and `scripts` from the checkout
    sys.path.insert(0, REPO)


def pytest_configure(config):
    # `bash scripts/test.sh -m "not slow"` runs the fast tests only; CI runs all.
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 cores (CI runs it; deselect with -m 'not slow')")
