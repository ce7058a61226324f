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


def test_state_dict_that_does_not_fit_the_queue_is_refused_naming_the_key():
    # Issue 10: ptr=50, num_valid=99 on a queue of 7 used to load and return 99 rows.
    queue = FeatureQueue(7, 2)
    state = queue.state_dict()
    state['ptr'], state['num_valid'] = torch.tensor(50), torch.tensor(99)
    with pytest.raises(ValueError, match=r'ptr = 50 does not fit this FeatureQueue \(size=7\)'):
        queue.load_state_dict(state)
    state['ptr'] = torch.tensor(3)
    with pytest.raises(ValueError, match=r'num_valid = 99 .* must lie in \[0, 7\]'):
        queue.load_state_dict(state)
    with pytest.raises(ValueError, match=r'image_queue\.ptr = -1'):   # the prefix of a parent model
        parent = torch.nn.Module()
        parent.image_queue = FeatureQueue(7, 2)
        parent.load_state_dict({'image_queue.' + k: v for k, v in
                                dict(state, ptr=torch.tensor(-1), num_valid=torch.tensor(2)).items()})
    assert len(queue) == 0 and queue.features().shape == (0, 2)  # nothing was loaded


def test_loaded_pointers_are_used_without_reading_the_buffers():
    queue = FeatureQueue(5, 2, with_ids=True)
    queue.enqueue(torch.arange(12.0).view(6, 2), ids=torch.arange(6))
    restored = FeatureQueue(5, 2, with_ids=True)
    restored.load_state_dict(queue.state_dict())
    # the host-side copies of ptr / num_valid follow the loaded buffers
    assert len(restored) == 5 and restored.counter('ptr') == int(queue.ptr) == 1
    assert restored.get_ids().tolist() == [1, 2, 3, 4, 5]
    restored.enqueue(torch.zeros(1, 2), ids=torch.tensor([6]))
    assert restored.get_ids().tolist() == [2, 3, 4, 5, 6] and int(restored.ptr) == 2
