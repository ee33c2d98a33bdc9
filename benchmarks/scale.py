"""Out-of-core PTQ at scale: a >1B-parameter LLaMA (random weights, FP32 safetensors on disk)
quantized block by block with qc.quantize_sequential.

    python benchmarks/scale.py all --dir /tmp/qcompile-scale        # everything below, then deletes the files
    python benchmarks/scale.py make --dir D --layers 22             # just the checkpoint
    python benchmarks/scale.py run --dir D --method gptq            # one measured run (a child process)
    python benchmarks/scale.py run --dir D --method gptq --resume   # finish a killed run (split a long one)
    python benchmarks/scale.py smollm2 --dir /tmp/x [--method M] [--propagate-error on|off|both]
                                                                    # SmolLM2-135M in memory vs sequential

Measured, each run in its own process (peak RSS = the kernel's high-water mark, ru_maxrss):
- w4a16 + GPTQ and w8a8 + SmoothQuant on the 22-layer model (TinyLlama-1.1B's shape, 4.4 GB FP32;
  `--layers 33` makes the same with 33 blocks, 6.3 GB): peak RSS against the model size, seconds
  per block (from the manifest), total;
- time as the model grows: the same config with 2, 4, 8 layers (and 22): seconds per block;
- in memory (qc.prepare / calibrate / convert on the whole model) against sequential on a 2-layer
  model small enough for this shared machine, same checkpoint, same calibration: RSS, time, and
  whether the GPTQ codes are equal.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import torch

# TinyLlama-1.1B's shape (a real LLaMA-architecture model): 22 layers of 44 M parameters, GQA 32/4 heads
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
SEQ, N_BATCHES = 256, 4          # calibration: 4 sequences of 256 random tokens (1024 rows per Hessian)
SHARD_BYTES = 1 << 30


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, **CONFIG)


def make_checkpoint(folder: pathlib.Path, layers: int, seed: int = 0) -> int:
    """Random LLaMA weights written shard by shard (never the whole model in memory), as
    transformers would save them: config.json, model-0000k-of-0000n.safetensors, the index."""
    import accelerate
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = llama_config(layers)
    with accelerate.init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    shards, current, size = [], {}, 0  # shards: {name: bytes} of each written file (the tensors are freed)
    for name, p in meta.state_dict().items():
        t = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.02
        current[name] = t
        size += t.numel() * 4
        if size >= SHARD_BYTES:
            save_file(current, folder / f"shard-{len(shards) + 1:05d}.safetensors")
            shards.append({k: v.numel() * 4 for k, v in current.items()})
            current, size = {}, 0
    if current:
        save_file(current, folder / f"shard-{len(shards) + 1:05d}.safetensors")
        shards.append({k: v.numel() * 4 for k, v in current.items()})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        old = folder / f"shard-{i:05d}.safetensors"
        new = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        old.rename(folder / new)
        for name, nbytes in shard.items():
            weight_map[name] = new
            total += nbytes
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


def calibration_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, CONFIG["vocab_size"], (1, SEQ), generator=gen) for _ in range(N_BATCHES)]


METHODS = {
    "gptq": ("w4a16", ["gptq"]),
    # GPTQ without float_targets: no K x K cross term and one calibration pass per group, not two
    "gptq-plain": ("w4a16", [{"name": "gptq", "float_targets": False}]),
    "smoothquant": ("w8a8", ["smoothquant"]),
}


class MemoryProbe:
    """Peak resident memory per phase of the run: a thread samples /proc/self/statm every 5 ms and
    charges the sample to the phase running then (the driver's steps, wrapped by `install`)."""

    def __init__(self):
        import threading

        self.phase, self.peaks, self.stop = "start", {}, False
        self.stage, self.stage_peaks = None, {}  # the peak of each stage by name: does it grow with the depth?
        self.page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def _rss_mb(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page / 2**20

    def _sample(self) -> None:
        while not self.stop:
            key, stage, rss = self.phase, self.stage, self._rss_mb()
            self.peaks[key] = max(self.peaks.get(key, 0.0), rss)
            if stage is not None:
                self.stage_peaks[stage] = max(self.stage_peaks.get(stage, 0.0), rss)
            time.sleep(0.005)

    def wrap(self, owner, attr: str, label: str | None) -> None:
        """Charge `owner.attr`'s calls to `label` (+ the stage being processed); label None: the
        call is a stage, named by its second argument."""
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            outer, stage = self.phase, self.stage
            if label is None:
                self.stage = args[1]
                self.phase = f"stage {_kind(self.stage)}"
            else:
                self.phase = label if self.stage is None else f"{label} ({_kind(self.stage)})"
            try:
                return original(*args, **kwargs)
            finally:
                if label is None:
                    print(f"STAGE_PEAK {self.stage} {self.stage_peaks.get(self.stage, 0.0):.0f} MB", flush=True)
                self.phase, self.stage = outer, stage

        setattr(owner, attr, wrapped)

    def install(self) -> "MemoryProbe":
        from qcompile.sequential import driver, store

        self.wrap(driver, "_stage", None)
        self.wrap(driver, "capture_block_inputs", "prologue (float, up to block 0)")
        self.wrap(driver, "find_head", "finding the head")
        self.wrap(driver, "_save_floats", "float tensors")
        for attr, label in (("prepare_captured", "prepare"), ("calibrate", "calibrate"), ("convert", "convert"),
                            ("_run", "run stage")):
            self.wrap(driver, attr, label)
        self.wrap(store.OutputDir, "save_stage", "save")
        self.wrap(torch.export, "export", "export")
        return self


def _kind(stage: str) -> str:
    """'block' for model.layers.N (all blocks share one row), else the module name."""
    return "block" if stage.rsplit(".", 1)[-1].isdigit() else stage


def run(folder: pathlib.Path, method: str, out: pathlib.Path, in_memory: bool, save_codes: bool = False,
        resume: bool = False) -> dict:
    """One measured run in this process; prints and returns a JSON line. The peak RSS is read when
    the quantization returns (saving the codes for a comparison afterwards is not measured).
    `resume`: keep the output folder of an earlier (killed) run and finish it: a long run split
    into several shorter ones; the manifest keeps every stage's own seconds."""
    import qcompile as qc

    torch.manual_seed(0)
    probe = MemoryProbe().install() if not in_memory else None
    recipe, algorithms = METHODS[method]
    batches = calibration_batches()
    start = time.perf_counter()
    if in_memory:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        class LM(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(input_ids=ids, use_cache=False).logits

        prepared = qc.prepare(LM(model), (batches[0],), recipe, algorithms=algorithms)
        del model
        qc.calibrate(prepared, batches, progress=False)
        quantized = qc.convert(prepared)
        del prepared
        seconds = time.perf_counter() - start
        result = {"seconds": seconds, "peak_rss_mb": _peak_mb()}
        if save_codes:
            codes = {k[len("qc_w_m_"):]: v for k, v in quantized.named_buffers() if k.startswith("qc_w_m_")}
            torch.save(codes, out / "in_memory_codes.pt")
    else:
        result_dir = out / f"seq-{method}-{folder.name}"
        if not resume:
            shutil.rmtree(result_dir, ignore_errors=True)
        ckpt = qc.quantize_sequential(str(folder), batches, result_dir, recipe, algorithms=algorithms, progress=False)
        seconds = time.perf_counter() - start
        peak = _peak_mb()
        per_block = [ckpt.stage_info(b)["seconds"] for b in ckpt.manifest["blocks"]]
        result = {"seconds": seconds, "peak_rss_mb": peak, "block_seconds": per_block,
                  "block_cpu_seconds": [ckpt.stage_info(b)["cpu_seconds"] for b in ckpt.manifest["blocks"]],
                  "head_seconds": [ckpt.stage_info(h)["seconds"] for h in ckpt.manifest["head"]],
                  "output_bytes": sum(f.stat().st_size for f in result_dir.rglob("*") if f.is_file())}
        if save_codes:
            torch.save({t.replace(".", "_"): c for t, c, *_ in ckpt.quantized_weights()}, out / "sequential_codes.pt")
    if probe is not None:
        probe.stop = True
        result["peak_rss_mb_by_phase"] = {k: round(v) for k, v in probe.peaks.items()}
    result.update(method=method, in_memory=in_memory, layers=json.loads((folder / "config.json").read_text())
                  ["num_hidden_layers"], model_bytes=_folder_bytes(folder))
    print("RESULT " + json.dumps(result), flush=True)
    return result


def smollm2_both_ways(method: str, root: pathlib.Path, propagate: tuple[bool, ...] = (True, False)) -> None:
    """SmolLM2-135M-Instruct (all 30 layers, tied lm_head), real text: in memory (qc.prepare /
    calibrate / convert) and sequentially from the same safetensors file, with and without error
    propagation: every weight's codes and scales against the in-memory model's, the max logit
    difference and each model's perplexity on evaluation text."""
    import qcompile as qc
    from qcompile.testing.llm import _cache_dir, load_smollm2, token_chunks

    recipe, algorithms = METHODS[method]
    model, tokenizer = load_smollm2()
    batches = list(token_chunks(tokenizer, "calibration", 256, 8).split(2))
    evaluation = token_chunks(tokenizer, "evaluation", 256, 2)

    class LM(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    t = time.perf_counter()
    prepared = qc.prepare(LM(model), (batches[0],), recipe, algorithms=algorithms)
    qc.calibrate(prepared, batches, progress=False)
    whole = qc.convert(prepared)
    del prepared
    t_whole = time.perf_counter() - t
    print(f"SmolLM2-135M {method}: perplexity FP32 {_perplexity(LM(model), evaluation):.3f}, "
          f"in memory {_perplexity(whole, evaluation):.3f} ({t_whole:.0f} s)", flush=True)
    for propagate_error in propagate:
        out = root / f"smollm2-{method}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        ckpt = qc.quantize_sequential(str(_cache_dir()), batches, out, recipe, algorithms=algorithms,
                                      propagate_error=propagate_error, progress=False)
        t_seq = time.perf_counter() - t
        equal_codes = equal_scales = 0
        weights = list(ckpt.quantized_weights())
        for name, codes, scale, *_ in weights:
            key = "qc_w_m_" + name.replace(".", "_")
            equal_codes += torch.equal(codes, getattr(whole, key))
            equal_scales += torch.equal(scale, getattr(whole, key + "_scale"))
        seq_module = ckpt.module()
        seq_lm = lambda ids: seq_module(input_ids=ids).logits  # noqa: E731
        with torch.no_grad():
            diff = max(float((seq_lm(ids[None]) - whole(ids[None])).abs().max()) for ids in evaluation)
        print(f"  sequential, propagate_error={propagate_error}: {len(weights)} quantized weights, equal codes "
              f"{equal_codes}/{len(weights)}, equal scales {equal_scales}/{len(weights)}, max |logit difference| "
              f"{diff:.3g}, perplexity {_perplexity(seq_lm, evaluation):.3f} ({t_seq:.0f} s; not timed under "
              f"the lock)", flush=True)
        shutil.rmtree(out, ignore_errors=True)


def _perplexity(lm, evaluation: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over the evaluation sequences, each on its own."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in evaluation:
            logits = lm(ids[None])[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            count += ids.numel() - 1
    return float(torch.exp(torch.tensor(nll / count)))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _folder_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def child(*args) -> dict:
    """Run `run` in a fresh process (its own peak RSS), with this script's interpreter and path."""
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, __file__, "run", *map(str, args)], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["make", "run", "all", "smollm2"])
    ap.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/qcompile-scale"))
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--method", choices=list(METHODS), default=None, help="run: default gptq; smollm2: default both")
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--save-codes", action="store_true", help="save the GPTQ codes for the in-memory comparison")
    ap.add_argument("--resume", action="store_true", help="finish the output folder of a killed run")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--propagate-error", choices=["on", "off", "both"], default="both",
                    help="smollm2: sequential runs with error propagation on, off, or one of each")
    ap.add_argument("--sweep", default="2,4,8", help="layer counts of the time-vs-depth runs")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.command == "make":
        print(make_checkpoint(args.dir, args.layers))
        return
    if args.command == "run":
        out = args.out or args.dir.parent
        out.mkdir(parents=True, exist_ok=True)
        run(args.dir, args.method or "gptq", out, args.in_memory, args.save_codes, args.resume)
        return
    if args.command == "smollm2":
        print_versions()
        for method in [args.method] if args.method else METHODS:
            smollm2_both_ways(method, args.dir, {"on": (True,), "off": (False,),
                                                 "both": (True, False)}[args.propagate_error])
        return
    print_versions()
    root = args.dir
    rows = []
    try:
        for layers in [int(x) for x in args.sweep.split(",")] + [args.layers]:
            folder = root / f"llama-{layers}l"
            t = time.perf_counter()
            size = make_checkpoint(folder, layers)
            print(f"checkpoint {folder}: {size / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s", flush=True)
            methods = list(METHODS) if layers == args.layers else ["gptq"]
            for method in methods:
                r = child(folder, "--method", method, "--out", root, *(["--save-codes"] if layers == 2 else []))
                rows.append(r)
                print(json.dumps(r), flush=True)
            if layers == 2:  # the in-memory comparison, on the smallest model only (shared machine)
                r = child(folder, "--method", "gptq", "--in-memory", "--out", root)
                rows.append(r)
                print(json.dumps(r), flush=True)
                a, b = torch.load(root / "in_memory_codes.pt"), torch.load(root / "sequential_codes.pt")
                equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                print(f"in-memory vs sequential GPTQ codes on {len(a)} weights: {'equal' if equal else 'DIFFERENT'}")
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table(rows)


def print_versions() -> None:
    import platform

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")


def table(rows: list[dict]) -> None:
    print("\n| model | method | where | peak RSS MB | RSS / model | s per block (median) | total s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        blocks = sorted(r.get("block_seconds", []))
        med = f"{blocks[len(blocks) // 2]:.1f}" if blocks else "-"
        print(f"| {r['layers']} layers, {r['model_bytes'] / 1e9:.2f} GB | {r['method']} | "
              f"{'in memory' if r['in_memory'] else 'sequential'} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] * 2**20 / r['model_bytes']:.2f} | {med} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
