"""vllm_lk's MLP speculator model class: the stage formula and checkpoint loading (tied and not),
against a direct restatement."""

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_lk.heads.mlp_speculator import LKMLPSpeculator


@pytest.fixture(autouse=True)
def fp32_heads(monkeypatch):
    """The heads' fp32 path, which these tests compare with the formula and with training; the
    bf16 heads used by default on AVX512-BF16 CPUs are tested in test_mlp_speculator.py."""
    monkeypatch.setenv("VLLM_LK_CPU_BF16_HEADS", "0")


def make(n_predict=3, num_spec=3, tie=False, scale_input=True, emb_dim=8, inner_dim=8, vocab=11):
    hf = SimpleNamespace(n_predict=n_predict, emb_dim=emb_dim, inner_dim=inner_dim, vocab_size=vocab,
                         tie_weights=tie, scale_input=scale_input)
    spec = SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf), num_speculative_tokens=num_spec)
    return LKMLPSpeculator(vllm_config=SimpleNamespace(speculative_config=spec))


def random_checkpoint(model, gen):
    return {f"speculator.{name}": torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


def test_stage_formula():
    model = make()
    gen = torch.Generator().manual_seed(0)
    model.load_weights(random_checkpoint(model, gen).items())
    hidden = torch.randn(4, 8, generator=gen)
    tokens = torch.tensor([0, 3, 7, 10])
    state = model.initial_state(hidden)
    rms = lambda x: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(state, rms(hidden) / math.sqrt(2))
    for stage in range(3):
        new_state, logits = model.step(stage, state, tokens)
        sw = 0.5 ** (0.5 / 3)
        ew = math.sqrt((1 - sw**2) * 8 / 2)
        pre = state @ model.proj[stage].weight.T * sw + model.emb[stage].weight[tokens] * ew
        expected = torch.nn.functional.gelu(rms(pre) * model.ln[stage].weight + model.ln[stage].bias)
        torch.testing.assert_close(new_state, expected)
        torch.testing.assert_close(logits, expected @ model.head[stage].weight.T)
        state, tokens = new_state, logits.argmax(-1)


def test_tied_checkpoint_shares_stages_and_accepts_per_stage_names():
    model = make(tie=True)
    assert model.emb[0] is model.emb[2] and model.head[0] is model.head[1] and model.proj[1] is model.proj[2]
    assert model.proj[0] is not model.proj[1]
    gen = torch.Generator().manual_seed(1)
    head = torch.randn(11, 8, generator=gen)
    weights = {"speculator.head.2.weight": head, "speculator.proj.2.weight": torch.ones(8, 8)}
    loaded = model.load_weights(weights.items())
    assert loaded == {"head.0.weight", "proj.1.weight"}
    torch.testing.assert_close(model.head[1].weight, head)


def test_bad_checkpoints_are_refused():
    model = make()
    with pytest.raises(ValueError, match="unexpected"):
        model.load_weights([("speculator.extra.0.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="checkpoint"):
        model.load_weights([("speculator.head.0.weight", torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="n_predict"):
        make(n_predict=2, num_spec=3)


def test_stages_beyond_n_predict_in_a_checkpoint_are_ignored():
    model = make(n_predict=2, num_spec=2)
    assert model.load_weights([("speculator.head.5.weight", torch.zeros(11, 8))]) == set()


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="bf16 heads need a CPU with AVX512-BF16")
def test_bf16_heads_on_cpu_are_the_fp32_heads_rounded(monkeypatch):
    """VLLM_LK_CPU_BF16_HEADS=1: logits in bf16 from a bf16 copy of each head; the rest of the
    stage (and the loaded fp32 parameters) unchanged. Tolerance: bf16 keeps 8 mantissa bits, so a
    logit of a 64-wide dot product moves by ~2^-8 of the largest terms."""
    gen = torch.Generator().manual_seed(3)
    hidden, tokens = torch.randn(4, 64, generator=gen), torch.tensor([0, 3, 7, 10])
    logits = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("VLLM_LK_CPU_BF16_HEADS", flag)
        model = make(emb_dim=64, inner_dim=64, vocab=96)
        model.load_weights(random_checkpoint(model, torch.Generator().manual_seed(4)).items())
        assert model.head[0].weight.dtype == torch.float32
        with torch.no_grad():
            logits[flag] = model.step(0, model.initial_state(hidden), tokens)[1]
    assert logits["0"].dtype == torch.float32 and logits["1"].dtype == torch.bfloat16
    torch.testing.assert_close(logits["1"].float(), logits["0"], rtol=0.02, atol=0.05 * float(logits["0"].abs().max()))
    assert not torch.equal(logits["1"].float(), logits["0"])


@pytest.mark.parametrize("bf16_heads", ["0", "1"])
def test_in_place_reload_serves_the_new_weights(monkeypatch, tmp_path, bf16_heads):
    """A live drafter swap (vllm_lk.reload: vLLM's layer-wise reload) must serve the new weights:
    vLLM puts the parameters on the meta device and buffers what their weight loaders receive, so
    load_weights must go through those loaders (a plain copy_ was lost and the old weights put
    back, with "Failed to load weights" in the log), and the CPU GEMM copies must be made again
    from the final tensors. The reloaded model's logits equal a fresh load of the new weights."""
    from safetensors.torch import save_file
    from vllm.model_executor.model_loader.reload.layerwise import record_metadata_for_reloading

    from vllm_lk.reload import _reload

    monkeypatch.setenv("VLLM_LK_CPU_BF16_HEADS", bf16_heads)
    model, fresh = make(emb_dim=64, inner_dim=64, vocab=96), make(emb_dim=64, inner_dim=64, vocab=96)
    gen = torch.Generator().manual_seed(5)
    old, new = random_checkpoint(model, gen), random_checkpoint(model, gen)
    model.load_weights(old.items())
    fresh.load_weights(new.items())
    record_metadata_for_reloading(model)  # as vLLM's loader does at start-up
    save_file(new, str(tmp_path / "model.safetensors"))
    hidden, tokens = torch.randn(3, 64, generator=gen), torch.tensor([1, 5, 9])
    with torch.no_grad():
        _reload(model, SimpleNamespace(dtype=torch.float32), tmp_path)
        for stage in range(3):
            torch.testing.assert_close(model.head[stage].weight, new[f"speculator.head.{stage}.weight"], rtol=0, atol=0)
        state, fresh_state = model.initial_state(hidden), fresh.initial_state(hidden)
        for stage in range(3):
            (state, logits), (fresh_state, expected) = model.step(stage, state, tokens), fresh.step(stage, fresh_state, tokens)
            assert torch.equal(logits, expected), stage
