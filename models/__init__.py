"""Model classes of Composer's own checkpoint formats, for plain transformers.

`import models` registers them with AutoConfig / AutoModelForCausalLM, after which
`AutoModelForCausalLM.from_pretrained(build_dir)` loads a `lora: shared` build like any other
checkpoint. This package imports nothing of the project's: composer/ and serve/ import it, and a
user can copy it next to a checkpoint without the rest of Composer.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from models.lora_moe import ComposerLoraMoeConfig, ComposerLoraMoeForCausalLM, LoraMoeBlock

__all__ = ["ComposerLoraMoeConfig", "ComposerLoraMoeForCausalLM", "LoraMoeBlock"]


def _register() -> None:
    try:
        AutoConfig.register(ComposerLoraMoeConfig.model_type, ComposerLoraMoeConfig)
        AutoModelForCausalLM.register(ComposerLoraMoeConfig, ComposerLoraMoeForCausalLM)
    except ValueError:  # registered already (a second import path of the same classes)
        pass


_register()
