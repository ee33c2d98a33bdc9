"""The @triton.jit kernels, one concern per module: int8_gemm, int4_gemm, quant_act, configs.

Importing a kernel module imports triton; whether its kernels are interpreted is decided at that
import (TRITON_INTERPRET=1 must be set before), so ops.py imports them lazily."""
