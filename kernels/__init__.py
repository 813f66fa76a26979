"""Hot paths of the FwPKM memory: a PyTorch path and, on CUDA, Triton kernels.

- ``kernels.ops``: what the memory calls; picks the backend (``set_backend``, per-call
  ``backend=``; "auto" = Triton for CUDA tensors when triton imports, else PyTorch) and makes
  the row operations differentiable to any order.
- ``kernels.torch_ops``: the PyTorch path of each operation (the reference of the kernels).
- ``kernels.triton_ops``: the Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
"""
