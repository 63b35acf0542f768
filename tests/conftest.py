"""Suite-wide settings: offline, no W&B network, deterministic single-threaded torch."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads_session():
    """Also before module/session fixtures (shared reference runs): a function-scoped autouse fixture runs after
    them, so a reference trained with the default thread count differed in the last float32 bits of its grads."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _torch_threads(_torch_threads_session):
    torch.set_num_threads(1)
    yield


@pytest.fixture
def assets_dir() -> str:
    return ASSETS
