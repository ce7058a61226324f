"""Host reads (device -> Python values) on the hot path, counted.

On a GPU every ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``... waits for the stream
to drain. These tests patch those methods, count the calls during one Sinkhorn solve and during
one CODIS training step, and bound them: per solve ``<= 1 + iterations / check_every``, per step
the solver's reads plus one for all value checks (plus the reads still left in files this
test lists by name, each a known debt).
"""
import collections
import math
import sys
import traceback

import pytest
import torch

sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
from test_ot_sinkhorn import _clustered_cost as clustered_cost  # noqa: E402

from vlp_codebook.checks import check_finite, deferred_checks
from vlp_codebook.anderson import AndersonMixer as _AndersonMixer
from vlp_codebook.ot import default_check_every, sinkhorn

READ_METHODS = ('item', 'tolist', '__bool__', 'cpu', 'numpy', '__float__', '__int__', '__index__')


class HostReads:
    """Context manager: counts calls of ``READ_METHODS`` on tensors, by calling file:line."""

    def __init__(self, ignore=('torch/optim/',)):
        self.sites = collections.Counter()
        self.ignore = ignore

    def __enter__(self):
        self.originals = {name: getattr(torch.Tensor, name) for name in READ_METHODS}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name, original):
        def counted(tensor, *args, **kwargs):
            stack = traceback.extract_stack(limit=8)[:-1]
            caller = stack[-1]
            if not any(part in caller.filename for part in self.ignore):
                ours = [f for f in stack if '/vlp_codebook/' in f.filename]
                site = ours[-1] if ours else caller
                self.sites[f'{site.filename.rsplit("/", 1)[-1]}:{site.lineno} {name}'] += 1
            return original(tensor, *args, **kwargs)
        return counted

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def in_file(self, filename: str) -> int:
        return sum(n for site, n in self.sites.items() if site.startswith(filename + ':'))


def _clustered_cost():
    return clustered_cost(96, 160)


@pytest.mark.parametrize('check_every', [1, 3, 5])
@pytest.mark.parametrize('eps', [0.05, 0.01])
def test_a_solve_reads_the_device_once_per_block(check_every, eps):
    cost = _clustered_cost()
    with HostReads() as reads:
        plan, info = sinkhorn(cost, eps, tol=1e-5, check_every=check_every, return_info=True)
    assert info.converged and info.iterations > 1
    assert reads.total == info.host_reads == math.ceil(info.iterations / check_every), reads.sites
    assert reads.total <= 1 + info.iterations / check_every
    # A read per iteration (as before blocks) would have given `iterations` reads.
    if check_every > 1:
        assert reads.total < info.iterations


def test_blocks_of_iterations_find_the_same_plan():
    cost = _clustered_cost()
    plan1, info1 = sinkhorn(cost, 0.02, tol=1e-6, check_every=1, return_info=True)
    plan4, info4 = sinkhorn(cost, 0.02, tol=1e-6, check_every=4, return_info=True)
    assert info1.converged and info4.converged
    assert info4.iterations % 4 == 0 and info4.iterations >= info1.iterations
    assert (plan1 - plan4).abs().sum().item() < 4e-6


def test_a_stopped_solve_still_has_the_mass_of_its_rows():
    # max_iters hit: the last operation is an exact row update, so rows sum to a = 1/B.
    cost = _clustered_cost()
    with pytest.warns(RuntimeWarning):
        plan, info = sinkhorn(cost, 0.001, max_iters=3, check_every=2, return_info=True)
    assert info.iterations == 3 and not info.converged
    torch.testing.assert_close(plan.sum(1), torch.full((96,), 1 / 96), rtol=1e-5, atol=0)


def test_default_check_every_is_one_on_the_cpu():
    assert default_check_every(torch.device('cpu')) == 1
    assert default_check_every(torch.device('cuda')) > 1


def test_an_anderson_step_reads_nothing():
    mixer = _AndersonMixer(3)
    x = torch.zeros(50, dtype=torch.float64)
    with HostReads() as reads:
        for k in range(8):
            gx = 0.5 * x + torch.linspace(0, 1, 50, dtype=torch.float64)
            # an error that grows now and then exercises the safeguard's rejections
            x = mixer.step(x, gx, torch.tensor(1.0 / (k + 1) if k % 3 else 2.0, dtype=torch.float64))
    assert reads.total == 0, reads.sites


def test_deferred_checks_read_once_and_raise_the_same_error():
    good, bad = torch.ones(3), torch.tensor([1.0, float('nan')])
    with HostReads() as reads:
        with deferred_checks():
            for _ in range(5):
                check_finite('good', good)
    assert reads.total == 1
    with pytest.raises(ValueError, match=r'bad contains NaN or inf values \(1 of 2'):
        with deferred_checks():
            check_finite('good', good)
            check_finite('bad', bad)
    with pytest.raises(ValueError, match='bad contains NaN'):
        check_finite('bad', bad)  # outside a block: at once


# Reads left in other files, per training step of the tiny model below, each a known debt:
# the data preprocessor checks its images' values with a plain `if`. (CodebookOTLoss's logged
# statistics stay on the device now: no read in codebook_ot_loss.py.)
KNOWN_ELSEWHERE = {'data_preprocessor.py': 2}


def test_a_codis_training_step_reads_the_device_a_bounded_number_of_times():
    from mmengine.optim import OptimWrapper
    from test_codis_model import batch, tiny_model

    model = tiny_model().train()
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4))
    data = batch()
    model.train_step(data, optim)  # first step: lazy set-up happens here
    # AdamW's step counters live on the host (torch.optim), so reading them waits for nothing.
    with HostReads(ignore=('torch/optim/',)) as reads:
        model.train_step(data, optim)
    stats = model.codebook_loss.last_stats
    check_every = default_check_every(torch.device('cpu'))
    solver = sum(math.ceil(stats[f'sinkhorn_iters_{m}'] / check_every) for m in ('image', 'text'))
    assert reads.in_file('ot.py') == solver, reads.sites
    assert reads.in_file('checks.py') == 1, reads.sites  # every value check of the step
    ours = reads.total - sum(reads.in_file(f) for f in KNOWN_ELSEWHERE)
    assert ours == solver + 1, reads.sites
    for filename, allowed in KNOWN_ELSEWHERE.items():
        assert reads.in_file(filename) <= allowed, reads.sites
    assert reads.in_file('codebook_ot_loss.py') == 0, reads.sites
