"""A head read from another tool's layout and exported by us serves in a real vLLM 0.32 engine as
the module training holds: the MEDUSA authors' heads (FasterDecoding ``medusa_lm_head.pt``, two
biased residual layers per head). vLLM maps those tensor names itself, but from their own
directory it cannot serve them (its MedusaConfig neither sizes the heads from the tensors nor
turns the bias on); read by ``training.formats.medusa`` and exported in vLLM's layout with
``medusa_fc_bias``, it does.

The engine runs in a child process (``python -m`` this module, engine core in-process) that
records, for every MEDUSA proposal, the hidden state each head read and the logits vLLM
computed; the test recomputes both heads' logits with the loaded module on the same hidden
states. fp32 on both sides, different kernels and summation orders: checked at 1e-4.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_torch_thread")]

K = 3
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def imported(tiny_target, tmp_path_factory):
    """(drafter read from the authors' layout, our export of it)."""
    from tests.heads import write_medusa_original
    from training.formats import detect, load_checkpoint, write
    from training.target import load_target

    root = tmp_path_factory.mktemp("medusa-import")
    source = write_medusa_original(tiny_target, root / "authors", num_heads=K, num_layers=2)
    model, _ = load_target(tiny_target)
    drafter = load_checkpoint(source, model).eval()
    write(drafter, root / "export", "original", tiny_target)
    assert detect(root / "export").layout == "medusa-vllm" and drafter.fc_bias
    return drafter, root / "export"


def test_served_medusa_logits_equal_the_imported_module(imported, tiny_target, tmp_path, clean_env):
    drafter, export = imported
    result = tmp_path / "served.pt"
    env = dict(clean_env, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-m", "tests.integration.test_init_from_vllm", str(tiny_target), str(export), str(result)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proposals = torch.load(result)
    assert len(proposals) >= 10
    worst = 0.0
    with torch.no_grad():
        for hidden, served in proposals:  # hidden [B, H]; served k x [B, V]
            assert len(served) == K
            for block, lm_head, logits in zip(drafter.blocks, drafter.lm_heads, served):
                worst = max(worst, float((lm_head(block(hidden)) - logits).abs().max()))
    assert worst < 1e-4, worst


def serve(target: str, head: str, result: str) -> None:
    """Child process: serve ``head`` with ``method="medusa"``; record (block input, per-head logits)
    of every proposal; torch.save the list to ``result``."""
    from vllm import LLM, SamplingParams
    from vllm.model_executor.models import medusa

    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", "the draft model must run in this process"
    inputs: list[torch.Tensor] = []
    proposals: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    block_forward, compute_logits = medusa.ResidualBlock.forward, medusa.Medusa.compute_logits

    def recording_block(self, x):
        inputs.append(x.detach().float().cpu().clone())
        return block_forward(self, x)

    def recording_logits(self, hidden_states):
        logits = compute_logits(self, hidden_states)
        proposals.append((inputs[-1], [t.detach().float().cpu().clone() for t in logits]))
        inputs.clear()
        return logits

    medusa.ResidualBlock.forward, medusa.Medusa.compute_logits = recording_block, recording_logits
    llm = LLM(model=target, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, max_model_len=512, seed=0,
              speculative_config={"method": "medusa", "model": head, "num_speculative_tokens": K})
    try:
        params = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True, seed=1)
        llm.generate(["def ", "import os\n", "class "], params, use_tqdm=False)
        torch.save(proposals, result)
    finally:
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    serve(*sys.argv[1:4])
