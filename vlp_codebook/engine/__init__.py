"""Runner extensions: safe checkpoint loading, CPU distributed set-up, hooks.

Importing this package registers the hooks (extra scalars, per-iteration seeding for exact
resumption, checkpoint coverage, crash-safe checkpoint saving) and the bf16 optimizer wrapper below in the
``vlp_codebook`` registries. The registries import it lazily (``HOOKS``, ``LOOPS``,
``OPTIM_WRAPPERS``... list it in their ``locations``) and the tools import it first.

Importing it changes nothing in mmengine's checkpoint loading: the tools load checkpoints
inside :func:`~vlp_codebook.engine.checkpoint.checkpoint_loading` (read against a schema; see
:mod:`vlp_codebook.checkpoint_io` and docs/security.md).
"""
from .checkpoint import checkpoint_loading
from .checkpoint_saving import AtomicCheckpointHook, atomic_write
from .checkpoint_coverage import CheckpointCoverageHook, load_model_weights, state_dict_coverage
from .distributed import init_cpu_process_group, setup_launcher
from .hooks import ModelScalarsLoggerHook
from .optim_wrapper import BF16AutocastOptimWrapper
from .iteration_seed import IterationSeedHook
from .plot_hook import TrainingPlotsHook
from .itm_rerank_loop import ITMRerankTestLoop, ITMRerankValLoop

__all__ = ['checkpoint_loading', 'AtomicCheckpointHook', 'atomic_write', 'CheckpointCoverageHook', 'load_model_weights', 'state_dict_coverage', 'init_cpu_process_group',
           'setup_launcher', 'ModelScalarsLoggerHook', 'BF16AutocastOptimWrapper',
           'IterationSeedHook', 'ITMRerankValLoop', 'ITMRerankTestLoop', 'TrainingPlotsHook']
