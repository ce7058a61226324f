"""MomentumTeacher: closed-form EMA, no gradient, modes, schedule, checkpointing, bad input."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from vlp_codebook.models.teachers import MomentumTeacher
from vlp_codebook.registry import MODELS


def _set_params(module: nn.Module, values):
    with torch.no_grad():
        for p, v in zip(module.parameters(), values):
            p.copy_(v)


@given(momentum=st.floats(0.0, 1.0), steps=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_after_n_updates_the_teacher_is_the_closed_form_ema(momentum, steps, seed):
    g = torch.Generator().manual_seed(seed)
    student = nn.Linear(3, 2).double()
    teacher = MomentumTeacher(student, momentum=momentum)
    theta0 = [p.detach().clone() for p in student.parameters()]
    history = []
    for _ in range(steps):
        values = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in student.parameters()]
        _set_params(student, values)
        history.append(values)
        assert teacher.update() == momentum
    # theta_N = m^N theta_0 + (1 - m) sum_k m^(N-k) theta_k
    for i, p in enumerate(teacher.module.parameters()):
        expected = momentum ** steps * theta0[i]
        for k, values in enumerate(history, start=1):
            expected = expected + (1 - momentum) * momentum ** (steps - k) * values[i]
        torch.testing.assert_close(p, expected, atol=1e-12, rtol=1e-12)
    assert int(teacher.num_updates) == steps


def test_teacher_is_a_frozen_copy_never_trained_and_never_sharing_storage():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    teacher = MomentumTeacher(student)
    x = torch.randn(5, 4)
    out = teacher(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, student(x), atol=0, rtol=0)
    assert all(not p.requires_grad for p in teacher.parameters())
    # Not a submodule of the teacher: its state_dict holds only the copy and the counter.
    assert set(teacher.state_dict()) == {'num_updates', 'module.0.weight', 'module.0.bias',
                                         'module.2.weight', 'module.2.bias'}
    before = [p.clone() for p in teacher.parameters()]
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    student(x).pow(2).sum().backward()
    optimizer.step()
    for b, p in zip(before, teacher.parameters()):
        torch.testing.assert_close(p, b, atol=0, rtol=0)           # the optimizer did not touch it
    teacher.update(momentum=0.0)                                     # m = 0: an exact copy
    for s, p in zip(student.parameters(), teacher.module.parameters()):
        torch.testing.assert_close(p, s, atol=0, rtol=0)
        assert p.data_ptr() != s.data_ptr()


def test_sequence_of_modules_is_chained_and_dict_is_run_by_name():
    torch.manual_seed(0)
    encoder, projection = nn.Linear(4, 6), nn.Linear(6, 3)
    teacher = MomentumTeacher([encoder, projection], momentum=0.9)
    x = torch.randn(2, 4)
    torch.testing.assert_close(teacher(x), projection(encoder(x)), atol=0, rtol=0)
    torch.testing.assert_close(teacher.run(0, x), encoder(x), atol=0, rtol=0)
    both = MomentumTeacher({'visual': encoder, 'proj': projection})
    torch.testing.assert_close(both.run('proj', encoder(x)), projection(encoder(x)), atol=0, rtol=0)
    with pytest.raises(TypeError, match='run'):
        both(x)


def test_eval_mode_by_default_and_follow_mode_on_request():
    student = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    teacher = MomentumTeacher(student).train()
    assert teacher.training and not teacher.module.training
    x = torch.randn(4, 8)
    torch.testing.assert_close(teacher(x), teacher(x), atol=0, rtol=0)   # dropout off
    follow = MomentumTeacher(student, teacher_mode='follow').train()
    assert follow.module.training
    assert not follow.eval().module.training


def test_buffers_are_copied_or_averaged():
    student = nn.BatchNorm1d(3)
    with torch.no_grad():
        student.running_mean.fill_(2.0)
    copied = MomentumTeacher(student, momentum=0.5)
    averaged = MomentumTeacher(student, momentum=0.5, ema_buffers=True)
    with torch.no_grad():
        student.running_mean.fill_(4.0)
        student.num_batches_tracked.fill_(7)
    copied.update()
    averaged.update()
    assert torch.equal(copied.module.running_mean, torch.full((3,), 4.0))
    assert torch.equal(averaged.module.running_mean, torch.full((3,), 3.0))
    assert int(averaged.module.num_batches_tracked) == 7             # integers are copied


def test_cosine_schedule_rises_from_base_to_final():
    teacher = MomentumTeacher(nn.Linear(2, 2), momentum=0.99, momentum_schedule='cosine', total_steps=10)
    values = [teacher.current_momentum(k) for k in range(12)]
    assert values[0] == pytest.approx(0.99)
    assert values[5] == pytest.approx(0.995)
    assert values[10] == values[11] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:]))
    used = [teacher.update() for _ in range(3)]
    assert used == pytest.approx(values[:3])
    expected = 1 - 0.01 * (math.cos(math.pi * 2 / 10) + 1) / 2
    assert used[2] == pytest.approx(expected)


def test_state_dict_round_trip_restores_weights_and_counter():
    torch.manual_seed(0)
    student = nn.Linear(3, 3)
    teacher = MomentumTeacher(student, momentum=0.5)
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update()
    restored = MomentumTeacher(nn.Linear(3, 3), momentum=0.5)
    restored.load_state_dict(teacher.state_dict())
    assert int(restored.num_updates) == 1
    torch.testing.assert_close(restored.module.weight, teacher.module.weight, atol=0, rtol=0)
    # the schedule's host-side counter follows the loaded buffer, and counts on from it
    assert restored.counter('num_updates') == 1
    restored.update()
    assert restored.counter('num_updates') == int(restored.num_updates) == 2


def test_updates_follow_the_tensors_after_the_model_is_converted():
    # Pairs are matched once and kept; .to()/.double() replace buffer tensors, so the teacher
    # must match them again, or it would keep updating (from) the old ones.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = nn.BatchNorm1d(3)
            self.teacher = MomentumTeacher(self.student, momentum=0.5, ema_buffers=True)

    model = Model()
    model.teacher.update()
    model.double()
    with torch.no_grad():
        model.student.running_mean.fill_(4.0)
        model.student.weight.fill_(3.0)
    model.teacher.update()
    assert model.teacher.module.running_mean.dtype == torch.float64
    torch.testing.assert_close(model.teacher.module.running_mean, torch.full((3,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(model.teacher.module.weight, torch.full((3,), 2.0, dtype=torch.float64))


def test_wrapped_student_is_unwrapped_and_reset_copies_exactly():
    student = nn.Linear(3, 2)
    teacher = MomentumTeacher(nn.DataParallel(student))
    assert teacher.student is student
    with torch.no_grad():
        student.weight.mul_(3.0)
    teacher.reset()
    torch.testing.assert_close(teacher.module.weight, student.weight, atol=0, rtol=0)
    assert int(teacher.num_updates) == 0


def test_builds_from_the_registry_with_the_student_as_default_arg():
    student = nn.Linear(3, 2)
    teacher = MODELS.build(dict(type='MomentumTeacher', momentum=0.9), default_args=dict(student=student))
    assert isinstance(teacher, MomentumTeacher) and teacher.base_momentum == 0.9


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match='momentum'):
        MomentumTeacher(nn.Linear(2, 2), momentum=1.5)
    with pytest.raises(ValueError, match='total_steps'):
        MomentumTeacher(nn.Linear(2, 2), momentum_schedule='cosine')
    with pytest.raises(ValueError, match='momentum_schedule'):
        MomentumTeacher(nn.Linear(2, 2), momentum_schedule='linear')
    with pytest.raises(ValueError, match='teacher_mode'):
        MomentumTeacher(nn.Linear(2, 2), teacher_mode='train')
    with pytest.raises(TypeError, match='student'):
        MomentumTeacher('not a module')
    teacher = MomentumTeacher(nn.Linear(2, 2))
    with pytest.raises(ValueError, match='shape'):
        teacher.update(nn.Linear(2, 3))
    with pytest.raises(ValueError, match='structure'):
        teacher.update(nn.Sequential(nn.Linear(2, 2)))
