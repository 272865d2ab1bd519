"""The society soup: a society's LoRA adapters on disk averaged into one (issue 15's zero-training baseline)."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel

from foundation.errors import UserError


def soup_adapter(load_base: Callable[[], PreTrainedModel], adapters: Sequence[str], out: Path) -> Path:
    """The N generator adapters merged into one LoRA adapter whose delta is exactly the mean of theirs,
    (1/N)·Σ s_i·B_i·A_i: PEFT's "cat" combination stacks the ranks, scales each A_i by its weight (1/N) and its own
    scaling s_i, leaves B_i as is, and gives the result lora_alpha = r (scaling 1). Refused for rsLoRA or DoRA
    adapters, where that scaling would not be 1 or the delta is not B·A. Written to `out` once; read back after.
    `load_base` gives a fresh copy of the adapters' base model (PEFT wraps it: never the pool's own)."""
    if (out / "adapter_config.json").is_file():
        return out
    model = load_base()
    names = [f"agent-{i + 1}" for i in range(len(adapters))]
    with warnings.catch_warnings():  # PEFT 0.21's call of a deprecated transformers method: noise
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name)
    for name in names:
        config = peft_model.peft_config[name]
        if getattr(config, "use_rslora", False) or getattr(config, "use_dora", False):
            raise UserError("the society soup needs plain LoRA adapters (no rsLoRA, no DoRA)")
    peft_model.add_weighted_adapter(names, [1 / len(names)] * len(names), adapter_name="soup",
                                    combination_type="cat")
    peft_model.set_adapter("soup")
    for name in names:
        peft_model.delete_adapter(name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover
    peft_model.save_pretrained(str(tmp), selected_adapters=["soup"])
    written = tmp / "soup" if (tmp / "soup" / "adapter_config.json").is_file() else tmp
    out.parent.mkdir(parents=True, exist_ok=True)
    written.rename(out)
    return out
