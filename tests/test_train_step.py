"""GRPO on the real engine and decoder (tiny random Qwen2): the engine samples with the trainer's
own parameter tensors, sees each update at once, and a few dozen steps learn a verdict."""
import copy
import json

import pytest
import torch

from rrm_engine.model.loader import load_hf
from rrm_engine.train.data import PairStream, PreferencePair
from rrm_engine.train.engine_sampler import EngineSampler
from rrm_engine.train.logprobs import pack, response_logprobs
from rrm_engine.train.trainer import GRPOTrainer, TrainConfig

PAIRS = [PreferencePair("2+2?", "4", "5"), PreferencePair("Capital of France?", "Paris", "Rome"),
         PreferencePair("Opposite of hot?", "cold", "warm"), PreferencePair("Color of the sky?", "blue", "green")]
# a short template keeps the tiny model's sequences short; the trainer's default is the RRM format
SHORT = dict(system=None, user_template="{question}\n1: {answer1}\n2: {answer2}\n")
FORCED = "\\boxed{Assistant "  # forced verdict format: the first sampled token is the verdict


YES_NO = [PreferencePair(q, "yes", "no") for q in ("2+2=4?", "Is Paris in France?", "Is ice cold?", "Is the sky blue?")]


def forced_verdict(text, finish_reason, opens_think):
    return {"1": 1, "2": 2}.get(text.strip())




@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(vars(p)) + "\n" for p in PAIRS))
    return path


def _trainer(tiny_qwen2_dir, pairs_file, ref=False, verdict_fn=None, **kw):
    loaded = load_hf(tiny_qwen2_dir)
    cfg = TrainConfig(**{**dict(pairs_per_step=2, group_size=4, lr=1e-2, max_tokens=4, seed=0), **SHORT, **kw})
    sampler = EngineSampler.around(loaded, cfg.temperature, cfg.top_p, cfg.max_tokens)
    extra = {"verdict_fn": verdict_fn} if verdict_fn else {}
    ref_model = copy.deepcopy(loaded.model) if ref else None
    return GRPOTrainer(loaded.model, loaded.tokenizer, PairStream(pairs_file, seed=0), sampler, cfg, ref_model, **extra), loaded


def _engine_vs_trainer(tr, prompts, seed):
    """Sample the prompts with the engine; return (engine log-probs, trainer log-probs) [B, R]."""
    comps = tr.sampler.sample(prompts, seed)
    batch = pack(prompts, [c.token_ids for c in comps], "cpu")
    with torch.no_grad():
        mine = response_logprobs(tr.model, batch, tr.cfg.temperature)
    engine = torch.zeros_like(mine)
    for j, c in enumerate(comps):
        engine[j, :len(c.logprobs)] = torch.tensor(c.logprobs)
    return engine, mine, batch.response_mask, comps


def test_engine_samples_with_the_updated_weights(tiny_qwen2_dir, pairs_file):
    tr, loaded = _trainer(tiny_qwen2_dir, pairs_file)
    # the random model never writes a valid verdict; any verdict rule with mixed outcomes gives
    # non-zero advantages, which is all this test needs
    tr.collector.verdict_fn = lambda text, *_: 1 + len(text) % 2
    assert tr.sampler.llm.engine.model is tr.model  # one Decoder, no copy
    prompts = [tr.collector.prompt_ids(p, s)[0] for p in PAIRS[:2] for s in (False, True)]
    before, mine, mask, comps0 = _engine_vs_trainer(tr, prompts, seed=7)
    torch.testing.assert_close(before[mask], mine[mask], rtol=0, atol=1e-4)

    old_model = copy.deepcopy(tr.model)
    metrics = tr.step()
    assert metrics["logprob_mismatch_max"] < 1e-4  # measured inside the step on its own rollouts
    assert metrics["grad_norm"] > 0

    # same prompts and seed after the update: the prompt prefixes were cached before the step, so
    # a stale prefix cache would show up here as a mismatch against the trainer
    after, mine, mask, comps1 = _engine_vs_trainer(tr, prompts, seed=7)
    torch.testing.assert_close(after[mask], mine[mask], rtol=0, atol=1e-4)
    # and they are not what the old weights give for the same tokens: the update is visible
    with torch.no_grad():
        old = response_logprobs(old_model, pack(prompts, [c.token_ids for c in comps1], "cpu"))
    assert (after[mask] - old[mask]).abs().max() > 1e-2


def test_kl_to_frozen_reference(tiny_qwen2_dir, pairs_file):
    parity = lambda text, *_: 1 + len(text) % 2  # mixed rewards, so the policy moves
    tr, loaded = _trainer(tiny_qwen2_dir, pairs_file, ref=True, verdict_fn=parity, kl_coef=0.1, pairs_per_step=2,
                          group_size=4, max_tokens=3)
    with pytest.raises(ValueError, match="reference"):
        GRPOTrainer(loaded.model, loaded.tokenizer, tr.data, tr.sampler, tr.cfg)
    ref = tr.ref_model
    first = tr.step()  # the policy still equals the reference: KL exactly 0
    assert first["kl"] == 0.0
    ms = [tr.step() for _ in range(2)]
    assert first["grad_norm"] > 0 and ms[-1]["kl"] > 0, ms
    assert all(not p.requires_grad for p in ref.parameters())


def test_sampling_temperature_and_several_updates_per_batch(tiny_qwen2_dir, pairs_file):
    parity = lambda text, *_: 1 + len(text) % 2
    tr, _ = _trainer(tiny_qwen2_dir, pairs_file, verdict_fn=parity, temperature=0.7, updates_per_batch=2,
                     pairs_per_step=2, group_size=4, max_tokens=3)
    m = tr.step()
    # at T != 1 the engine reports per-sequence sums under log_softmax(logits / T): they must
    # match the trainer's tempered log-probs too
    assert m["logprob_mismatch_max"] < 1e-4
    assert m["grad_norm"] > 0
    # the second update sees the ratio move off 1 (the first update changed the policy)
    assert m["ratio_max"] > 1.0 + 1e-4


def test_skipping_zero_advantage_rollouts_changes_nothing(tiny_qwen2_dir, pairs_file):
    parity = lambda text, *_: 1 + len(text) % 2
    kw = dict(verdict_fn=parity, pairs_per_step=3, group_size=2, max_tokens=2, weight_decay=0.1)
    full, _ = _trainer(tiny_qwen2_dir, pairs_file, skip_zero_advantage=False, **kw)
    skip, _ = _trainer(tiny_qwen2_dir, pairs_file, **kw)
    q_weight = "model.layers.0.self_attn.q_proj.weight"  # a row slice of the fused qkv_proj
    init = full.model.state_dict()[q_weight].clone()
    a = [full.step() for _ in range(3)]
    b = [skip.step() for _ in range(3)]
    assert any(m["trained_rollouts"] < 6 for m in b)  # some groups agreed and were skipped
    assert all(m["trained_rollouts"] == 6 for m in a)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    for (name, p), q in zip(full.model.state_dict().items(), skip.model.state_dict().values()):
        # equal up to float noise (micro-batches differ) that Adam's normalisation magnifies;
        # each step moves parameters by ~lr = 1e-2
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4, msg=name)
    moved = (full.model.state_dict()[q_weight] - init).abs().max()
    assert moved > 1e-3


def test_grpo_learns_the_verdict(tiny_qwen2_dir, tmp_path):
    """Seeded learning check. The tiny random model is given a verdict prior: the LM-head rows of
    "1" and "2" get the same large component along the mean final hidden state of the prompts, so
    nearly all its mass is on the two verdict tokens (like an instruct model that follows the
    format) while which of the two it prefers stays random (P(correct) ~ 0.5 over both orders).
    The order of presentation is random per rollout, so only reading the responses earns reward:
    here the better response is always "yes" and the worse "no", one rule to find. (Seeded and
    deterministic; with other random inits GRPO can also settle on a position bias, which earns
    nothing on average: that is why the data randomises the order.)"""
    pairs_file = tmp_path / "yes_no.jsonl"
    pairs_file.write_text("".join(json.dumps(vars(p)) + "\n" for p in YES_NO))
    tr, loaded = _trainer(tiny_qwen2_dir, pairs_file, pairs_per_step=4, group_size=4, lr=1e-3, max_tokens=1,
                          prompt_suffix=FORCED)
    tr.collector.verdict_fn = forced_verdict
    tok = loaded.tokenizer
    one, two = tok.encode("1", add_special_tokens=False)[0], tok.encode("2", add_special_tokens=False)[0]
    prompts, labels = [], []
    for p in YES_NO:
        for swapped in (False, True):
            prompts.append(tr.collector.prompt_ids(p, swapped)[0])
            labels.append([two if swapped else one])
    model = tr.model
    with torch.no_grad():
        m = torch.stack([model(torch.tensor([q]), torch.arange(len(q))[None])[0, -1] for q in prompts]).mean(0)
        model.lm_head_weight[one] += 30 * m / m.dot(m)
        model.lm_head_weight[two] += 30 * m / m.dot(m)

    def p_correct():
        with torch.no_grad():
            return response_logprobs(model, pack(prompts, labels, "cpu"))[:, 0].exp().mean().item()

    start = p_correct()
    assert 0.4 < start < 0.6
    rewards = [tr.step()["reward_mean"] for _ in range(15)]
    end = p_correct()
    print(f"P(correct verdict) {start:.3f} -> {end:.3f}; reward per step {rewards}")
    assert end > start + 0.3, (start, end, rewards)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, rewards
