"""The Triton kernels as `torch.library.custom_op`s: one opaque node each for torch.export / compile.

Every op has a fake implementation (shapes only) and a pure-PyTorch reference implementation
(`*_reference`) with the kernel's semantics: the tests compare the kernels to it, and it is what runs
when the tensors are on the CPU and TRITON_INTERPRET=1 is not set (so a lowered module still runs
on a machine without a GPU). With CUDA tensors, or under the interpreter, the Triton kernel runs.

    triton_quantize_per_token(x)                     -> int8 codes, scale [..., 1], zero point [..., 1]
    triton_quantize_static(x, s, z, qmin, qmax, dt)  -> codes (per-tensor s, z)
    triton_int8_linear(a, s_a, w, s_w, b, corr, act, s_out, z_out, dt, qmin, qmax) -> float or codes
    triton_int8_conv2d(...)                          -> the same GEMM on an im2col of the codes
    triton_int4_linear(x, w_packed, s_w, group, b, act, compute_dtype, z_w, signed) -> x.dtype

int8_linear: a holds int8 or uint8 codes [..., K]; s_a is per tensor (one element) or per row
[..., 1]; w is int8 [N, K]; `corr` [N] int32 = (shift - z_a) * sum_k w[n, k] with shift = 128 for
uint8 codes, 0 for int8 (see kernels/int8_gemm.py). With dt int8/uint8 the epilogue requantizes
with (s_out, z_out) to codes in [qmin, qmax]; with a float dt it stores floats.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...numerics import per_token_qparams_math, quantize_math, unpack_int4

QMIN, QMAX = -128, 127
MAX_K = (2 ** 31 - 1) // (255 * 128)   # int32 accumulator exact: |q_a - z_a| <= 255, |w| <= 128
ACTS = ("none", "relu", "gelu", "gelu_tanh", "silu")
CODE_DTYPES = (torch.int8, torch.uint8)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: Tensor) -> bool:
    """Run the Triton kernel (CUDA tensors, or the CPU interpreter) rather than the reference."""
    return interpreting() or all(t.is_cuda for t in tensors)


def _arch(t: Tensor) -> int:
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 80   # the interpreter: any config runs; take the sm_80 table


def _bench(launch, m: int, n: int, k: int):
    """The cost of a config for configs.choose: do_bench milliseconds on CUDA. Under the interpreter
    the cost is per interpreted program-step, not per FLOP (triton-notes section 1), so the config with
    the fewest programs x K-steps is taken (every shipped config is tested on its own anyway)."""
    if interpreting():
        return lambda c: -(-m // c.block_m) * -(-n // c.block_n) * -(-k // c.block_k)
    import triton.testing

    return lambda cfg: triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")


# ---------------------------------------------------------------- activation quantization

def quantize_per_token_reference(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    scale, zp = per_token_qparams_math(x, QMIN, QMAX)
    q = quantize_math(x, scale, zp, -1, x.shape[-1], QMIN, QMAX, torch.int8)
    return q, scale, zp


@torch.library.custom_op("qcompile::triton_quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric int8 per row of the last dim; codes, float32 scales and int32 zero points (0)."""
    if not use_triton(x) or x.numel() == 0:
        return quantize_per_token_reference(x)
    from .kernels.quant_act import launch_quantize_rows

    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    q = torch.empty(x2d.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x2d.shape[0], dtype=torch.float32, device=x.device)
    zp = torch.empty(x2d.shape[0], dtype=torch.int32, device=x.device)
    launch_quantize_rows(x2d, q, scale, zp, dynamic=True, qmin=QMIN, qmax=QMAX)
    lead = x.shape[:-1]
    return q.reshape(x.shape), scale.reshape(*lead, 1), zp.reshape(*lead, 1)


@quantize_per_token.register_fake
def _(x):
    shape = (*x.shape[:-1], 1)
    return (torch.empty_like(x, dtype=torch.int8), x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=torch.int32))


@torch.library.custom_op("qcompile::triton_quantize_static", mutates_args=())
def quantize_static(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                    dtype: torch.dtype) -> Tensor:
    """Per-tensor quantization with a fixed (calibrated) scale and zero point."""
    if not use_triton(x, scale, zero_point) or x.numel() == 0 or x.dim() == 0:
        return quantize_math(x, scale, zero_point, 0, 0, qmin, qmax, dtype)
    from .kernels.quant_act import launch_quantize_flat

    xc = x.contiguous()
    q = torch.empty(xc.shape, dtype=dtype, device=x.device)
    launch_quantize_flat(xc, q, scale.reshape(()).float(), zero_point.reshape(()).to(torch.int32),
                         qmin=qmin, qmax=qmax)
    return q


@quantize_static.register_fake
def _(x, scale, zero_point, qmin, qmax, dtype):
    return torch.empty_like(x, dtype=dtype)


# ---------------------------------------------------------------- int8 GEMM

def _apply_act(y: Tensor, act: str) -> Tensor:
    if act == "relu":
        return torch.relu(y)
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "silu":
        return F.silu(y)
    return y


def int8_accumulate(a2d: Tensor, w: Tensor, corr: Optional[Tensor]) -> Tensor:
    """Exact int32 [M, N] = sum_k (a - shift) w + corr, with shift = 128 for uint8 codes."""
    a8 = (a2d.to(torch.int16) - 128).to(torch.int8) if a2d.dtype == torch.uint8 else a2d
    if a8.device.type == "cpu":
        acc = torch._int_mm(a8, w.t())   # CPU: any shape (see backends/torch_cpu/ops.py)
    else:
        acc = (a8.double() @ w.double().t()).to(torch.int32)   # exact: |sum| < 2**31 < 2**53
    if corr is not None:
        acc = acc + corr.to(torch.int32)
    return acc


def int8_linear_reference(a, a_scale, w, w_scale, bias, corr, act, out_scale, out_zp, out_dtype,
                          out_qmin, out_qmax) -> Tensor:
    k, n = a.shape[-1], w.shape[0]
    a2d = a.reshape(-1, k)
    y = int8_accumulate(a2d, w, corr).to(torch.float32)
    y = y * (a_scale.reshape(-1, 1) if a_scale.numel() > 1 else a_scale.reshape(()).float())
    y = y * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    y = _apply_act(y, act)
    if out_dtype in CODE_DTYPES:
        y = quantize_math(y, out_scale, out_zp, 0, 0, out_qmin, out_qmax, out_dtype)
    return y.to(out_dtype).reshape(*a.shape[:-1], n)


def _check_int8_linear(a, a_scale, w, w_scale, act, out_scale, out_dtype):
    torch._check(a.dtype in CODE_DTYPES, lambda: f"activation codes must be int8/uint8, got {a.dtype}")
    torch._check(w.dtype == torch.int8 and w.dim() == 2, lambda: "w must be int8 [N, K]")
    torch._check(a.shape[-1] == w.shape[1], lambda: "a [..., K] and w [N, K] disagree on K")
    torch._check(w.shape[1] <= MAX_K, lambda: f"K > {MAX_K} can overflow the int32 accumulator")
    torch._check(act in ACTS, lambda: f"act must be one of {ACTS}, got {act!r}")
    torch._check(out_dtype not in CODE_DTYPES or out_scale is not None, lambda: "requantizing needs out_scale")


@torch.library.custom_op("qcompile::triton_int8_linear", mutates_args=())
def int8_linear(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                corr: Optional[Tensor], act: str, out_scale: Optional[Tensor], out_zp: Optional[Tensor],
                out_dtype: torch.dtype, out_qmin: int, out_qmax: int) -> Tensor:
    _check_int8_linear(a, a_scale, w, w_scale, act, out_scale, out_dtype)
    if not use_triton(a, w) or a.numel() == 0:
        return int8_linear_reference(a, a_scale, w, w_scale, bias, corr, act, out_scale, out_zp,
                                     out_dtype, out_qmin, out_qmax)
    from .kernels.configs import choose
    from .kernels.int8_gemm import launch_int8_gemm

    k, n = a.shape[-1], w.shape[0]
    a2d = a.reshape(-1, k)
    if a2d.stride(-1) != 1:
        a2d = a2d.contiguous()
    per_row = a_scale.numel() > 1
    a_s = a_scale.reshape(-1).float().contiguous() if per_row else a_scale.reshape(()).float()
    requant = out_dtype in CODE_DTYPES
    c = torch.empty((a2d.shape[0], n), dtype=out_dtype, device=a.device)
    o_s = out_scale.reshape(()).float() if requant else None
    o_z = (out_zp.reshape(()).to(torch.int32) if out_zp is not None else torch.zeros((), dtype=torch.int32, device=a.device)) if requant else None

    def launch(cfg):
        launch_int8_gemm(a2d, w, c, a_s, w_scale.float().contiguous(), bias, corr, o_s, o_z, a_per_row=per_row,
                         act=act, qmin=out_qmin, qmax=out_qmax, config=cfg)

    cfg = choose("int8_gemm", _arch(a), a2d.shape[0], (n, k, a.dtype, act, out_dtype), bench=_bench(launch, a2d.shape[0], n, k))
    launch(cfg)
    return c.reshape(*a.shape[:-1], n)


@int8_linear.register_fake
def _(a, a_scale, w, w_scale, bias, corr, act, out_scale, out_zp, out_dtype, out_qmin, out_qmax):
    _check_int8_linear(a, a_scale, w, w_scale, act, out_scale, out_dtype)
    return a.new_empty((*a.shape[:-1], w.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------- int8 conv2d = im2col + GEMM

def im2col_codes(a: Tensor, a_zp: Tensor, kernel_size, stride, padding) -> tuple[Tensor, int, int]:
    """[B, C, H, W] codes -> [B*OH*OW, C*kh*kw] (the weight's flatten order), padded with the zero
    point: the reference pads the dequantized input with 0.0, which is code z_a exactly.
    This im2col is materialized by PyTorch, not fused into the kernel (kh*kw times the input's bytes)."""
    kh, kw = kernel_size
    ph, pw = padding
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph), value=int(a_zp.reshape(()).item()) if a_zp is not None else 0)
    b, c = a.shape[:2]
    patches = a.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])   # [B, C, OH, OW, kh, kw]
    oh, ow = patches.shape[2], patches.shape[3]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw), oh, ow


@torch.library.custom_op("qcompile::triton_int8_conv2d", mutates_args=())
def int8_conv2d(a: Tensor, a_scale: Tensor, a_zp: Optional[Tensor], w: Tensor, w_scale: Tensor,
                bias: Optional[Tensor], corr: Optional[Tensor], kernel_size: list[int], stride: list[int],
                padding: list[int], act: str, out_scale: Optional[Tensor], out_zp: Optional[Tensor],
                out_dtype: torch.dtype, out_qmin: int, out_qmax: int) -> Tensor:
    """a [B, C, H, W] codes (per-tensor scale), w [OC, C*kh*kw] int8 -> [B, OC, OH, OW]."""
    cols, oh, ow = im2col_codes(a, a_zp, kernel_size, stride, padding)
    y = int8_linear(cols, a_scale, w, w_scale, bias, corr, act, out_scale, out_zp, out_dtype, out_qmin, out_qmax)
    return y.reshape(a.shape[0], oh, ow, w.shape[0]).permute(0, 3, 1, 2).contiguous()


@int8_conv2d.register_fake
def _(a, a_scale, a_zp, w, w_scale, bias, corr, kernel_size, stride, padding, act, out_scale, out_zp,
      out_dtype, out_qmin, out_qmax):
    oh = (a.shape[2] + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    ow = (a.shape[3] + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    return a.new_empty((a.shape[0], w.shape[0], oh, ow), dtype=out_dtype)


# ---------------------------------------------------------------- int4 weight-only GEMM

def int4_linear_reference(x, w_packed, w_scale, group, bias, act, compute_dtype, w_zp=None, signed=True) -> Tensor:
    k, n = x.shape[-1], w_packed.shape[0]
    q = unpack_int4(w_packed, k, signed=signed).float()                    # [N, K]
    if w_zp is not None:
        q = q - w_zp.float().repeat_interleave(group, dim=1)[:, :k]
    w = q * w_scale.float().repeat_interleave(group, dim=1)[:, :k]          # the reference's (q - z) * s
    y = F.linear(x.to(compute_dtype).float(), w, None if bias is None else bias.float())
    return _apply_act(y, act).to(x.dtype)


def _check_int4_linear(x, w_packed, w_scale, group, act, compute_dtype, w_zp=None):
    k = x.shape[-1]
    torch._check(w_packed.dtype == torch.uint8 and w_packed.dim() == 2, lambda: "w_packed must be uint8 [N, K/2]")
    torch._check(w_packed.shape[1] == (k + 1) // 2, lambda: "w_packed [N, ceil(K/2)] and x [..., K] disagree on K")
    torch._check(w_scale.shape[0] == w_packed.shape[0] and w_scale.shape[1] == -(-k // group),
                 lambda: "w_scale must be [N, ceil(K / group)]")
    torch._check(group % 16 == 0, lambda: f"group size {group} must be a multiple of 16")
    torch._check(w_zp is None or tuple(w_zp.shape) == tuple(w_scale.shape), lambda: "w_zp must be shaped like w_scale")
    torch._check(compute_dtype in (torch.float16, torch.bfloat16), lambda: "compute_dtype is float16 or bfloat16")
    torch._check(act in ACTS, lambda: f"act must be one of {ACTS}, got {act!r}")


@torch.library.custom_op("qcompile::triton_int4_linear", mutates_args=())
def int4_linear(x: Tensor, w_packed: Tensor, w_scale: Tensor, group: int, bias: Optional[Tensor], act: str,
                compute_dtype: torch.dtype, w_zp: Optional[Tensor] = None, signed: bool = True) -> Tensor:
    """x [..., K] float; w_packed [N, ceil(K/2)] int4 (signed) or uint4 codes; w_scale / w_zp [N, ceil(K/group)]."""
    _check_int4_linear(x, w_packed, w_scale, group, act, compute_dtype, w_zp)
    if not use_triton(x, w_packed) or x.numel() == 0:
        return int4_linear_reference(x, w_packed, w_scale, group, bias, act, compute_dtype, w_zp, signed)
    from .kernels.configs import choose, gemm_configs
    from .kernels.int4_gemm import launch_int4_gemm

    k, n = x.shape[-1], w_packed.shape[0]
    x2d = x.reshape(-1, k)
    c = torch.empty((x2d.shape[0], n), dtype=x.dtype, device=x.device)
    s = w_scale.float().contiguous()
    z = w_zp.to(torch.int32).contiguous() if w_zp is not None else None

    def launch(cfg):
        launch_int4_gemm(x2d, w_packed, c, s, bias, group=group, act=act, compute=compute_dtype, config=cfg,
                         zp=z, signed=signed)

    arch, m = _arch(x), x2d.shape[0]
    fits = [cfg for cfg in gemm_configs("int4_gemm", arch, m) if group % cfg.block_k == 0]
    torch._check(bool(fits), lambda: f"no int4 config has a BLOCK_K dividing the group size {group}")
    cfg = fits[0] if len(fits) == 1 else choose("int4_gemm", arch, m, (n, k, group, act), bench=_bench(launch, m, n, k))
    if group % cfg.block_k:
        cfg = fits[0]
    launch(cfg)
    return c.reshape(*x.shape[:-1], n)


@int4_linear.register_fake
def _(x, w_packed, w_scale, group, bias, act, compute_dtype, w_zp=None, signed=True):
    _check_int4_linear(x, w_packed, w_scale, group, act, compute_dtype, w_zp)
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))
