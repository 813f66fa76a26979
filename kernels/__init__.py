"""Hot paths of the FwPKM memory: a PyTorch path and, on CUDA, Triton kernels."""
