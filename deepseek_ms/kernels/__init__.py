"""Native kernels behind the backend seam (deepseek_ms.backend.native_kernels).

CPU: `cpu_kernels.cc`, built on first use with the host's C++ compiler and called from the
compiled graphs as MindSpore AOT custom ops. Devices keep MindSpore's own kernels.
"""
