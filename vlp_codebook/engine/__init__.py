"""Runner extensions: checkpoint loading for torch >= 2.6, CPU distributed set-up, hooks.

Importing this package registers the trusted local checkpoint loader
(:mod:`vlp_codebook.engine.checkpoint`) and the hooks (momentum teacher, extra scalars,
per-iteration seeding for exact resumption) and the bf16 optimizer wrapper below in the
``vlp_codebook`` registries. The registries import it lazily (``HOOKS``, ``LOOPS``,
``OPTIM_WRAPPERS``... list it in their ``locations``) and the tools import it first.
"""
from .checkpoint import load_from_trusted_local, register_checkpoint_loader
from .distributed import init_cpu_process_group, setup_launcher
from .hooks import ModelScalarsLoggerHook, MomentumTeacherHook
from .optim_wrapper import BF16AutocastOptimWrapper
from .iteration_seed import IterationSeedHook
from .itm_rerank_loop import ITMRerankTestLoop, ITMRerankValLoop

__all__ = ['load_from_trusted_local', 'register_checkpoint_loader', 'init_cpu_process_group',
           'setup_launcher', 'MomentumTeacherHook', 'ModelScalarsLoggerHook', 'BF16AutocastOptimWrapper',
           'IterationSeedHook', 'ITMRerankValLoop', 'ITMRerankTestLoop']
