"""Bad input to a tower is rejected with a message naming the argument, before any computation."""
import pytest
import torch

from sparsehead import DynamicTower


@pytest.fixture
def tower():
    return DynamicTower(8, 1, gn_groups=4, num_levels=3)


def _feats(sizes=((8, 8), (4, 4), (2, 2)), channels=8, batch=2):
    return [torch.randn(batch, channels, *s) for s in sizes]


def test_wrong_number_of_levels(tower):
    with pytest.raises(ValueError, match="3 levels, got 2"):
        tower(_feats()[:2])


def test_not_a_list(tower):
    with pytest.raises(TypeError, match="list of 3 tensors"):
        tower(torch.randn(2, 8, 8, 8))


def test_channel_mismatch(tower):
    feats = _feats()
    feats[1] = torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match=r"features\[1\] must have 8 channels, got 5"):
        tower(feats)


def test_sizes_must_halve(tower):
    with pytest.raises(ValueError, match=r"features\[2\] must be half the size.*expected spatial size \(2, 2\)"):
        tower(_feats(sizes=((8, 8), (4, 4), (3, 2))))


def test_odd_sizes_round_up(tower):
    out = tower(_feats(sizes=((7, 9), (4, 5), (2, 3))))
    assert [tuple(o.shape[2:]) for o in out] == [(7, 9), (4, 5), (2, 3)]


def test_batch_mismatch(tower):
    feats = _feats()
    feats[2] = torch.randn(1, 8, 2, 2)
    with pytest.raises(ValueError, match=r"features\[2\] has batch size 1 but features\[0\] has 2"):
        tower(feats)


def test_integer_input(tower):
    feats = _feats()
    feats[0] = feats[0].long()
    with pytest.raises(TypeError, match=r"features\[0\] must be floating point"):
        tower(feats)


def test_wrong_ndim(tower):
    with pytest.raises(ValueError, match=r"features\[0\] must have shape \(N, C, H, W\)"):
        tower([torch.randn(2, 8, 8, 8, 8)] + _feats()[1:])


def test_unknown_execution_mode(tower):
    with pytest.raises(ValueError, match="execution must be one of"):
        tower.set_execution("fast")
    with pytest.raises(ValueError, match="execution must be one of"):
        DynamicTower(8, 1, gn_groups=4, execution="gpu")
