"""FeatureQueue: equals a reference list model of a ring buffer; checkpointed; bad input."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vlp_codebook.models.teachers import FeatureQueue
from vlp_codebook.registry import MODELS


@given(size=st.integers(1, 9), batches=st.lists(st.integers(0, 20), max_size=8), with_ids=st.booleans())
def test_queue_after_any_enqueues_equals_a_reference_list(size, batches, with_ids):
    dim = 2
    queue = FeatureQueue(size, dim, with_ids=with_ids)
    reference = []                       # (row, id) pairs, oldest first, at most `size`
    counter = 0
    for n in batches:
        feats = torch.arange(counter, counter + n, dtype=torch.float32)[:, None].repeat(1, dim)
        feats[:, 1] *= -1
        ids = torch.arange(counter, counter + n) * 10 if with_ids else None
        queue.enqueue(feats, ids=ids)
        for i in range(n):
            reference.append((feats[i].tolist(), counter * 10 + i * 10))
            if len(reference) > size:
                reference.pop(0)
        counter += n
        assert len(queue) == len(reference)
        assert queue.features().tolist() == [row for row, _ in reference]
        if with_ids:
            assert queue.get_ids().tolist() == [i for _, i in reference]
    assert int(queue.ptr) == sum(batches) % size
    assert queue.is_full == (sum(batches) >= size)


def test_unfilled_rows_are_never_returned():
    queue = FeatureQueue(6, 3)
    assert queue.features().shape == (0, 3)
    queue.enqueue(torch.ones(2, 3))
    assert queue.features().shape == (2, 3)
    assert torch.equal(queue.features(), torch.ones(2, 3))


def test_features_is_a_copy_that_survives_later_enqueues():
    queue = FeatureQueue(3, 1)
    queue.enqueue(torch.tensor([[1.0], [2.0]]))
    before = queue.features()
    queue.enqueue(torch.tensor([[3.0], [4.0]]))
    assert before.flatten().tolist() == [1.0, 2.0]
    assert queue.features().flatten().tolist() == [2.0, 3.0, 4.0]


def test_state_lives_in_buffers_and_round_trips():
    queue = FeatureQueue(4, 2, with_ids=True)
    queue.enqueue(torch.randn(5, 2), ids=torch.arange(5))
    assert set(queue.state_dict()) == {'feats', 'ids', 'ptr', 'num_valid'}
    restored = FeatureQueue(4, 2, with_ids=True)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.features(), queue.features())
    assert restored.get_ids().tolist() == [1, 2, 3, 4]
    restored.reset()
    assert len(restored) == 0 and restored.features().shape == (0, 2)


def test_low_precision_input_is_stored_in_fp32():
    queue = MODELS.build(dict(type='FeatureQueue', size=3, dim=2))
    queue.enqueue(torch.ones(1, 2, dtype=torch.bfloat16))
    assert queue.features().dtype == torch.float32


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match='size'):
        FeatureQueue(0, 4)
    queue = FeatureQueue(4, 3, with_ids=True)
    with pytest.raises(ValueError, match=r'\(N, 3\)'):
        queue.enqueue(torch.randn(2, 4), ids=torch.arange(2))
    with pytest.raises(ValueError, match='NaN'):
        queue.enqueue(torch.tensor([[0.0, float('nan'), 1.0]]), ids=torch.arange(1))
    with pytest.raises(ValueError, match='ids is required'):
        queue.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match='ids must be an integer tensor'):
        queue.enqueue(torch.randn(2, 3), ids=torch.zeros(2))
    with pytest.raises(ValueError, match='ids must be an integer tensor'):
        queue.enqueue(torch.randn(2, 3), ids=torch.arange(3))
    with pytest.raises(ValueError, match='with_ids=False'):
        FeatureQueue(4, 3).enqueue(torch.randn(2, 3), ids=torch.arange(2))
    with pytest.raises(RuntimeError, match='with_ids=False'):
        FeatureQueue(4, 3).get_ids()
    assert len(queue) == 0                   # nothing was enqueued by the failed calls
