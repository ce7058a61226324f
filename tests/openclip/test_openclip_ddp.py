"""2 gloo processes on halves of each batch == 1 process on the joint batch, for every CODIS term
the plugin adds and for the gradients, with and without open_clip's --local-loss --gather-with-grad."""
from __future__ import annotations

import pytest
import torch

from openclip_helpers import PLUGIN_CONFIGS
from ddp_utils import init_gloo, run_workers

JOINT, STEPS = 8, 2
PLAIN = dict(plan_queue_size=0, codebook_warmup_steps=0)
CONFIGS = {
    'student_plans': dict(codebook_size=16, **PLAIN),
    'teacher_plans_intra': dict(codebook_size=16, plan_features='teacher', intra=True, queue_size=8, **PLAIN),
    # the second step's plans also transport the 8 queued rows of the first
    'student_plans_plan_queue': dict(codebook_size=16, plan_queue_size=8, codebook_warmup_steps=0),
}


def _batches():
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(JOINT, 3, 32, 32, generator=generator),
             torch.randint(1, 49000, (JOINT, 16), generator=generator)) for _ in range(STEPS)]


def _run(rank: int, world: int, config: str, local_loss: bool) -> dict:
    import open_clip

    from vlp_codebook_openclip import CodebookCLIP, CodebookClipLoss
    open_clip.add_model_config(PLUGIN_CONFIGS)
    torch.manual_seed(0)
    clip, _, _ = open_clip.create_model_and_transforms('codis-tiny-vit', output_dict=True)
    model = CodebookCLIP(clip, **CONFIGS[config])
    runner = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss = CodebookClipLoss(open_clip.ClipLoss(local_loss=local_loss, gather_with_grad=local_loss,
                                               rank=rank, world_size=world))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    rows = slice(rank * JOINT // world, (rank + 1) * JOINT // world)
    record = {'terms': [], 'grads': []}
    for images, texts in _batches():
        out = runner(images[rows], texts[rows])
        losses = loss(**out, output_dict=True)
        ours = {k: v for k, v in losses.items() if k != 'contrastive_loss'}
        # Without --gather-with-grad open_clip's own gradient is not the joint batch's (its design):
        # only our terms are compared then (times 0 keeps DDP's graph complete).
        contrastive = losses['contrastive_loss'] * (1.0 if local_loss else 0.0)
        (sum(ours.values()) + contrastive).backward()
        terms = {k: v.detach().clone() for k, v in losses.items() if local_loss or k != 'contrastive_loss'}
        if world > 1:
            for value in terms.values():
                torch.distributed.all_reduce(value)
                value /= world
        record['terms'].append(terms)
        record['grads'].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
    record['state'] = {k: v.clone() for k, v in model.state_dict().items()}
    return record


def _worker(rank, world, port, out_dir, config, local_loss):
    init_gloo(rank, world, port)
    torch.save(_run(rank, world, config, local_loss), f'{out_dir}/rank{rank}.pt')


@pytest.mark.parametrize('local_loss', [True, False], ids=['local_loss_gather_with_grad', 'open_clip_default'])
@pytest.mark.parametrize('config', list(CONFIGS))
def test_two_ranks_equal_one_process_on_the_joint_batch(openclip_plugin, tmp_path, config, local_loss):
    single = _run(0, 1, config, local_loss)
    run_workers(_worker, 2, str(tmp_path), config, local_loss, timeout=180)
    for rank in range(2):
        multi = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        for step in range(STEPS):
            assert multi['terms'][step].keys() == single['terms'][step].keys()
            for name, value in single['terms'][step].items():
                assert torch.allclose(multi['terms'][step][name], value, atol=1e-5, rtol=1e-5), (step, name)
            assert multi['grads'][step].keys() == single['grads'][step].keys()
            for name, grad in single['grads'][step].items():
                assert torch.allclose(multi['grads'][step][name], grad, atol=1e-5, rtol=1e-4), (step, name)
        for key, value in single['state'].items():
            assert torch.allclose(multi['state'][key].double(), value.double(), atol=1e-5), key
    # the intra directions saw a queue filled by the joint batch of step 1
    if config == 'teacher_plans_intra':
        assert int(single['state']['image_queue.num_valid']) == 8
        assert 'intra_i2i' in single['terms'][1]
