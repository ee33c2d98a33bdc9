"""Run llama.cpp (llama-cpp-python) on token ids; executed as a script in a child process by
runtime.py, so it imports neither torch nor qcompile (fork after torch started can deadlock, and
llama.cpp's threads would fight torch's). Reads a JSON request, writes an .npz of results."""
import json
import sys
import time

sys.path.pop(0)  # this script's folder holds qcompile modules (llama.py, tokenizer.py) that must not shadow others

import numpy as np  # noqa: E402


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return float((lse - z[np.arange(len(targets)), targets]).sum())


def main(request_path: str) -> None:
    with open(request_path) as f:
        req = json.load(f)
    import llama_cpp
    import llama_cpp.llama_cpp as capi

    if not req.get("extra_buffers", True):  # no repacked / AMX weight buffers: the plain CPU kernels
        defaults = capi.llama_model_default_params

        def model_params():
            params = defaults()
            params.use_extra_bufts = False
            return params

        capi.llama_model_default_params = model_params
    ids = np.load(req["ids"])
    n, seq = ids.shape
    llm = llama_cpp.Llama(model_path=req["model"], n_ctx=max(seq + req.get("gen_tokens", 0), 8), n_batch=seq,
                          n_ubatch=seq, n_threads=req["threads"], n_threads_batch=req["threads"], logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False, seed=0)
    out = {"seconds": [], "nll": []}
    logits = [] if req.get("logits") else None
    for i in range(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[i].tolist())
        out["seconds"].append(time.perf_counter() - t0)
        scores = np.array(llm.scores[:seq], dtype=np.float32)
        out["nll"].append(log_softmax_nll(scores[:-1], ids[i, 1:]))
        if logits is not None:
            logits.append(scores)
    gen = req.get("gen_tokens", 0)
    if gen:  # token-by-token decoding speed after the first chunk as prompt
        steps = []
        for t in range(gen):
            t0 = time.perf_counter()
            llm.eval([int(ids[0, t % seq])])
            steps.append(time.perf_counter() - t0)
        out["decode_seconds"] = steps
    if req.get("text") is not None:
        out["tokens"] = np.array(llm.tokenize(req["text"].encode("utf-8"), add_bos=False, special=False))
    result = {k: np.asarray(v) for k, v in out.items()}
    if logits is not None:
        result["logits"] = np.stack(logits)
    result["metadata"] = np.array(json.dumps(llm.metadata))
    np.savez(req["out"], **result)


if __name__ == "__main__":
    main(sys.argv[1])
