"""qc.quantize_sequential: block-by-block PTQ with the weights on disk.

A tiny random LLaMA saved by transformers as sharded safetensors; the model given to the driver is
built on the meta device. Numbers asserted: GPTQ codes and scales equal to whole-model GPTQ,
logits equal, a resumed run equal to an uninterrupted one, errors that name the tensor or file.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import qcompile as qc
from qcompile.sequential.store import MANIFEST

# plain GPTQ (float_targets off) for the output-format tests: half the calibration passes; the
# float_targets test below turns it on
RECIPE, ALGORITHMS = "w4a16", [{"name": "gptq", "act_order": False, "clip_grid": 0, "float_targets": False}]
SMALL_GROUPS = qc.recipes["w4a16"].replace(weight=qc.QuantSpec("int4", qc.PerGroup(32), symmetric=True))


def _meta_llama(config):
    import accelerate
    from transformers import AutoModelForCausalLM

    with accelerate.init_empty_weights():
        return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(float model, checkpoint folder with 2+ shards, meta model, calibration batches)."""
    from qcompile.testing.llm import tiny_llama

    model = tiny_llama(seed=3, layers=2, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    model.save_pretrained(folder, max_shard_size="100KB")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(3)]
    return model, folder, _meta_llama(model.config), batches


@pytest.fixture(scope="module")
def sequential(llama, tmp_path_factory):
    model, folder, meta, batches = llama
    out = tmp_path_factory.mktemp("seq") / "out"
    return qc.quantize_sequential(meta, batches, out, SMALL_GROUPS, checkpoint=folder, algorithms=ALGORITHMS,
                                  onnx=True, progress=False)


class LM(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


def _codes(ckpt):
    return {name: (codes, scale, zp) for name, codes, scale, zp, _ in ckpt.quantized_weights()}


def _whole_model(model, batches, algorithms):
    prepared = qc.prepare(LM(model), (batches[0],), SMALL_GROUPS, algorithms=algorithms)
    qc.calibrate(prepared, batches, progress=False)
    return qc.convert(prepared)


def _assert_whole_models_codes(ckpt, whole):
    """7 linears per block and lm_head, each with the codes, scales and zero points whole-model GPTQ chose."""
    ours = _codes(ckpt)
    assert len(ours) == 2 * 7 + 1
    for name, (codes, scale, zp) in ours.items():
        key = "qc_w_m_" + name.replace(".", "_")
        assert torch.equal(codes, getattr(whole, key)), name
        assert torch.equal(scale, getattr(whole, key + "_scale")), name
        assert torch.equal(zp, getattr(whole, key + "_zero_point")), name


def test_sequential_gptq_equals_whole_model_gptq(llama, sequential):
    model, folder, meta, batches = llama
    assert len(list(folder.glob("*.safetensors"))) > 1  # the sharded index is exercised
    whole = _whole_model(model, batches, ALGORITHMS)
    _assert_whole_models_codes(sequential, whole)
    # the assembled model computes what the whole converted graph computes, bit for bit
    quantized = sequential.module()
    with torch.no_grad():
        for ids in batches[:2]:
            assert torch.equal(quantized(input_ids=ids).logits, whole(ids))
        # and runs on a shape it was not calibrated on (stages are captured with dynamic sizes)
        other = torch.randint(0, 256, (1, 9))
        ref = model(input_ids=other, use_cache=False).logits
        assert quantized(input_ids=other).logits.shape == ref.shape
    # the user's meta model is untouched and the unquantized tensors are stored once
    assert all(p.is_meta for p in meta.parameters())
    # w4a16 quantizes no op of the final norm: it runs in float between the last block and lm_head
    assert set(sequential.float_tensors()) == {"model.embed_tokens.weight", "model.norm.weight"}
    assert sequential.stages == ["model.layers.0", "model.layers.1", "lm_head"]


def test_sequential_gptq_with_float_targets_carries_the_float_model_and_equals_whole_model(llama, tmp_path):
    """float_targets fits each linear to the float model's output: the driver carries the float
    model's activations beside the quantized ones, so every stage sees what the whole model's
    float run gives it, and the codes are the whole model's again (and differ from plain GPTQ's)."""
    model, folder, meta, batches = llama
    algorithms = [{**ALGORITHMS[0], "float_targets": True}]   # the default
    ckpt = qc.quantize_sequential(meta, batches, tmp_path / "out", SMALL_GROUPS, checkpoint=folder,
                                  algorithms=algorithms, progress=False)
    whole = _whole_model(model, batches, algorithms)
    _assert_whole_models_codes(ckpt, whole)
    # the first linears see float inputs either way; after a quantized block the targets differ
    plain = _whole_model(model, batches, ALGORITHMS)
    assert torch.equal(plain.qc_w_m_model_layers_0_self_attn_q_proj_weight,
                       whole.qc_w_m_model_layers_0_self_attn_q_proj_weight)
    assert not torch.equal(plain.qc_w_m_model_layers_1_mlp_down_proj_weight,
                           whole.qc_w_m_model_layers_1_mlp_down_proj_weight)

def test_onnx_output_chains_the_parts_and_onnxruntime_computes_the_reference_logits(sequential):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    folder = sequential.path / "onnx"
    # one part per stage written as it finished, the float prologue and norm, and the chain
    assert sequential.manifest["onnx"]["parts"] == ["prologue.onnx", "model.layers.0.onnx", "model.layers.1.onnx",
                                                    "model.norm.onnx", "lm_head.onnx"]
    chain = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    external = [t for t in chain.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in chain.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    # the graph only: every tensor above 1 KiB (each weight and embedding) lies in a part's data file
    assert {dict((e.key, e.value) for e in t.external_data)["location"] for t in external} == \
        {f + ".data" for f in sequential.manifest["onnx"]["parts"] if f != "model.norm.onnx"}
    assert max(len(t.raw_data) for t in inline) <= 1024
    assert not list(folder.glob(".partial-*"))
    # the chain's external data are the GPTQ codes of every stage, read from the parts' files
    chain = onnx.load(str(folder / "model.onnx"))
    initializers = {t.name.split("/", 1)[1]: t for t in chain.graph.initializer}
    weights = list(sequential.quantized_weights())
    assert len(weights) == 15
    for name, codes, scale, *_ in weights:
        key = "qc_w_" + name.replace(".", "_")
        # w4a16 keeps the output projection at 8 bits per channel (the recipe's shipped override)
        bits = onnx.TensorProto.INT8 if name == "lm_head.weight" else onnx.TensorProto.INT4
        assert initializers[key].data_type == bits, name
        assert np.array_equal(numpy_helper.to_array(initializers[key]), codes.numpy()), name
        assert np.array_equal(numpy_helper.to_array(initializers[key + "_scale"]), scale.numpy()), name
    # token ids in, logits out, at shapes the run never saw: float32 summation order apart, the
    # reference graph's logits (one INT4 step of one weight moved a logit by ~1e-2 here; the 8-bit
    # lm_head's step is 16x finer, still far above the bound)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # the 8-bit lm_head's DequantizeLinear -> MatMul becomes MatMulNBits, which by default quantizes
    # its float input again (3e-3 off here); level 1 keeps it float, as README "onnxruntime" says
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    reference = sequential.module()
    for shape in ((1, 9), (3, 30)):
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(shape[1]))
        got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])
        with torch.no_grad():
            want = reference(input_ids=ids).logits
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), shape


@pytest.fixture(scope="module")
def w8a8_whole(llama):
    """The whole model's w8a8 + SmoothQuant reference graph."""
    model, folder, meta, batches = llama
    prepared = qc.prepare(LM(model), (batches[0],), "w8a8", algorithms=["smoothquant"])
    qc.calibrate(prepared, batches, progress=False)
    return qc.convert(prepared)


def _equal_weights(ckpt, whole) -> list[str]:
    """The quantized weights that have the whole model's codes and scales."""
    return [name for name, (codes, scale, _) in _codes(ckpt).items()
            if torch.equal(codes, getattr(whole, "qc_w_m_" + name.replace(".", "_"))) and
            torch.equal(scale, getattr(whole, "qc_w_m_" + name.replace(".", "_") + "_scale"))]


def test_w8a8_smoothquant_without_error_propagation_equals_the_whole_model_even_resumed(
        llama, w8a8_whole, tmp_path, monkeypatch):
    """propagate_error=False calibrates each stage on the calibrated-unconverted outputs of the
    previous ones (what the whole model's observers see) and gives SmoothQuant the float model's
    activations (what the whole model's SmoothQuant reads before any rewrite): every weight's codes
    and scales, and the logits bit for bit, are the whole model's. Those outputs cannot be
    recomputed from a converted stage, so the run keeps the last finished stage's on disk: a run
    killed at its second stage resumes from them."""
    model, folder, meta, batches = llama
    from qcompile.sequential import store

    real_save, calls = store.OutputDir.save_stage, []

    def killed_at_the_second_stage(self, name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(self, name, *args)

    monkeypatch.setattr(store.OutputDir, "save_stage", killed_at_the_second_stage)
    out = tmp_path / "out"
    run = lambda: qc.quantize_sequential(meta, batches, out, "w8a8", checkpoint=folder,  # noqa: E731
                                         algorithms=["smoothquant"], propagate_error=False, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert _finished(out) == ["model.layers.0"]
    # layer 1's outputs were saved before its stage; layer 0's stay until layer 1 is listed
    assert sorted(f.name for f in (out / "carry").iterdir()) == ["model.layers.0.rank0.pt", "model.layers.1.rank0.pt"]
    monkeypatch.setattr(store.OutputDir, "save_stage", real_save)
    mirrored = run()
    assert len(_codes(mirrored)) == 15 and len(_equal_weights(mirrored, w8a8_whole)) == 15
    quantized = mirrored.module()
    with torch.no_grad():
        for ids in batches:
            assert torch.equal(quantized(input_ids=ids).logits, w8a8_whole(ids))
    assert not (out / "carry").exists()   # a finished run keeps no calibration activations
    (out / "carry").mkdir()   # a folder whose carried outputs were lost is refused with what to do
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["complete"] = False
    del manifest["stages"]["lm_head"], manifest["stages"]["model.layers.1"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(qc.CheckpointError, match="lacks the calibrated outputs of the stage before 'model.layers.1'"):
        run()


def test_by_default_later_blocks_calibrate_on_the_quantized_blocks_before_them(llama, w8a8_whole, tmp_path):
    """propagate_error=True (errors propagate as in deployment): block 0 sees the float model's
    inputs either way and gets the whole model's codes; block 1 on is calibrated on quantized
    activations, and its SmoothQuant scales and weight codes differ."""
    model, folder, meta, batches = llama
    propagated = qc.quantize_sequential(meta, batches, tmp_path / "deployed", "w8a8", checkpoint=folder,
                                        algorithms=["smoothquant"], progress=False)
    equal = _equal_weights(propagated, w8a8_whole)
    assert all(n.startswith("model.layers.0.") for n in equal) and len(equal) == 7
    # llama.cpp's graph has no place for SmoothQuant's multiplies: the GGUF export refuses the folder
    pytest.importorskip("gguf")
    with pytest.raises(qc.GGUFExportError, match="smoothquant, which inserts ops"):
        qc.export_gguf(propagated, tmp_path / "x.gguf", tokenizer=None)
    assert not list(tmp_path.glob("x.gguf*"))


def _finished(out):
    try:
        return list(json.loads((out / MANIFEST).read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return []


_RUN = textwrap.dedent("""
    import sys, torch
    import qcompile as qc
    from tests.test_sequential import _meta_llama, SMALL_GROUPS, ALGORITHMS
    from transformers import AutoConfig
    folder, out = sys.argv[1], sys.argv[2]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 24), generator=gen) for _ in range(3)]
    qc.quantize_sequential(_meta_llama(AutoConfig.from_pretrained(folder)), batches, out, SMALL_GROUPS,
                           checkpoint=folder, algorithms=ALGORITHMS, progress=False)
""")


def test_resume_after_a_killed_run_gives_the_same_output(llama, sequential, tmp_path):
    model, folder, meta, batches = llama
    out = tmp_path / "out"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the child's float reductions on as many threads as this process's (under xdist, 1): the same codes
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(folder), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not _finished(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _finished(out)
    assert done == ["model.layers.0"], (done, proc.stderr.read()[-2000:])
    # nothing half-written under a final name: every file is listed and loads, or is a partial file
    finals = [p for p in out.rglob("*") if p.is_file() and ".partial-" not in p.name]
    assert sorted(p.name for p in finals) == [MANIFEST, "model.layers.0.pt2"]
    first = out / "stages" / "model.layers.0.pt2"
    before = first.stat().st_mtime_ns
    resumed = qc.quantize_sequential(meta, batches, out, SMALL_GROUPS, checkpoint=folder, algorithms=ALGORITHMS,
                                     progress=False)
    assert first.stat().st_mtime_ns == before  # the finished stage was reused, not recomputed
    a, b = _codes(resumed), _codes(sequential)
    assert a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)
    assert not list(out.rglob("*.partial-*"))


def test_a_full_disk_leaves_finished_stages_and_the_rerun_completes(llama, sequential, tmp_path, monkeypatch):
    model, folder, meta, batches = llama
    out = tmp_path / "out"
    real_save, calls = torch.export.save, []

    def save(ep, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            open(f, "wb").write(b"\0" * 100)  # part of the file was written when the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(ep, f, *args, **kwargs)

    monkeypatch.setattr(torch.export, "save", save)
    with pytest.raises(qc.CheckpointError, match="model.layers.1.pt2 failed: the disk is full"):
        qc.quantize_sequential(meta, batches, out, SMALL_GROUPS, checkpoint=folder, algorithms=ALGORITHMS,
                               progress=False)
    assert _finished(out) == ["model.layers.0"]
    assert not list(out.rglob("*.partial-*")) and not (out / "stages" / "model.layers.1.pt2").exists()
    monkeypatch.setattr(torch.export, "save", real_save)
    resumed = qc.quantize_sequential(meta, batches, out, SMALL_GROUPS, checkpoint=folder, algorithms=ALGORITHMS,
                                     progress=False)
    a, b = _codes(resumed), _codes(sequential)
    assert all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a) and len(a) == 15


def test_an_output_dir_of_another_run_is_refused_and_left_as_it_was(llama, sequential):
    model, folder, meta, batches = llama
    manifest = (sequential.path / MANIFEST).read_bytes()
    with pytest.raises(qc.CheckpointError, match="another recipe"):
        qc.quantize_sequential(meta, batches, sequential.path, "w8a16", checkpoint=folder, onnx=True, progress=False)
    with pytest.raises(qc.CheckpointError, match="another data"):
        qc.quantize_sequential(meta, batches[:2], sequential.path, SMALL_GROUPS, checkpoint=folder,
                               algorithms=ALGORITHMS, onnx=True, progress=False)
    assert (sequential.path / MANIFEST).read_bytes() == manifest


def test_bad_checkpoints_raise_errors_naming_the_tensor_or_file(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    model, folder, meta, batches = llama
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]

    def copy(name):
        dst = tmp_path / name
        dst.mkdir()
        for f in folder.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    def run(ckpt, out):
        return qc.quantize_sequential(meta, batches, tmp_path / out, SMALL_GROUPS, checkpoint=ckpt, progress=False)

    # a tensor of the wrong shape
    wrong = copy("wrong")
    shard = wrong / index["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, shard)
    with pytest.raises(qc.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: \(100, 64\) in the "
                                                 r"checkpoint, \(128, 64\) in the model"):
        run(wrong, "o1")
    # a missing shard
    missing = copy("missing")
    lost = index["model.layers.0.self_attn.q_proj.weight"]
    (missing / lost).unlink()
    with pytest.raises(qc.CheckpointError, match=f"missing shard file.*{lost}"):
        run(missing, "o2")
    # a truncated shard
    cut = copy("cut")
    data = (cut / lost).read_bytes()
    (cut / lost).write_bytes(data[: len(data) // 2])
    with pytest.raises(qc.CheckpointError, match=f"{lost} is not a readable safetensors file"):
        run(cut, "o3")
    # a tensor the checkpoint lacks (another architecture's file)
    other = tmp_path / "other.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(256, 64)}, other)
    with pytest.raises(qc.CheckpointError, match="are not in it"):
        run(other, "o4")
    # nothing was written for any of them
    assert not any((tmp_path / o / "stages").exists() for o in ("o1", "o2", "o3", "o4"))


def test_stages_refuse_a_kv_cache_they_were_not_captured_with(sequential, llama):
    from transformers import DynamicCache

    model, *_ = llama
    quantized = sequential.module()
    ids = torch.randint(0, 256, (1, 5))
    with pytest.raises(qc.InvalidInputsError, match="captured with cache=None"):
        quantized(input_ids=ids, use_cache=True, past_key_values=DynamicCache(config=model.config))


@pytest.mark.slow
def test_smollm2_from_its_own_gguf_file_matches_in_memory_gptq(tmp_path):
    """SmolLM2-135M (its first two decoder layers and the tied lm_head), weights read from the Q4_1
    GGUF file through gguf's reader, against in-memory GPTQ on transformers' conversion of the same file."""
    from transformers import AutoConfig

    from qcompile.testing.llm import _cache_dir, load_smollm2, smollm2_gguf_path, token_chunks

    model, tokenizer = load_smollm2()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    config = AutoConfig.from_pretrained(_cache_dir())
    config.num_hidden_layers = 2
    batches = list(token_chunks(tokenizer, "calibration", 64, 4).split(2))
    recipe = qc.recipes["w4a16"].replace(weight=qc.QuantSpec("int4", qc.PerGroup(32), symmetric=True))
    algorithms = ALGORITHMS   # plain GPTQ: float_targets' equal codes are tested on the tiny LLaMA above
    ckpt = qc.quantize_sequential(_meta_llama(config), batches, tmp_path / "out", recipe,
                                  checkpoint=smollm2_gguf_path(), algorithms=algorithms, progress=False)
    prepared = qc.prepare(LM(model), (batches[0],), recipe, algorithms=algorithms)
    qc.calibrate(prepared, batches, progress=False)
    whole = qc.convert(prepared)
    ours = _codes(ckpt)
    assert len(ours) == 2 * 7 + 1
    for name, (codes, scale, _) in ours.items():
        key = "qc_w_m_" + name.replace(".", "_")
        assert torch.equal(codes, getattr(whole, key)), name
        assert torch.equal(scale, getattr(whole, key + "_scale")), name
    with torch.no_grad():
        assert torch.equal(ckpt.module()(input_ids=batches[0]).logits, whole(batches[0]))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, h):
        return h + torch.relu(self.lin(h))


class _HeadFromEmbedding(torch.nn.Module):
    """Embedding -> blocks -> norm, then logits from the embedding table read in the top-level forward
    (a tied head that is no module of its own)."""

    def __init__(self, untied_head: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList(_Block() for _ in range(2))
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 16, bias=False) if untied_head else None

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        if self.head is not None:
            return self.head(h)
        return h @ self.embed.weight.T / float(self.embed.weight.norm())   # a meta table cannot give a float


@pytest.mark.parametrize("untied_head", [True, False])
def test_find_head_frees_the_prologue_and_falls_back_when_the_forward_reads_it(untied_head):
    """find_head runs the model with the blocks stood in for and each module before them put back on
    the meta device once it ran (the embedding and the lm_head are never both loaded). A forward
    that reads the embedding's table itself after the blocks cannot run that way: find_head runs
    again with everything loaded and gives the clear error about the head, not a meta-tensor one."""
    from qcompile.sequential.checkpoint import open_checkpoint
    from qcompile.sequential.stages import WeightSource, find_blocks, find_head, meta_copy, tensor_aliases

    torch.manual_seed(0)
    model = _HeadFromEmbedding(untied_head).eval()
    weights = WeightSource(open_checkpoint(None, model), tensor_aliases(model))
    blocks = find_blocks(model)
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        hidden = model.layers[1](model.layers[0](model.embed(ids)))
    work = meta_copy(model)
    if untied_head:
        assert find_head(work, blocks, 0, hidden, ids, weights) == ["norm", "head"]
        assert work.embed.weight.is_meta   # unloaded once the prologue ran
    else:
        with pytest.raises(qc.InvalidModelError, match="do not give the model's output"):
            find_head(work, blocks, 0, hidden, ids, weights)


def test_a_tensor_loaded_from_safetensors_can_be_rescaled_in_place_without_touching_the_file(tmp_path):
    """SmoothQuant and GPTQ write over the weights of the stage they are given (no second copy of
    an lm_head): a checkpoint's tensors are read into memory of their own, so the user's file keeps
    its bytes."""
    from safetensors.torch import save_file

    from qcompile.sequential.checkpoint import SafetensorsCheckpoint

    path = tmp_path / "w.safetensors"
    original = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    save_file({"w": original}, str(path))
    data = path.read_bytes()
    loaded = SafetensorsCheckpoint(path).load(["w"])["w"]
    loaded.mul_(3.0)
    assert torch.equal(loaded, original * 3)
    assert path.read_bytes() == data
    assert torch.equal(SafetensorsCheckpoint(path).load(["w"])["w"], original)


def test_safetensors_tensors_are_read_into_memory_of_their_own_in_every_dtype(tmp_path):
    """Plain file reads, not views of a mapping (whose pages would count in the process's memory,
    by the page cache's folios): each tensor equal to safetensors' own, in its own storage, for
    every dtype of the format (a scalar and an empty tensor too); a file cut short after it was
    opened raises CheckpointError naming the tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qcompile.sequential.checkpoint import SafetensorsCheckpoint

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen), "f64": torch.randn(4, generator=gen, dtype=torch.float64),
        "bf16": torch.randn(4, 4, generator=gen).bfloat16(), "f16": torch.randn(2, 3, generator=gen).half(),
        "i8": torch.randint(-128, 127, (7,), generator=gen, dtype=torch.int8),
        "i64": torch.randint(0, 1 << 40, (3,), generator=gen), "u8": torch.randint(0, 255, (5,), generator=gen).byte(),
        "bool": torch.rand(6, generator=gen) > 0.5, "fp8": torch.randn(8, generator=gen).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    checkpoint = SafetensorsCheckpoint(path)
    loaded = checkpoint.load(list(tensors))
    with safe_open(str(path), framework="pt") as h:
        for name, t in loaded.items():
            reference = h.get_tensor(name)
            assert t.dtype == reference.dtype and t.shape == reference.shape, name
            assert torch.equal(t.reshape(-1).view(torch.uint8), reference.reshape(-1).view(torch.uint8)), name
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(qc.CheckpointError, match=r"ends after .* bytes: the file is truncated"):
        checkpoint.load(list(tensors))


def test_a_run_shows_each_calibration_warning_once_though_stages_reset_the_filters():
    """Each stage's GPTQ warns with the same text; torch.export resets the warning filters between
    stages, which would show it once per block. WarnOnce drops the repeats, not other warnings."""
    import warnings

    from qcompile.errors import CalibrationWarning
    from qcompile.sequential.driver import WarnOnce

    once = WarnOnce(CalibrationWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for stage in range(3):
            with once:
                warnings.warn("too few rows", CalibrationWarning)
                warnings.warn(f"other {stage}", UserWarning)
                warnings.resetwarnings()   # what an exporter's catch_warnings leaves behind
                warnings.simplefilter("default")
        with once:
            warnings.warn("fewer rows in the head", CalibrationWarning)
    texts = [str(w.message) for w in caught]
    assert texts == ["too few rows", "other 0", "other 1", "other 2", "fewer rows in the head"]
