"""The refill engine's output layer in vocabulary slices (issue 10): the same logits as one matmul."""

from __future__ import annotations

import pytest
import torch

from backends.local_step import HEAD_SLICE, project


@pytest.mark.parametrize("rows", [1, 7, 48])
def test_the_sliced_output_layer_gives_the_logits_of_one_matmul(rows):
    torch.manual_seed(rows)
    head = torch.randn(4 * HEAD_SLICE, 64)
    hidden = torch.randn(rows, 64)
    slices = head.view(4, HEAD_SLICE, 64)
    sliced = project(hidden, head, slices)
    whole = torch.nn.functional.linear(hidden, head)
    assert sliced.shape == (rows, 4 * HEAD_SLICE) and sliced.is_contiguous()
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(project(hidden, head, None), whole)


def test_the_bundled_model_s_head_is_sliced_on_cpu_and_a_vocabulary_it_does_not_divide_is_not(tmp_path):
    from backends.local_model import load_model
    from backends.local_pool import PEFT_BASE_ROW
    from backends.local_step import HFStep
    from tests.tiny_model import build_tiny_model

    tiny = load_model(str(build_tiny_model(tmp_path / "tiny")), "cpu", "float32").model
    assert tiny.get_output_embeddings().weight.shape[0] % HEAD_SLICE != 0
    assert HFStep(tiny, rows=None, master=None, base_row=PEFT_BASE_ROW)._slices is None
    bundled = load_model("smollm2", "cpu", "float32").model
    step = HFStep(bundled, rows=None, master=None, base_row=PEFT_BASE_ROW)
    assert step._slices is not None and step._slices.shape == (49152 // HEAD_SLICE, HEAD_SLICE, 576)
    assert step._slices.data_ptr() == step._head.data_ptr()  # a view: no second copy of the weights
