"""A tiny generated dataset shared by the training tests."""

import pytest


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
    from sparsehead.data import ensure_dataset

    root = tmp_path_factory.mktemp("data") / "synthetic"
    ensure_dataset(root, num_train=8, num_val=4, image_size=64, num_classes=3, seed=0)
    return root
