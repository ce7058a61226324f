"""MultiDirectionalDistillationLoss: distributions, targets, reference values, temperature, bad input."""
import itertools
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.functional import normalize

from vlp_codebook.models.losses.distillation import (DIRECTIONS, MultiDirectionalDistillationLoss,
                                                     ramped_alpha)
from vlp_codebook.models.teachers import FeatureQueue
from vlp_codebook.registry import MODELS

SUBSETS = [c for r in range(1, 5) for c in itertools.combinations(DIRECTIONS, r)]
MODALITIES = {'t2i': ('text', 'image'), 'i2t': ('image', 'text'), 'i2i': ('image', 'image'),
              't2t': ('text', 'text')}


def make_inputs(seed, batch, dim, num_queue_v, num_queue_t, with_ids):
    g = torch.Generator().manual_seed(seed)

    def unit(n):
        return normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1).float()

    inputs = dict(image_feats=unit(batch), text_feats=unit(batch), image_teacher_feats=unit(batch),
                  text_teacher_feats=unit(batch), image_queue=unit(num_queue_v), text_queue=unit(num_queue_t))
    if with_ids:
        # few distinct ids, so that batch and queue entries share them
        inputs['image_ids'] = torch.randint(0, 3, (batch,), generator=g)
        inputs['image_queue_ids'] = torch.randint(0, 3, (num_queue_v,), generator=g)
        inputs['text_queue_ids'] = torch.randint(0, 3, (num_queue_t,), generator=g)
    return inputs


def reference(direction, inputs, alpha, gamma):
    """Independent float64 loop: (loss, targets) of one direction, as the formulas in SPEC.md."""
    query, key = MODALITIES[direction]
    q = inputs[f'{query}_feats'].double().numpy()
    q_m = inputs[f'{query}_teacher_feats'].double().numpy()
    keys = np.concatenate([inputs[f'{key}_teacher_feats'].double().numpy(),
                           inputs[f'{key}_queue'].double().numpy()])
    batch = q.shape[0]
    ids = inputs.get('image_ids')
    if ids is not None:
        key_ids = list(ids.tolist()) + list(inputs[f'{key}_queue_ids'].tolist())
    total, targets = 0.0, []
    for i in range(batch):
        logits = [float(q[i] @ k) / gamma for k in keys]
        lse = max(logits) + math.log(sum(math.exp(s - max(logits)) for s in logits))
        positives = [j for j in range(len(keys)) if (key_ids[j] == ids[i] if ids is not None else j == i)]
        one_hot = [1.0 / len(positives) if j in positives else 0.0 for j in range(len(keys))]
        t_logits = [float(q_m[i] @ k) / gamma for k in keys]
        t_lse = max(t_logits) + math.log(sum(math.exp(s - max(t_logits)) for s in t_logits))
        y = [alpha * math.exp(t - t_lse) + (1 - alpha) * o for t, o in zip(t_logits, one_hot)]
        total -= sum(yj * (s - lse) for yj, s in zip(y, logits))
        targets.append(y)
    return total / batch, np.array(targets)


config = dict(seed=st.integers(0, 2**16), batch=st.integers(1, 6), dim=st.integers(2, 8),
              num_queue_v=st.integers(0, 7), num_queue_t=st.integers(0, 7), with_ids=st.booleans(),
              alpha=st.floats(0.0, 1.0), directions=st.sampled_from(SUBSETS))


@given(**config)
def test_every_prediction_and_target_row_is_a_distribution(seed, batch, dim, num_queue_v, num_queue_t,
                                                           with_ids, alpha, directions):
    loss_fn = MultiDirectionalDistillationLoss(directions=directions)
    inputs = make_inputs(seed, batch, dim, num_queue_v, num_queue_t, with_ids)
    out = loss_fn.distributions(**inputs, alpha=alpha)
    assert tuple(out) == tuple(d for d in DIRECTIONS if d in directions)
    for direction, (p, y) in out.items():
        num_keys = batch + (num_queue_v if MODALITIES[direction][1] == 'image' else num_queue_t)
        assert p.shape == y.shape == (batch, num_keys)
        assert p.dtype == y.dtype == torch.float32
        for dist_ in (p, y):
            assert (dist_ >= 0).all()
            torch.testing.assert_close(dist_.sum(1), torch.ones(batch), atol=1e-5, rtol=0)


@given(**config)
def test_enabled_directions_are_exactly_the_returned_terms(seed, batch, dim, num_queue_v, num_queue_t,
                                                           with_ids, alpha, directions):
    loss_fn = MODELS.build(dict(type='MultiDirectionalDistillationLoss', directions=list(directions)))
    losses = loss_fn(**make_inputs(seed, batch, dim, num_queue_v, num_queue_t, with_ids), alpha=alpha)
    assert set(losses) == {f'loss_{d}' for d in directions}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 6), num_queue=st.integers(0, 6),
       with_ids=st.booleans())
def test_alpha_zero_gives_exactly_the_multi_positive_targets(seed, batch, num_queue, with_ids):
    inputs = make_inputs(seed, batch, 4, num_queue, num_queue, with_ids)
    out = MultiDirectionalDistillationLoss().distributions(**inputs, alpha=0.0)
    for direction, (_, y) in out.items():
        key = MODALITIES[direction][1]
        expected = torch.zeros(batch, batch + num_queue)
        for i in range(batch):
            if with_ids:
                key_ids = torch.cat([inputs['image_ids'], inputs[f'{key}_queue_ids']])
                hits = (key_ids == inputs['image_ids'][i]).nonzero().flatten()
            else:
                hits = torch.tensor([i])
            expected[i, hits] = 1.0 / len(hits)
        assert torch.equal(y, expected), direction


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), num_queue_v=st.integers(0, 5),
       num_queue_t=st.integers(0, 5), with_ids=st.booleans(), alpha=st.floats(0.0, 1.0),
       gamma=st.floats(0.02, 0.5))
def test_losses_and_targets_match_an_independent_float64_reference(seed, batch, num_queue_v, num_queue_t,
                                                                    with_ids, alpha, gamma):
    inputs = make_inputs(seed, batch, 5, num_queue_v, num_queue_t, with_ids)
    loss_fn = MultiDirectionalDistillationLoss(temperature=gamma)
    losses = loss_fn(**inputs, alpha=alpha)
    targets = loss_fn.distributions(**inputs, alpha=alpha)
    for direction in DIRECTIONS:
        expected_loss, expected_targets = reference(direction, inputs, alpha, gamma)
        assert losses[f'loss_{direction}'].item() == pytest.approx(expected_loss, rel=1e-4, abs=1e-4)
        np.testing.assert_allclose(targets[direction][1].numpy(), expected_targets, atol=1e-5)


def test_each_direction_uses_its_own_queue():
    inputs = make_inputs(0, 4, 8, 5, 5, with_ids=False)
    loss_fn = MultiDirectionalDistillationLoss()
    base = loss_fn(**inputs)
    other_text_queue = dict(inputs, text_queue=make_inputs(1, 4, 8, 5, 5, False)['text_queue'])
    changed = loss_fn(**other_text_queue)
    # The text queue is in the denominators of i2t and t2t (not z_v^m', the slides' typo) only.
    assert changed['loss_t2t'] != base['loss_t2t'] and changed['loss_i2t'] != base['loss_i2t']
    assert changed['loss_t2i'] == base['loss_t2i'] and changed['loss_i2i'] == base['loss_i2i']


def test_feature_queue_brings_its_ids_as_positives():
    inputs = make_inputs(0, 2, 4, 0, 0, with_ids=False)
    queue = FeatureQueue(5, 4, with_ids=True)
    queue.enqueue(normalize(torch.randn(3, 4), dim=1), ids=torch.tensor([7, 8, 7]))
    out = MultiDirectionalDistillationLoss(directions=('t2i',)).distributions(
        **dict(inputs, image_queue=queue, text_queue=None), image_ids=torch.tensor([7, 9]), alpha=0.0)
    y = out['t2i'][1]
    assert torch.equal(y, torch.tensor([[1 / 3, 0, 1 / 3, 0, 1 / 3], [0, 1.0, 0, 0, 0]]))


def test_learnable_temperature_gets_a_gradient_and_is_clamped():
    loss_fn = MultiDirectionalDistillationLoss(temperature=0.07)
    assert isinstance(loss_fn.temperature, torch.nn.Parameter)
    inputs = make_inputs(0, 4, 8, 3, 3, with_ids=True)
    sum(loss_fn(**inputs).values()).backward()
    assert loss_fn.temperature.grad is not None and loss_fn.temperature.grad != 0
    with torch.no_grad():
        loss_fn.temperature.fill_(3.0)
    loss_fn(**inputs)
    assert loss_fn.temperature.item() == pytest.approx(0.5)
    fixed = MultiDirectionalDistillationLoss(temperature=0.1, learnable_temperature=False)
    assert list(fixed.parameters()) == [] and 'temperature' in fixed.state_dict()
    # an external temperature (e.g. shared with another loss) replaces the own one
    a = fixed(**inputs, temperature=0.2)
    b = MultiDirectionalDistillationLoss(temperature=0.2)(**inputs)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_student_gets_the_gradient_teacher_and_queue_do_not():
    inputs = make_inputs(0, 3, 6, 4, 4, with_ids=False)
    for name in ('image_feats', 'text_feats', 'image_teacher_feats', 'text_teacher_feats', 'image_queue'):
        inputs[name] = inputs[name].clone().requires_grad_()
    sum(MultiDirectionalDistillationLoss()(**inputs).values()).backward()
    assert inputs['image_feats'].grad.abs().sum() > 0 and inputs['text_feats'].grad.abs().sum() > 0
    for name in ('image_teacher_feats', 'text_teacher_feats', 'image_queue'):
        assert inputs[name].grad is None


def test_direction_weights_and_loss_weight_scale_the_terms():
    inputs = make_inputs(0, 3, 6, 2, 2, with_ids=False)
    base = MultiDirectionalDistillationLoss()(**inputs)
    weighted = MultiDirectionalDistillationLoss(direction_weights={'t2i': 2.0, 'i2i': 0.5},
                                                loss_weight=3.0)(**inputs)
    factors = {'t2i': 6.0, 'i2t': 3.0, 'i2i': 1.5, 't2t': 3.0}
    for d, f in factors.items():
        torch.testing.assert_close(weighted[f'loss_{d}'], f * base[f'loss_{d}'])


def test_intra_modal_only_needs_no_text_for_i2i():
    inputs = make_inputs(0, 3, 6, 2, 2, with_ids=False)
    loss_fn = MultiDirectionalDistillationLoss(directions=('i2i',))
    losses = loss_fn(image_feats=inputs['image_feats'], image_teacher_feats=inputs['image_teacher_feats'],
                     image_queue=inputs['image_queue'])
    assert list(losses) == ['loss_i2i']


def test_fp32_under_autocast_and_no_overflow_for_large_logits():
    inputs = make_inputs(0, 4, 8, 3, 3, with_ids=False)
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    loss_fn = MultiDirectionalDistillationLoss()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = loss_fn(**half)
    upcast = loss_fn(**{k: v.float() for k, v in half.items()})
    for k in low:
        assert low[k].dtype == torch.float32
        torch.testing.assert_close(low[k], upcast[k], atol=1e-5, rtol=1e-5)
    # unnormalised features of norm 1e3 with γ = 0.001: logits ~ 1e9, still finite
    big = {k: v * 1e3 if k.endswith(('feats', 'queue')) else v for k, v in inputs.items()}
    losses = MultiDirectionalDistillationLoss(normalize=False, temperature=0.001)(**big, alpha=0.4)
    assert all(torch.isfinite(v) for v in losses.values())


def test_ramped_alpha_follows_albef():
    assert ramped_alpha(0.4, 0, 100) == 0.0
    assert ramped_alpha(0.4, 50, 100) == pytest.approx(0.2)
    assert ramped_alpha(0.4, 150, 100) == pytest.approx(0.4)
    assert ramped_alpha(0.4, 3, 100, epoch=1) == pytest.approx(0.4)
    assert ramped_alpha(0.4, 3, 0) == 0.4  # no warm-up
    assert MultiDirectionalDistillationLoss(alpha=0.2).ramped_alpha(25, 100) == pytest.approx(0.05)
    with pytest.raises(ValueError, match='iterations_per_epoch'):
        MultiDirectionalDistillationLoss().ramped_alpha(3, 0)


def test_a_temperature_of_zero_is_an_error_not_a_nan_loss():
    # Issue 10: a fixed temperature of 0 loaded from a state dict gave NaN losses silently.
    inputs = make_inputs(seed=0, batch=4, dim=6, num_queue_v=3, num_queue_t=3, with_ids=False)
    fixed = MultiDirectionalDistillationLoss(learnable_temperature=False)
    with pytest.raises(ValueError, match=r'temperature = 0\.0: .* positive finite'):
        fixed.load_state_dict({'temperature': torch.tensor(0.0)})
    assert fixed.temperature.item() == pytest.approx(0.07)     # not loaded
    fixed.temperature.fill_(0.0)                               # set by hand: caught in forward
    with pytest.raises(ValueError, match='temperature must be a positive finite number'):
        fixed(**inputs)
    learnable = MultiDirectionalDistillationLoss()
    with torch.no_grad():
        learnable.temperature.fill_(float('nan'))              # clamping keeps a NaN
    with pytest.raises(ValueError, match='temperature must be a positive finite number'):
        learnable(**inputs)
    with pytest.raises(ValueError, match='temperature must be a positive finite number'):
        MultiDirectionalDistillationLoss()(**inputs, temperature=torch.tensor(0.0))


def test_a_tensor_alpha_gives_the_losses_of_the_same_float():
    inputs = make_inputs(seed=1, batch=4, dim=6, num_queue_v=3, num_queue_t=3, with_ids=False)
    loss_fn = MultiDirectionalDistillationLoss()
    as_float = loss_fn(**inputs, alpha=0.3)
    as_tensor = loss_fn(**inputs, alpha=torch.tensor(0.3))
    for name in as_float:
        torch.testing.assert_close(as_tensor[name], as_float[name])
    with pytest.raises(ValueError, match='alpha must be a number in'):
        loss_fn(**inputs, alpha=torch.tensor(1.5))


def test_bad_input_raises_clear_errors():
    inputs = make_inputs(0, 3, 6, 2, 2, with_ids=True)
    loss_fn = MultiDirectionalDistillationLoss()
    with pytest.raises(ValueError, match='feature dimensions differ'):
        loss_fn(**dict(inputs, text_feats=torch.randn(3, 5)))
    with pytest.raises(ValueError, match='same B pairs'):
        loss_fn(**dict(inputs, image_teacher_feats=torch.randn(4, 6)))
    nan = inputs['image_feats'].clone()
    nan[1, 2] = float('nan')
    with pytest.raises(ValueError, match='image_feats contains NaN'):
        loss_fn(**dict(inputs, image_feats=nan))
    with pytest.raises(ValueError, match='image_queue contains NaN'):
        loss_fn(**dict(inputs, image_queue=torch.full((2, 6), float('inf'))))
    with pytest.raises(ValueError, match='temperature'):
        MultiDirectionalDistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match='temperature'):
        MultiDirectionalDistillationLoss(temperature=-0.1)
    with pytest.raises(ValueError, match='temperature'):
        loss_fn(**inputs, temperature=0.0)
    with pytest.raises(ValueError, match='alpha'):
        loss_fn(**inputs, alpha=1.5)
    with pytest.raises(ValueError, match='directions'):
        MultiDirectionalDistillationLoss(directions=('i2p',))
    with pytest.raises(ValueError, match=r"need \['text_feats'\]"):
        loss_fn(**dict(inputs, text_feats=None))
    with pytest.raises(ValueError, match='text_queue must be a floating'):
        loss_fn(**dict(inputs, text_queue=torch.randn(2, 5)))
    with pytest.raises(ValueError, match='image_queue_ids'):
        loss_fn(**dict(inputs, image_queue_ids=torch.arange(5)))
    with pytest.raises(ValueError, match='image_ids'):
        loss_fn(**dict(inputs, image_ids=torch.zeros(3)))
    with pytest.raises(ValueError, match='embed_dim=8'):
        MultiDirectionalDistillationLoss(embed_dim=8)(**inputs)
    with pytest.raises(ValueError, match='dimension 4'):
        loss_fn(**dict(inputs, image_queue=FeatureQueue(3, 4), image_queue_ids=None))
    with pytest.raises(TypeError, match='image_queue'):
        loss_fn(**dict(inputs, image_queue=[[0.0] * 6]))


def test_docs_example_runs():
    page = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'teacher_and_distillation.md'
    blocks = re.findall(r'```python\n(.*?)```', page.read_text(), flags=re.S)
    assert blocks, f'no python example in {page}'
    namespace = {}
    exec(compile(blocks[0], str(page), 'exec'), namespace)
    assert namespace['losses'].keys() == {'loss_t2i', 'loss_i2t', 'loss_i2i', 'loss_t2t'}


@pytest.mark.parametrize('module', ['vlp_codebook.models.losses.distillation',
                                    'vlp_codebook.models.teachers.feature_queue',
                                    'vlp_codebook.models.teachers.momentum_teacher'])
def test_docstring_examples_run(module):
    import doctest
    import importlib
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0, result
