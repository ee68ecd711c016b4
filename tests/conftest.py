import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist (pyproject addopts): one core per worker, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate's process-wide state (precision, device) reset after every test that built an
    Accelerator, so that one test's bf16 run does not refuse the next test's float32 one (the order of
    tests on a pytest-xdist worker varies)."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# The files whose tests take longest in all (measured with --durations: the 2-process runs, the kill-and-resume
# runs), handed to the xdist workers first: with --dist loadfile a long file dealt last leaves one worker alone
# at the end (pyproject addopts turns off xdist's own order, which deals the files with the most tests first).
LONGEST_FIRST = ("test_distributed.py", "test_resume.py", "test_recipes.py", "test_budgets.py", "test_forward.py",
                 "test_train_loop.py", "test_demos.py", "test_bench_scale.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
