# Shared pytest fixtures and helpers: tiny SmolLM2-shaped checkpoints in the official layout,
# written by tiny.write_tiny_checkpoint (no network, no files outside the repository).
import contextlib
import os

os.environ.setdefault("TQDM_DISABLE", "1")        # keep test logs readable
os.environ["HF_HUB_OFFLINE"] = "1"                # tests never touch the network (before huggingface_hub reads it)

import pytest  # noqa: E402
import torch  # noqa: E402

from lib import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gqa"), shape="gqa", seed=0)


@pytest.fixture(scope="session")
def tiny_mha_dir(tmp_path_factory):
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mha"), shape="mha", seed=1)


def hf_model(path):
    """transformers' LlamaForCausalLM, float32: the reference the tests compare with (skipped without it)."""
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@contextlib.contextmanager
def one_thread():
    # tiny models are dominated by per-op overhead, which extra threads only add to
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
