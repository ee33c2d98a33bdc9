"""llama.cpp as the runtime that checks a GGUF file: logits, perplexity and speed from llama-cpp-python,
each run in a child process (llama.cpp after torch in one process can deadlock on fork and fights for
the cores), with an F32 KV cache (its default F16 cache alone moves logits by 2e-3 to 2e-2), and
llama.cpp's own quantizer (`llama_model_quantize`, the llama-quantize tool's function) as a baseline."""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

CHILD = pathlib.Path(__file__).with_name("_runtime_child.py")


@dataclass
class LlamaCppRun:
    nll: np.ndarray                     # per chunk, summed over its predicted tokens
    seconds: np.ndarray                 # per chunk: evaluating it as one batch (prompt processing)
    logits: np.ndarray | None           # [n, seq, vocab] when asked for
    decode_seconds: np.ndarray | None   # per generated token, when asked for
    tokens: np.ndarray | None           # llama.cpp's tokenization of `text`, when asked for
    metadata: dict

    def perplexity(self, seq_len: int) -> float:
        return math.exp(float(self.nll.sum()) / (len(self.nll) * (seq_len - 1)))


def run_llama_cpp(path, ids, *, logits: bool = False, gen_tokens: int = 0, text: str | None = None,
                  threads: int = 2, extra_buffers: bool = True, timeout: float = 1200) -> LlamaCppRun:
    """Evaluate each row of `ids` ([n, seq] token ids, a numpy array or tensor) from an empty context in
    llama.cpp. Needs llama-cpp-python (`make setup` builds it). `extra_buffers=False` turns off
    llama.cpp's extra weight buffers (the x86 Q4_0 repacking, AMX), leaving its plain kernels."""
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    if ids.ndim != 2:
        raise ValueError(f"ids must be [n, seq], got shape {ids.shape}")
    with tempfile.TemporaryDirectory(prefix="qcompile-llama-") as tmp:
        req = {"model": str(path), "ids": os.path.join(tmp, "ids.npy"), "out": os.path.join(tmp, "out.npz"),
               "threads": threads, "logits": logits, "extra_buffers": extra_buffers, "gen_tokens": gen_tokens, "text": text}
        np.save(req["ids"], ids)
        with open(os.path.join(tmp, "req.json"), "w") as f:
            json.dump(req, f)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
        proc = subprocess.run([sys.executable, str(CHILD), os.path.join(tmp, "req.json")], capture_output=True,
                              text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp failed on {path} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with np.load(req["out"]) as z:
            get = lambda k: z[k] if k in z.files else None  # noqa: E731
            return LlamaCppRun(nll=z["nll"], seconds=z["seconds"], logits=get("logits"),
                               decode_seconds=get("decode_seconds"), tokens=get("tokens"),
                               metadata=json.loads(str(z["metadata"])))


def llama_cpp_logits(path, ids, **kw) -> np.ndarray:
    """[n, seq, vocab] float32 logits of llama.cpp at every position."""
    return run_llama_cpp(path, ids, logits=True, **kw).logits


def llama_cpp_quantize(src, dst, ftype: str, threads: int = 2, timeout: float = 1200) -> None:
    """llama.cpp's own quantizer on a GGUF file (`ftype` "Q8_0", "Q4_0", "Q4_1", ...: its default mix for
    that type, as `llama-quantize src dst TYPE`), in a child process."""
    code = ("import sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{ftype}\n"
            f"p.nthread = {int(threads)}\n"
            "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def logit_agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """How close two [..., vocab] logit arrays are, per position: max |difference|, cosine (min and mean),
    KL(reference || other) of the softmaxes (mean and max), top-1 agreement."""
    a = np.asarray(reference, dtype=np.float64).reshape(-1, reference.shape[-1])
    b = np.asarray(other, dtype=np.float64).reshape(-1, other.shape[-1])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    la = a - a.max(-1, keepdims=True)
    la = la - np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb = lb - np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return {"max_abs": float(np.abs(a - b).max()), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).mean()), "positions": int(a.shape[0])}
