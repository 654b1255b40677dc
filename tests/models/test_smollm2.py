"""The real model the demo uses: SmolLM2-135M-Instruct exported from the offline GGUF to a plain
safetensors checkpoint that transformers loads and that answers correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from composer.smollm2 import export_smollm2

pytestmark = pytest.mark.slow


def test_export_is_a_plain_checkpoint_that_knows_paris(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_smollm2(tmp_path / "smollm2")
    assert {p.name for p in out.glob("*.safetensors")} == {"model.safetensors"}
    assert not list(tmp_path.glob(".smollm2.*"))  # no temporary folder left behind
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    answer = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(answer[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text
    # A second call reuses the export instead of writing it again.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert export_smollm2(out) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime
