# Full CODIS (ablation row "b + codebook (teacher feature)") at the paper's size, on ALBEF-format
# JSON data: L = L_code + L_align + L_itm + L_mlm.
_base_ = [
    './_base_/models/codis_vit_b16_bert_base.py',
    './_base_/datasets/json_pretrain.py',
    './_base_/schedules/pretrain_30e.py',
    './_base_/default_runtime.py',
]
