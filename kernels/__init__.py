"""Hot paths of the FwPKM memory: a PyTorch path, C++ loops for the CPU and Triton kernels for CUDA.

- ``kernels.ops``: what the memory calls; picks the backend (``set_backend``, per-call
  ``backend=``; "auto" = Triton for CUDA tensors when triton imports, the C++ kernels for CPU
  tensors when they build, else PyTorch) and makes the row operations differentiable to any order.
- ``kernels.torch_ops``: the PyTorch path of each operation (the reference of the kernels).
- ``kernels.triton_ops``: the Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
- ``kernels.cpu_ops``: C++ loops for CPU tensors (``cpu_ops.cpp``, built on first use), the
  "auto" choice on the CPU; their results are the PyTorch path's, bitwise where tested.
"""
