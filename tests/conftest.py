"""Shared fixtures: tiny randomly initialised pipelines, built once per test session."""

import os

import pytest
import torch

# Quiet the expected warnings (BERT text encoder in an SD pipeline, no torchvision) before diffusers loads.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_flush_denormal(True)
# Tiny models gain nothing from a second thread, and on a shared 2-core machine a busy second core makes
# every multi-threaded op wait a scheduler tick (measured: 2 s instead of 20 ms per tiny-UNet call).
torch.set_num_threads(int(os.environ.get("ERASEKIT_TEST_THREADS", "1")))
TEST_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _test_threads():
    """Each test starts at the test thread count: a command run in-process (`erasekit.runtime.setup`, the bench)
    picks threads from the load average, and results that compare float bits across two batch shapes (a cache
    reused after `n` grows) must not see that choice leak in from an earlier test."""
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)
    yield


@pytest.fixture(scope="session")
def tiny_sd1():
    """SD-1.x-shaped (CLIP text width 768), random weights; do not modify in place."""
    from erasekit.models.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline("sd1")


@pytest.fixture(scope="session")
def sd1_folder(tiny_sd1, tmp_path_factory):
    """The tiny SD-1 pipeline saved as a diffusers folder (for the CLI's --model)."""
    folder = tmp_path_factory.mktemp("sd1-folder") / "tiny-sd1"
    tiny_sd1.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd2():
    """SD-2.x-shaped (text width 1024, linear projections, "!" padding), random weights; do not modify."""
    from erasekit.models.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline("sd2")


@pytest.fixture(scope="session")
def tiny_sd2_v():
    """SD-2.x-shaped with a v-prediction scheduler (as SD-2.1 at 768 px), random weights; do not modify."""
    from erasekit.models.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline("sd2", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def toy_random():
    """The embedded world's architecture with random weights (MiniLM text encoder); do not modify."""
    from erasekit.toy.pipeline import build_toy_pipeline

    return build_toy_pipeline(None)


@pytest.fixture(scope="session", params=["sd1", "sd2", "toy"])
def any_pipe(request):
    return request.getfixturevalue({"sd1": "tiny_sd1", "sd2": "tiny_sd2", "toy": "toy_random"}[request.param])


@pytest.fixture(scope="session")
def tiny_sdxl():
    """SDXL-shaped (two CLIP encoders 32 + 64 wide, pooled projection, time ids), random weights; do not modify."""
    from erasekit.models.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline("sdxl")
