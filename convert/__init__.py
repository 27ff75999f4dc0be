"""``python -m convert``: published PyTorch / Hugging Face Mamba checkpoints into our Orbax checkpoints, and back.

- ``hub``: a source argument -> a local directory (itself, or a Hub snapshot).
- ``formats``: which config dialect and weight files a directory holds.
- ``readers``, ``torch_zip``: the tensors of safetensors / torch zip files (sharded or not), lazily; ``.bin`` files
  are read without torch, through an unpickler that only rebuilds tensors.
- ``keymap``: mamba_ssm / transformers tensor names <-> our parameter paths, with layout hooks.
- ``pipeline``: config -> abstract model -> checked plan -> tensors converted one at a time.
- ``writer``: our checkpoint directory, written atomically; ``to_orbax``: the import command.
- ``verify``: logits parity with transformers in torch; ``export_hf``: ours -> a transformers directory.
"""
