"""Training forward: packing of prompt + response and response log-probs vs full log_softmax."""
import pytest
import torch

from rrm_engine.model.loader import load_hf
from rrm_engine.train.logprobs import pack, response_logprobs


def test_pack_layout_by_hand():
    b = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], "cpu", pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    # hidden row i predicts token i + 1: response [3, 5) of row 0 is scored from rows 2, 3
    assert b.score_rows.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    assert b.labels.tolist() == [1, 2, 3, 4, 9]
    assert b.response_mask.tolist() == [[True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[]], [[1]], "cpu")


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_response_logprobs_match_full_log_softmax(tiny_qwen2_dir, temperature):
    model = load_hf(tiny_qwen2_dir).model
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (7, 3)]
    responses = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (2, 5)]
    b = pack(prompts, responses, "cpu")
    got = response_logprobs(model, b, temperature)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logits = model.compute_logits(model(ids, torch.arange(ids.shape[1])[None]))[0] / temperature
            want = torch.log_softmax(logits, -1)[len(p) - 1:len(p) + len(r) - 1].gather(1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(got[i, :len(r)], want, rtol=0, atol=1e-5)
            assert (got[i, len(r):] == 0).all()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_qwen2_dir):
    model = load_hf(tiny_qwen2_dir).model.train()
    b = pack([[1, 2, 3, 4], [5, 6]], [[7, 8], [9, 10, 11]], "cpu")
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        (response_logprobs(model, b) * b.response_mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
