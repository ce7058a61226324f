"""The rows of ``real_data_ablation.py``: what each trains, and the named groups of rows.

A row is an objective -- (a) the cross distillation directions, (b) intra + cross, (c) in-batch
InfoNCE (open_clip's ``ClipLoss`` in form) -- with or without ``CodebookOTLoss`` (its arguments),
the features the plans come from, and the codewords' weight decay. Each codebook row is compared
with the row of its objective without the codebook (``OBJECTIVE_BASELINE``).
"""
from __future__ import annotations

import hashlib
import json
import os.path as osp
from typing import Dict, NamedTuple, Optional

OBJECTIVES = {'cross': ('t2i', 'i2t'), 'all': ('t2i', 'i2t', 'i2i', 't2t'), 'clip': ()}
OBJECTIVE_BASELINE = {'cross': 'a', 'all': 'b', 'clip': 'clip'}


class Row(NamedTuple):
    title: str
    objective: str                       # 'cross' (row a), 'all' (row b) or 'clip' (row c)
    codebook: Optional[dict] = None      # CodebookOTLoss arguments; None: no codebook
    teacher_plans: bool = True           # plans from the momentum teacher's features (else the students')
    codeword_wd: Optional[float] = None  # the codewords' weight decay; None: --weight-decay like the rest


K128, K1024 = dict(num_codewords=128), dict(num_codewords=1024)
ROWS: Dict[str, Row] = {
    'a': Row('(a) cross directions, no codebook', 'cross'),
    'b': Row('(b) intra + cross, no codebook', 'all'),
    'clip': Row('(c) in-batch InfoNCE (ClipLoss form), no codebook', 'clip'),
    'b_cb128': Row('(b) + codebook K=128, defaults', 'all', K128),
    'b_cb512': Row('(b) + codebook K=512', 'all', dict(num_codewords=512)),
    'b_cb128_student_plans': Row('(b) + codebook, student plans', 'all', K128, teacher_plans=False),
    'b_cb128_w0.5': Row('(b) + codebook, 0.5x weight', 'all', dict(K128, loss_weight=0.5)),
    'b_cb128_w2': Row('(b) + codebook, 2x weight', 'all', dict(K128, loss_weight=2.0)),
    'b_cb128_ot_student': Row("(b) + codebook, ot_cost_features='student'", 'all',
                              dict(K128, ot_cost_features='student')),
    'b_cb128_ot_off': Row("(b) + codebook, ot_cost_features='off'", 'all', dict(K128, ot_cost_features='off')),
    'b_cb128_gaussian_init': Row('(b) + codebook, N(0, 1) codewords (init_norm=None)', 'all',
                                 dict(K128, codeword_init_norm=None)),
    'b_cb128_init_norm4': Row('(b) + codebook, codewords of norm 4 (init_norm=4)', 'all',
                              dict(K128, codeword_init_norm=4.0)),
    # the decomposition: one factor at a time from (b) + codebook towards open_clip's setting
    'a_cb128': Row('(a) + codebook K=128', 'cross', K128),
    'clip_cb128_teacher': Row('(c) + codebook K=128, teacher plans', 'clip', K128),
    'clip_cb128': Row('(c) + codebook K=128, student plans', 'clip', K128, teacher_plans=False),
    'b_cb1024': Row('(b) + codebook K=1024', 'all', K1024),
    'clip_cb1024': Row('(c) + codebook K=1024, student plans', 'clip', K1024, teacher_plans=False),
    'b_cb128_cwd0': Row('(b) + codebook, no weight decay on codewords', 'all', K128, codeword_wd=0.0),
    'b_cb128_cwd0.1': Row('(b) + codebook, weight decay 0.1 on codewords', 'all', K128, codeword_wd=0.1),
    'clip_cb1024_cwd0.1': Row("(c) + codebook K=1024, student plans, codeword wd 0.1 (open_clip's)", 'clip',
                              K1024, teacher_plans=False, codeword_wd=0.1),
    # remedies, on the open_clip-like row
    'clip_cb1024_pq1024': Row('(c) + codebook K=1024, student plans, plan queue 1024', 'clip',
                              dict(K1024, plan_queue_size=1024), teacher_plans=False),
    'clip_cb1024_warmup': Row('(c) + codebook K=1024, student plans, codebook off for the first 80 steps (about 1 epoch)', 'clip',
                              dict(K1024, warmup_steps=80), teacher_plans=False),
    'clip_cb1024_pq1024_warmup': Row('(c) + codebook K=1024, student plans, plan queue 1024, off for the first 80 steps',
                                     'clip', dict(K1024, plan_queue_size=1024, warmup_steps=80), teacher_plans=False),
    'clip_cb128_pq1024': Row('(c) + codebook K=128, student plans, plan queue 1024', 'clip',
                             dict(K128, plan_queue_size=1024), teacher_plans=False),
    # the same remedies on the default codebook row (the toolkit's own defaults)
    'b_cb128_pq128': Row('(b) + codebook K=128, plan queue 128 (= K)', 'all', dict(K128, plan_queue_size=128)),
    'b_cb128_warmup': Row('(b) + codebook K=128, off for the first 80 steps (about 1 epoch)', 'all',
                          dict(K128, warmup_steps=80)),
    'b_cb128_pq128_warmup': Row('(b) + codebook K=128, plan queue 128, off for the first 80 steps', 'all',
                                dict(K128, plan_queue_size=128, warmup_steps=80)),
}
ROW_GROUPS = {
    'default': ['a', 'b', 'b_cb128', 'b_cb512', 'b_cb128_student_plans', 'b_cb128_w0.5', 'b_cb128_w2',
                'b_cb128_ot_student', 'b_cb128_ot_off', 'b_cb128_gaussian_init', 'b_cb128_init_norm4'],
    'decomposition': ['a', 'b', 'clip', 'b_cb128', 'a_cb128', 'clip_cb128_teacher', 'clip_cb128', 'b_cb1024',
                      'clip_cb1024', 'b_cb128_cwd0', 'b_cb128_cwd0.1', 'clip_cb1024_cwd0.1'],
    'schedule': ['b', 'clip', 'b_cb128', 'clip_cb1024_cwd0.1'],
    'remedies': ['clip', 'clip_cb1024', 'clip_cb1024_pq1024', 'clip_cb1024_warmup', 'clip_cb1024_pq1024_warmup',
                 'clip_cb128', 'clip_cb128_pq1024'],
    'toolkit_remedies': ['b', 'b_cb128', 'b_cb128_pq128', 'b_cb128_warmup', 'b_cb128_pq128_warmup'],
}
BASELINE = 'b'
# The row that builds CodebookOTLoss with its defaults (only K given): what a user gets.
DEFAULT_CODEBOOK_ROW = 'b_cb128'


# Arguments that change a run's numbers (the key of its saved result); not --workers, --rows, --seeds.
_PROTOCOL = ('epochs', 'batch', 'lr', 'weight_decay', 'embed_dim', 'hidden', 'queue', 'momentum', 'alpha',
             'image_size', 'max_images')


def _codebook_defaults() -> dict:
    """The defaults of CodebookOTLoss that change a run's numbers (part of a saved run's key). An
    option whose default is 'off' joins this list when its default changes."""
    import inspect
    from vlp_codebook.models.losses.codebook_ot_loss import CodebookOTLoss
    keyed = ('codeword_init_norm', 'ot_cost_features', 'epsilon', 'temperature', 'loss_weight')
    return {name: p.default for name, p in inspect.signature(CodebookOTLoss).parameters.items() if name in keyed}


def result_path(args, row: str, seed: int) -> Optional[str]:
    """Where the result of (row, seed) under ``args``' protocol is saved (None: not saved)."""
    if not args.results_dir:
        return None
    spec = ROWS[row]
    # The effective codebook arguments: a saved run of the defaults row stays valid only for the
    # defaults it was run with.
    codebook = None if spec.codebook is None else {**_codebook_defaults(), **spec.codebook}
    protocol = json.dumps([[OBJECTIVES[spec.objective], codebook, spec.teacher_plans, spec.codeword_wd,
                            spec.objective], {k: getattr(args, k) for k in _PROTOCOL}],
                          sort_keys=True, default=str)
    key = hashlib.blake2b(protocol.encode(), digest_size=6).hexdigest()
    return osp.join(args.results_dir, f'{row}_seed{seed}_{key}.json')
