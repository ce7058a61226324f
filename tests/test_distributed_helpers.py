"""vlp_codebook.dist helpers and what uses them: ITM re-ranking under torch.distributed (2 gloo
ranks score disjoint halves of the pairs and return the single-process matrices; the loop-level
check is in test_codis_end_to_end.py), even_shard, joint_batch_mean's arguments (its 2-rank
numbers are checked in test_ddp_equivalence.py)."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from ddp_utils import init_gloo, run_workers
from vlp_codebook import dist
from vlp_codebook.evaluation import itm_rerank

NUM_IMAGES, NUM_TEXTS, K = 7, 11, 4


def problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(NUM_IMAGES, NUM_TEXTS, generator=g), torch.randn(NUM_IMAGES, NUM_TEXTS, generator=g)


def rerank_and_record_calls():
    sim, itm = problem()
    calls = []

    def scorer(images, texts):
        calls.extend(zip(images.tolist(), texts.tolist()))
        return itm[images, texts]

    score_i2t, score_t2i = itm_rerank(sim, scorer, k=K, batch_size=3)
    return score_i2t, score_t2i, calls


def _worker(rank, world, port, out_dir):
    init_gloo(rank, world, port)
    torch.save(rerank_and_record_calls(), os.path.join(out_dir, f'rank{rank}.pt'))


def test_two_ranks_score_disjoint_halves_and_agree_with_one_process():
    with tempfile.TemporaryDirectory() as out_dir:
        run_workers(_worker, 2, out_dir, timeout=120)
        ranks = [torch.load(os.path.join(out_dir, f'rank{r}.pt')) for r in range(2)]
    assert not dist.is_distributed()
    score_i2t, score_t2i, calls = rerank_and_record_calls()
    for rank_i2t, rank_t2i, _ in ranks:
        assert torch.equal(rank_i2t, score_i2t) and torch.equal(rank_t2i, score_t2i)
    # Each direction's (queries x k) pairs split into two contiguous halves, one per rank.
    per_direction = [NUM_IMAGES * K, NUM_TEXTS * K]
    assert [len(r[2]) for r in ranks] == [sum(n // 2 for n in per_direction),
                                          sum(n - n // 2 for n in per_direction)]
    assert sorted(ranks[0][2] + ranks[1][2]) == sorted(calls)
    # The re-ranking did something: the top-k entries are ITM scores, not similarities.
    sim, itm = problem()
    top = sim.topk(K, dim=1).indices
    assert torch.equal(score_i2t.gather(1, top), itm.gather(1, top))


def test_even_shard_without_a_process_group_is_everything():
    assert dist.even_shard(5) == slice(0, 5)
    with pytest.raises(ValueError, match='total must be >= 0'):
        dist.even_shard(-1)


def test_joint_batch_mean_without_a_process_group_and_bad_input():
    values = {'loss': torch.tensor(2.5), 'acc': torch.tensor([0.5])}
    assert dist.joint_batch_mean(values, 4) == values
    with pytest.raises(ValueError, match=r"values\['v'\] must be a scalar, got shape \(2,\)"):
        dist.joint_batch_mean({'v': torch.zeros(2)}, 4)
    with pytest.raises(ValueError, match='local_batch_size must be > 0'):
        dist.joint_batch_mean(values, 0)
