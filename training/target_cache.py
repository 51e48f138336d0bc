"""Target outputs cached on disk, for multi-epoch runs (``--cache-target true``).

The frozen target's outputs are the same every epoch; a cache computes, once per training
example, only what the drafter reads: the hidden states it asks for and the lm_head's input
(from which the losses recompute the logits of trained rows), in the target's own dtype (bf16
for a bf16 target: the values the target computed, bit for bit; fp32 for an fp32 one). One
safetensors file per example (rows up to ``seq_len``), written to a temporary name and renamed,
so a killed run leaves only whole entries; a manifest pins what the entries depend on (data
hash, target identity and dtype, autocast, hidden layers, seq_len) and a mismatch starts a fresh
cache. The target runs as the online path runs it (same autocast), and batches read back land on
the training device.

Cost: H x (layers + 1) x (2 or 4) bytes per token, e.g. 32 KiB per token for three 4096-wide
aux states and the final state of a bf16 Llama-3.1-8B (a [V] fp32 logit row would be 501 KiB);
targets whose logits are not a plain lm_head cache their logits instead, (V + H x layers) x 4
bytes. The cache pays off when the target forward costs more than reading that back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.data import Example
from training.drafters.base import TargetOutputs
from training.target import logits_head, run_target

MANIFEST = "manifest.json"


class TargetCache:
    def __init__(self, root: Path, model, hidden_layers: tuple[int, ...], key: dict, autocast_dtype: torch.dtype | None = None) -> None:
        self.root, self.model, self.hidden_layers = Path(root), model, tuple(hidden_layers)
        self.autocast_dtype = autocast_dtype
        self.dtype = next(model.parameters()).dtype  # entries are stored in the target's dtype
        manifest = {**key, "hidden_layers": list(self.hidden_layers), "layout": "head_input",  # entries hold the lm_head input
                    "dtype": str(self.dtype), "autocast": str(autocast_dtype)}
        path = self.root / MANIFEST
        if path.is_file() and json.loads(path.read_text()) != manifest:
            shutil.rmtree(self.root)  # made for other data, target or layers
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2))

    def _path(self, index: int) -> Path:
        return self.root / f"{index:07d}.safetensors"

    def _fill(self, indices: list[int], examples: list[Example], seq_len: int, pad_id: int) -> None:
        from training.data import collate

        ids, mask = collate(examples, seq_len, pad_id)
        out = run_target(self.model, ids, mask, self.hidden_layers, self.autocast_dtype)
        final = self.model.config.num_hidden_layers
        for row, (index, example) in enumerate(zip(indices, examples)):
            length = min(len(example.token_ids), seq_len)
            if out.logits is not None:
                tensors = {"logits": out.logits[row, :length].contiguous()}
            elif final in self.hidden_layers:  # the lm_head's input is the final state already cached
                tensors = {}
            else:  # cache the lm_head's input: H per token instead of V
                tensors = {"head_input": out.head_input[row, :length].contiguous()}
            for layer in self.hidden_layers:  # run_target hands them over in fp32; the target computed them in its dtype
                tensors[f"hidden.{layer}"] = out.hidden_states[layer][row, :length].to(self.dtype).contiguous()
            tmp = self.root / f".{index:07d}.tmp-{os.getpid()}"
            save_file(tensors, str(tmp))
            os.replace(tmp, self._path(index))

    def outputs(self, indices: list[int], examples: list[Example], ids: torch.Tensor, mask: torch.Tensor, seq_len: int, pad_id: int) -> TargetOutputs:
        """TargetOutputs of the batch ``ids``/``mask`` (built by collate from ``examples``, whose
        dataset indices are ``indices``), computing the entries not cached yet."""
        missing = [(i, e) for i, e in zip(indices, examples) if not self._path(i).is_file()]
        if missing:
            self._fill([i for i, _ in missing], [e for _, e in missing], seq_len, pad_id)
        entries = [load_file(str(self._path(i))) for i in indices]
        batch, length = ids.shape

        def stack(key: str) -> torch.Tensor:  # [B, T, *] zero-padded (padding rows are never trained)
            first = entries[0][key]
            out = first.new_zeros(batch, length, *first.shape[1:])
            for row, entry in enumerate(entries):
                out[row, : entry[key].shape[0]] = entry[key]
            return out.to(ids.device)

        num_layers = self.model.config.num_hidden_layers
        # hidden states reach the drafter in fp32, as run_target gives them (exact from bf16)
        hidden = tuple(stack(f"hidden.{layer}").float() if layer in self.hidden_layers else None
                       for layer in range(num_layers + 1)) if self.hidden_layers else ()
        if "logits" in entries[0]:
            return TargetOutputs(input_ids=ids, loss_mask=mask, hidden_states=hidden, logits=stack("logits"))
        head = logits_head(self.model)
        head_input = stack("head_input") if "head_input" in entries[0] else hidden[num_layers].to(head.weight.dtype)
        return TargetOutputs(input_ids=ids, loss_mask=mask, hidden_states=hidden, head_input=head_input, lm_head=head)
