"""``python -m mamba_jax.generate``: the generation command line (implemented in ``mamba_jax/generation/cli.py``).

After ``import mamba_jax``, ``mamba_jax.generate`` is the ``generate`` function, not this module: Python binds a
submodule to its package's attribute only when the submodule is imported by name, which ``-m`` does not do.
(``import mamba_jax.generate`` would rebind it; import ``mamba_jax.generation.cli`` instead.)
"""

from mamba_jax.generation.cli import main

if __name__ == "__main__":
    main()
