default_scope = 'vlp_codebook'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # mmengine's CheckpointHook, crash-safe: temp file + fsync + rename, last_checkpoint after it
    checkpoint=dict(type='AtomicCheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
# PNGs in WORK_DIR/plots/ at each validation and at the end (losses, retrieval R@k, codebook
# health, retrieval gallery); `python -m vlp_codebook.tools.plot WORK_DIR` redraws them afterwards.
custom_hooks = [dict(type='TrainingPlotsHook')]
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # The train tool switches to gloo when no GPU is present.
    dist_cfg=dict(backend='nccl'),
)
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=42, deterministic=False)
