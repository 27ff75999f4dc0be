"""``python -m mamba_jax.generate``: the generation command line (implemented in ``mamba_jax/generation/cli.py``).

After ``import mamba_jax``, ``mamba_jax.generate`` is the ``generate`` function. ``import mamba_jax.generate``
binds this module to that name instead; the module then forwards calls to the function, so
``mamba_jax.generate(model, ...)`` works either way.
"""

import sys
import types

from mamba_jax.generation.cli import main
from mamba_jax.generation.loop import generate


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
