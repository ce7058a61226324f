import os

# The checkout, not the regular install in .venv, in this process (pyproject.toml's `pythonpath`)
# and in every process a test starts.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ['PYTHONPATH'] = os.pathsep.join(
    [_ROOT, os.path.join(_ROOT, 'plugins')] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])

# Tests are tiny: more threads only add contention on the 2-core CI machine.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)

settings.register_profile('vlp', deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile('stress', deadline=None, max_examples=int(os.environ.get('HYPOTHESIS_MAX_EXAMPLES', 400)),
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'vlp'))
