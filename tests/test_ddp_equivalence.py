"""Two gloo processes on CPU give the numbers of one process on the joint batch.

One spawn checks everything (a few seconds): the same ``pipeline`` runs in 2 workers, each on
its rows of a fixed joint batch, and in this process on all rows without a process group.

Local batch sizes are unequal (3 and 5 rows; the queues are pre-filled by batches of 2 and 4
rows). With ``B_r`` rows on rank r and ``B`` in all, the convention of ``vlp_codebook.dist``
(each rank's loss is the mean over its local queries times ``dist.batch_weight`` =
``B_r * world / B``) gives exactly what DDP's averaging needs:

* losses: ``mean_r loss_r == joint loss``;
* gradients on the student features: ``grad_r == world_size x`` the joint gradient on rank r's
  rows (DDP divides by ``world_size``);
* gradients on shared parameters (γ, the codebook): ``mean_r grad_r == joint``;
* queues, codebook usage: identical on every rank and equal to the joint ones;
* the Sinkhorn plan: the ranks' rows concatenated equal the joint plan.

A last part wraps a student in ``DistributedDataParallel`` with *equal* local batches (4 + 4),
where DDP's gradient averaging reproduces the joint step: after two SGD steps and
``MomentumTeacher`` updates, student and teacher equal the single-process ones, and the mean
over ranks of the per-rank losses equals the joint loss.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F

from ddp_utils import init_gloo, run_workers
from test_codis_model import batch, tiny_model
from vlp_codebook import dist
from vlp_codebook.models.losses.codebook_ot_loss import CodebookOTLoss
from vlp_codebook.models.losses.distillation import MultiDirectionalDistillationLoss
from vlp_codebook.models.teachers import FeatureQueue, MomentumTeacher
from vlp_codebook.ot import sinkhorn

WORLD = 2
SIZES = {'cur': (3, 5), 'prev': (2, 4), 'eq': (4, 4)}
D, K, QUEUE_SIZE = 16, 12, 10
BIG_K = 300
ATOL = 1e-5
RTOL = 1e-6   # fp32 round-off of large values (the temperature gradient is ~1e2)


def joint_inputs():
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES['cur'])

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    zv, zt = unit(n, D), unit(n, D)
    return dict(
        zv=zv, zt=zt,
        zv_m=F.normalize(zv + 0.3 * torch.randn(n, D, generator=g), dim=1),
        zt_m=F.normalize(zt + 0.3 * torch.randn(n, D, generator=g), dim=1),
        ids=torch.tensor([0, 1, 1, 2, 3, 3, 3, 4]),        # captions of one image share an id
        prev_v=unit(6, D), prev_t=unit(6, D), prev_ids=torch.tensor([1, 5, 3, 6, 7, 0]),
        codewords=unit(K, D),
        x=torch.randn(2, sum(SIZES['eq']), 6, generator=g),
    )


def rows(group: str, rank: int, world: int) -> slice:
    if world == 1:
        return slice(0, sum(SIZES[group]))
    start = sum(SIZES[group][:rank])
    return slice(start, start + SIZES[group][rank])


def _record_codebook_step(out: dict, prefix: str, loss_fn, inp: dict, cur: slice) -> None:
    """One step of ``loss_fn`` on this rank's rows with teacher plans: its terms, the students'
    gradients and the codewords' gradient, recorded under ``prefix``."""
    zv = inp['zv'][cur].clone().requires_grad_()
    zt = inp['zt'][cur].clone().requires_grad_()
    terms = loss_fn(zv, zt, inp['zv_m'][cur], inp['zt_m'][cur])
    sum(terms.values()).backward()
    for name, value in terms.items():
        out[f'{prefix}/{name}'] = ('mean', 'cur', value.detach())
    out[f'{prefix}/grad_zv'] = ('rowgrad', 'cur', zv.grad)
    out[f'{prefix}/grad_zt'] = ('rowgrad', 'cur', zt.grad)
    out[f'{prefix}/grad_codewords'] = ('mean', 'cur', loss_fn.codebook.weight.grad)


def pipeline(rank: int, world: int):
    """Returns {name: (kind, size group, tensor)}; kind says how ranks relate to the joint run."""
    inp = joint_inputs()
    cur, prev, eq = (rows(g, rank, world) for g in ('cur', 'prev', 'eq'))
    out = {}

    # Queues, pre-filled by a previous batch (gathered: each rank enqueues its own rows).
    queue_v = FeatureQueue(QUEUE_SIZE, D, with_ids=True)
    queue_t = FeatureQueue(QUEUE_SIZE, D, with_ids=True)
    queue_v.enqueue(inp['prev_v'][prev], ids=inp['prev_ids'][prev])
    queue_t.enqueue(inp['prev_t'][prev], ids=inp['prev_ids'][prev])

    # 1. All four directions, instance ids, FeatureQueues, learnable temperature.
    loss_fn = MultiDirectionalDistillationLoss(embed_dim=D)
    zv = inp['zv'][cur].clone().requires_grad_()
    zt = inp['zt'][cur].clone().requires_grad_()
    losses = loss_fn(image_feats=zv, text_feats=zt, image_teacher_feats=inp['zv_m'][cur],
                     text_teacher_feats=inp['zt_m'][cur], image_queue=queue_v, text_queue=queue_t,
                     image_ids=inp['ids'][cur], alpha=0.4)
    sum(losses.values()).backward()
    for name, value in losses.items():
        out[f'distill/{name}'] = ('mean', 'cur', value.detach())
    out['distill/grad_zv'] = ('rowgrad', 'cur', zv.grad)
    out['distill/grad_zt'] = ('rowgrad', 'cur', zt.grad)
    out['distill/grad_gamma'] = ('mean', 'cur', loss_fn.temperature.grad)

    # 2. No ids (the positive is the global index), tensor queue, alpha = 0, two directions.
    loss_fn2 = MultiDirectionalDistillationLoss(directions=('t2i', 'i2i'), learnable_temperature=False)
    zv2 = inp['zv'][cur].clone().requires_grad_()
    zt2 = inp['zt'][cur].clone().requires_grad_()
    losses2 = loss_fn2(image_feats=zv2, text_feats=zt2, image_teacher_feats=inp['zv_m'][cur],
                       image_queue=queue_v.features(), alpha=0.0)
    sum(losses2.values()).backward()
    for name, value in losses2.items():
        out[f'distill_noids/{name}'] = ('mean', 'cur', value.detach())
    out['distill_noids/grad_zv'] = ('rowgrad', 'cur', zv2.grad)
    out['distill_noids/grad_zt'] = ('rowgrad', 'cur', zt2.grad)

    # Enqueue the current teacher batch: the queues wrap around (6 + 8 rows > 10).
    queue_v.enqueue(inp['zv_m'][cur], ids=inp['ids'][cur])
    queue_t.enqueue(inp['zt_m'][cur], ids=inp['ids'][cur])
    for name, queue in (('queue_v', queue_v), ('queue_t', queue_t)):
        for key, value in queue.state_dict().items():
            out[f'{name}/{key}'] = ('same', 'cur', value)
        out[f'{name}/features'] = ('same', 'cur', queue.features())

    # 3. The OT plan of the core solver, rows sharded.
    plan = sinkhorn(1.0 - inp['zv_m'][cur] @ inp['codewords'].T, 0.05, tol=1e-6, max_iters=5000)
    out['sinkhorn/plan'] = ('rows', 'cur', plan)
    # 3b. More codewords, solved in blocks of 3 iterations between checks (every rank takes the
    # same decisions on all-reduced numbers); compared through each row's mean assigned codeword.
    big = F.normalize(torch.randn(BIG_K, D, generator=torch.Generator().manual_seed(3)), dim=1)
    plan_big, info_big = sinkhorn(1.0 - inp['zv_m'][cur] @ big.T, 0.05, tol=1e-6, max_iters=5000,
                                  check_every=3, return_info=True)
    out['sinkhorn_blocks/assigned_codeword'] = ('rows', 'cur', sum(SIZES['cur']) * plan_big @ big)
    out['sinkhorn_blocks/converged'] = ('same', 'cur', torch.tensor(info_big.converged))

    # 4. CodebookOTLoss on teacher plans.
    torch.manual_seed(1)
    ot_loss = CodebookOTLoss(num_codewords=K, embed_dim=D, sinkhorn_tol=1e-6, sinkhorn_max_iters=5000)
    _record_codebook_step(out, 'codebook', ot_loss, inp, cur)
    out['codebook/usage'] = ('same', 'cur', ot_loss.codebook.usage)

    # 4b. A plan queue (filled by the previous batch, student plans): every rank holds the joint
    # queue and transports its share of it with its own rows, so the solve sees each row once.
    torch.manual_seed(1)
    queued = CodebookOTLoss(num_codewords=K, embed_dim=D, sinkhorn_tol=1e-6, sinkhorn_max_iters=5000,
                            plan_queue_size=QUEUE_SIZE)
    queued(inp['prev_v'][prev], inp['prev_t'][prev])
    _record_codebook_step(out, 'codebook_queue', queued, inp, cur)
    out['codebook_queue/queue_v'] = ('same', 'cur', queued.plan_queues['image'].features())

    # 5. A DDP-wrapped student, its momentum teacher and two SGD steps, equal local batches.
    torch.manual_seed(2)
    student = nn.Linear(6, D)
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    teacher = MomentumTeacher(model, momentum=0.9)          # unwraps DDP
    assert teacher.student is student
    intra = MultiDirectionalDistillationLoss(directions=('i2i',), learnable_temperature=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        x = inp['x'][step][eq]
        z = model(x)
        z.retain_grad()
        loss = intra(image_feats=z, image_teacher_feats=teacher(x), alpha=0.4)['loss_i2i']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        teacher.update()
        out[f'train/loss{step}'] = ('wmean', 'eq', loss.detach())
        out[f'train/grad_z{step}'] = ('rowgrad', 'eq', z.grad)
    for key, value in student.state_dict().items():
        out[f'train/student.{key}'] = ('same', 'eq', value)
    for key, value in teacher.state_dict().items():
        out[f'train/teacher.{key}'] = ('same', 'eq', value)

    # 6. Logged values: dist.joint_batch_mean of the per-rank losses of part 1 is the joint loss
    # on every rank, and a tiny CODIS logs joint-batch means from parse_losses (eval mode: no
    # dropout; ITM/MLM sample randomly, so they are left out here).
    # The losses are already weighted by dist.batch_weight: equal weights give the joint value.
    logged = dist.joint_batch_mean({n: v.detach() for n, v in losses.items()}, 1)
    for name, value in logged.items():
        out[f'log/{name}'] = ('same', 'cur', value)
    codis = tiny_model(itm_loss=None, mlm_loss=None).eval()
    data = codis.data_preprocessor(batch(sum(SIZES['cur'])), True)
    codis_terms = codis(**{k: v[cur] for k, v in data.items()}, mode='loss')
    out['codis_local/loss_t2i'] = ('mean', 'cur', codis_terms['loss_t2i'].detach())
    _, log_vars = codis.parse_losses(codis_terms)
    for name, value in log_vars.items():
        out[f'codis_log/{name}'] = ('same', 'cur', value.detach())

    # 7. A whole CODIS step (distillation + codebook, teachers, queues) under DDP with the
    # unequal local batches 3 + 5: DDP's average of the gradients is the joint batch's gradient.
    # (γ = 0.5: the untrained tiny towers give nearly equal features, and at γ = 0.07 the
    # gradient of γ is a sum of terms ~200x larger than itself, whose fp32 rounding alone differs
    # between the two summation orders by ~2e-5.)
    step_model = tiny_model(itm_loss=None, mlm_loss=None,
                            distillation_loss=dict(type='MultiDirectionalDistillationLoss', temperature=0.5)).eval()
    wrapped = (nn.parallel.DistributedDataParallel(step_model, find_unused_parameters=True)
               if world > 1 else step_model)
    data = step_model.data_preprocessor(batch(sum(SIZES['cur'])), True)
    step_terms = wrapped(**{k: v[cur] for k, v in data.items()}, mode='loss')
    sum(v for k, v in step_terms.items() if k.startswith('loss')).backward()
    for name, param in step_model.named_parameters():
        if param.grad is not None:
            out[f'codis_step/grad.{name}'] = ('same', 'cur', param.grad)
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    assert dist.is_distributed() and dist.get_world_size() == world
    torch.save(pipeline(rank, world), os.path.join(out_dir, f'rank{rank}.pt'))


def test_two_gloo_ranks_equal_one_process_on_the_joint_batch():
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as out_dir:
        run_workers(_worker, WORLD, out_dir, timeout=180)
        ranks = [torch.load(os.path.join(out_dir, f'rank{r}.pt')) for r in range(WORLD)]
    elapsed = time.monotonic() - start
    assert not dist.is_distributed()
    joint = pipeline(0, 1)

    assert set(ranks[0]) == set(ranks[1]) == set(joint)
    checked = {'wmean': 0, 'mean': 0, 'rowgrad': 0, 'rows': 0, 'same': 0}
    for name, (kind, group, expected) in joint.items():
        sizes = SIZES[group]
        weights = [b / sum(sizes) for b in sizes]
        per_rank = [r[name][2] for r in ranks]
        if kind == 'wmean':
            got = sum(w * v for w, v in zip(weights, per_rank))
        elif kind == 'mean':
            got = sum(per_rank) / WORLD
        elif kind == 'rowgrad':
            got = torch.cat(per_rank) / WORLD
        elif kind == 'rows':
            got = torch.cat(per_rank)
        else:
            for other in per_rank[1:]:
                torch.testing.assert_close(other, per_rank[0], atol=0, rtol=0, msg=name)
            got = per_rank[0]
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, name=name: f'{name}: {m}')
        checked[kind] += 1
    step_grads = sum(name.startswith('codis_step/') for name in joint)
    assert step_grads > 10 and any('codebook' in name for name in joint if name.startswith('codis_step/'))
    assert checked == {'wmean': 2, 'mean': 18, 'rowgrad': 10, 'rows': 2, 'same': 17 + 4 + 11 + 1 + step_grads}, checked
    # the plan queue changed the terms (same codebook, same rows): the comparison is not vacuous
    assert abs(joint['codebook_queue/loss_i2p'][2] - joint['codebook/loss_i2p'][2]) > 1e-4

    # With equal local batches the plain mean over ranks is the joint loss, and each rank's
    # feature gradient is world_size x the joint one.
    for step in range(2):
        mean_loss = sum(r[f'train/loss{step}'][2] for r in ranks) / WORLD
        torch.testing.assert_close(mean_loss, joint[f'train/loss{step}'][2], atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.cat([r[f'train/grad_z{step}'][2] for r in ranks]),
                                   WORLD * joint[f'train/grad_z{step}'][2], atol=ATOL, rtol=0)
    # The training step moved something (the comparison above is not vacuous).
    torch.manual_seed(2)
    assert not torch.allclose(nn.Linear(6, D).weight, joint['train/student.weight'][2])
    # Unequal batches: the ranks' losses carry dist.batch_weight (B_r * world / B); weighting
    # them once more by B_r / B would miss the joint loss (the factor matters).
    for name in ('distill/loss_t2i', 'codebook/loss_i2p', 'codis_local/loss_t2i'):
        weighted = sum(b / sum(SIZES['cur']) * r[name][2] for b, r in zip(SIZES['cur'], ranks))
        assert abs(weighted - joint[name][2]) > 1e-4, name
    # ... and rank 0's own CODIS loss (what mmengine logs by default) is not the joint one.
    assert abs(ranks[0]['codis_local/loss_t2i'][2] - joint['codis_log/loss_t2i'][2]) > 1e-4
    print(f'DDP equivalence: 2 gloo workers took {elapsed:.1f} s')
