# Shared pytest fixtures: tiny SmolLM2-shaped checkpoints in the official layout, written by
# model.write_tiny_checkpoint (no network, no ../shared).
import os
import pytest

os.environ.setdefault("RIGSA_NO_PROGRESS", "1")   # keep test logs readable
os.environ.setdefault("HF_HUB_OFFLINE", "1")      # tests never touch the network


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    import model
    return model.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gqa"), shape="gqa", seed=0)


@pytest.fixture(scope="session")
def tiny_mha_dir(tmp_path_factory):
    import model
    return model.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mha"), shape="mha", seed=1)
