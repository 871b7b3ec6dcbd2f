"""Fixtures of the training-app tests."""
import pytest

from minorsft.train import tiny


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small synthetic task set (train / eval / chat JSONL paths), read-only: shared by the
    test files that do not make their own."""
    return tiny.write_synthetic_dataset(str(tmp_path_factory.mktemp("synth-shared")), n_train=30, n_eval=4,
                                        seed=29)
