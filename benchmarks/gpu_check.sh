#!/usr/bin/env bash
# One-shot GPU check: the GPU tests, then the GPU benchmarks, each printing a table.
#
#   bash benchmarks/gpu_check.sh                # from the repository root, with .venv set up
#   PYTHON=python PEAK_GBPS=3350 bash benchmarks/gpu_check.sh    # another interpreter / an H100
#
# Prints, on one GPU, in under 8 minutes (each stage has its own time limit):
#   1. the device, torch and POT versions;
#   2. `pytest -m gpu` (tests/test_gpu.py): solver vs POT's torch backend on CUDA, a block of
#      solver iterations with no synchronising call, losses on CUDA vs CPU, a CODIS bf16
#      autocast training step with its host reads counted;
#   2b. the op-budget and compile tests, the losses' ops / host reads / ms against SwAV's form
#      and ALBEF-style ITC on CUDA (benchmarks/bench_loss_ops.py), and both losses compiled by
#      inductor (fullgraph=True) against eager;
#   3. Sinkhorn at B x K = 1024 x 4096 and 4096 x 16384 (clustered cosine costs, eps 0.05):
#      ours vs POT (torch backend, float64, same GPU) vs SwAV-3, ms per solve, iterations,
#      host reads, marginal errors, check_every 1 side by side with the default (4), and the
#      time and memory bandwidth of one iteration (8 B K bytes read) as % of PEAK_GBPS
#      (default 4800, an H200's HBM3e);
#   4. the training step of ablation row (a) vs full CODIS at base size (ViT-B/16 256 px +
#      BERT-base 6 + 6, queue 65536, K 1024), bf16 autocast, batch 64: median ms per step and
#      samples/s.
# Nothing here is part of CI; a machine without CUDA stops after stage 1 with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PEAK_GBPS=${PEAK_GBPS:-4800}
status=0

echo "== 1. device"
if ! "$PY" - <<'EOF'
import sys, torch, ot
if not torch.cuda.is_available():
    print('no CUDA device: torch.cuda.is_available() is False; nothing to check here')
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__} (CUDA {torch.version.cuda}), '
      f'POT {ot.__version__}')
EOF
then
    exit 1
fi

echo "== 2. pytest -m gpu"
timeout 240 "$PY" -m pytest -m gpu -q -rs tests/test_gpu.py || status=1

echo "== 2b. kernel launches and compile: op budgets, aot_eager compile tests, the losses on CUDA"
timeout 180 "$PY" -m pytest -q -rs tests/test_op_budgets.py tests/test_compile.py || status=1
timeout 120 "$PY" benchmarks/bench_loss_ops.py --device cuda || status=1
timeout 240 "$PY" - <<'EOF' || status=1
import time, torch
from vlp_codebook.models.losses.codebook_ot_loss import CodebookOTLoss
from vlp_codebook.models.losses.distillation import MultiDirectionalDistillationLoss
torch.manual_seed(0)
B, d = 256, 256
zv = torch.randn(B, d, device='cuda', requires_grad=True)
zt = torch.randn(B, d, device='cuda', requires_grad=True)
tv, tt = zv.detach() + 0.1 * torch.randn_like(zv), zt.detach() + 0.1 * torch.randn_like(zt)
pieces = {'CodebookOTLoss K 1024': (CodebookOTLoss(num_codewords=1024).cuda(), (zv, zt, tv, tt), {}),
          'MultiDirectionalDistillationLoss': (MultiDirectionalDistillationLoss().cuda(), (),
                                               dict(image_feats=zv, text_feats=zt, image_teacher_feats=tv,
                                                    text_teacher_feats=tt, alpha=0.4))}
print('| piece (B 256) | eager ms | inductor (fullgraph) ms | max abs diff of the losses |')
print('|---|---|---|---|')
for name, (fn, args, kwargs) in pieces.items():
    compiled = torch.compile(fn, fullgraph=True, backend='inductor')
    out, times = {}, {}
    for label, f in (('eager', fn), ('inductor', compiled)):
        for _ in range(3):
            out[label] = f(*args, **kwargs)
            sum(out[label].values()).backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            sum(f(*args, **kwargs).values()).backward()
        torch.cuda.synchronize()
        times[label] = (time.perf_counter() - t0) / 20 * 1e3
    diff = max(abs(float(out['eager'][k]) - float(out['inductor'][k])) for k in out['eager'])
    print(f'| {name} | {times["eager"]:.2f} | {times["inductor"]:.2f} | {diff:.1e} |')
EOF

echo "== 3. Sinkhorn on the GPU (ours: default check_every; last columns: check_every=1)"
timeout 150 "$PY" benchmarks/bench_sinkhorn.py --device cuda --grid 1024x4096 4096x16384 \
    --kinds clustered --repeats 5 --check-every 1 --per-iteration --peak-gbps "$PEAK_GBPS" || status=1

echo "== 4. training step, base size, bf16 autocast, batch 64: row (a) vs full CODIS"
timeout 240 "$PY" - <<'EOF' || status=1
import statistics, sys, time
import torch
sys.path.insert(0, 'benchmarks')
from bench_step_time import build, make_batch

torch.backends.cuda.matmul.allow_tf32 = True
batch, warmup, steps = 64, 3, 10
models = {'a: cross only': build('a_cross.py', 'base').cuda(),
          'full CODIS': build('b_codebook_teacher.py', 'base').cuda()}
optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=True)
          for k, m in models.items()}
data = make_batch(batch, 256)
times = {k: [] for k in models}
for i in range(warmup + steps):
    for name, model in models.items():   # alternate, so drift hits both
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        inputs = model.data_preprocessor(data, True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            losses = model(**inputs, mode='loss')
        total = sum(v for k, v in losses.items() if k.startswith('loss'))
        optims[name].zero_grad(set_to_none=True)
        total.backward()
        optims[name].step()
        torch.cuda.synchronize()
        if i >= warmup:
            times[name].append(time.perf_counter() - t0)
print(f'{torch.cuda.get_device_name()}, batch {batch}, bf16 autocast, median of {steps} steps after {warmup}; '
      f'peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB')
print('| model | median ms / step | samples / s |')
print('|---|---|---|')
for name, ts in times.items():
    med = statistics.median(ts)
    print(f'| {name} | {med * 1e3:.1f} | {batch / med:.0f} |')
ratio = statistics.median(times['full CODIS']) / statistics.median(times['a: cross only'])
print(f'full / row a = {ratio:.3f} (overhead {100 * (ratio - 1):+.1f} %)')
EOF

exit $status
