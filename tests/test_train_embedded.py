"""Issue 7's learning check on the real embedded model (SmolLM2-135M-Instruct, fp32, CPU): the real
engine samples the rollouts, the real GRPOTrainer updates the model, and 15 steps raise the
teacher-forced probability of the correct verdict from chance to well above it.

Setup (chosen to fit ~1 minute single-threaded on a shared 2-core box):
  * pairs: four factual yes/no questions whose right answer is "Yes" (chosen) and wrong one "No"
    (rejected): one unambiguous rule. The order of presentation is random per rollout (the
    collector draws it), so a position bias earns nothing on average; only reading the responses
    does. (Per-pair facts with unrelated answers, e.g. Paris vs Rome, collapsed to a position
    bias in 15 steps at this budget: measured 2026-11-22, see the report of this test's commit.)
  * a short user template, the verdict format forced by a prompt suffix and max_tokens=1: each
    rollout is one sampled token, "1" or "2" (or anything else: reward -1).
  * trainable = all decoder layers (last_n:num_layers). SmolLM2 ties its LM head to the input
    embedding, which stays frozen; training only the last 2 or 20 layers learned much less
    (the order of the two responses has to be told apart deep in the network).
  * no prior on the LM head: the instruct model already puts most of its mass on "1"/"2" after
    "\\boxed{Assistant " (measured and asserted below).

Measured on 2026-11-22 (CPU, 2 shared cores, 1 thread, load ~2-4), P(correct verdict) over both
orders of all four pairs: 0.459 at the start; after 15 steps 0.970 / 0.996 / 0.847 with trainer
seeds 0 / 1 / 2; about 60-70 s per run. With the learning rate at 0 the probability cannot move:
the assertion below (a gain of 0.25) fails then (checked by hand).
"""
import json
import time

import pytest
import torch

from rrm_engine.model.loader import load_hf
from rrm_engine.train.data import PairStream, PreferencePair
from rrm_engine.train.engine_sampler import EngineSampler
from rrm_engine.train.logprobs import pack, response_logprobs
from rrm_engine.train.trainer import GRPOTrainer, TrainConfig

PAIRS = [PreferencePair(q, "Yes", "No") for q in
         ("Is 2+2 equal to 4?", "Is Paris in France?", "Is ice cold?", "Is the sky blue?")]
SHORT = dict(system=None, user_template="{question}\n1: {answer1}\n2: {answer2}\n")
FORCED = "\\boxed{Assistant "  # the next token is the verdict
STEPS = 15
MIN_GAIN = 0.25  # seeds 0-2 gained 0.39-0.54 (see the module docstring)


def forced_verdict(text, finish_reason, opens_think):
    return {"1": 1, "2": 2}.get(text.strip())




@pytest.mark.slow  # 1-2 minutes of CPU (127 s on 2 shared cores, 2026-12-01): runs with --runslow, as CI does
def test_grpo_raises_p_correct_on_the_embedded_model(embedded_dir, tmp_path):
    wall0, cpu0 = time.perf_counter(), time.process_time()
    data = tmp_path / "yes_pairs.jsonl"
    data.write_text("".join(json.dumps(vars(p)) + "\n" for p in PAIRS))
    # a private copy: training changes the weights in place (the session fixture is shared)
    loaded = load_hf(embedded_dir, device="cpu", dtype=torch.float32, name="embedded")
    model, tok = loaded.model, loaded.tokenizer
    cfg = TrainConfig(pairs_per_step=2, group_size=4, lr=1e-5, max_tokens=1, prompt_suffix=FORCED,
                      trainable=f"last_n:{model.cfg.num_layers}", seed=0, **SHORT)
    sampler = EngineSampler.around(loaded, cfg.temperature, cfg.top_p, cfg.max_tokens, kv_cache_tokens=4096)
    tr = GRPOTrainer(model, tok, PairStream(data, seed=0), sampler, cfg, verdict_fn=forced_verdict)
    assert model.cfg.tie_word_embeddings and not model.model.embed_tokens.weight.requires_grad

    one, two = tok.encode("1", add_special_tokens=False), tok.encode("2", add_special_tokens=False)
    assert len(one) == len(two) == 1, (one, two)  # the verdict is one token
    prompts, correct, other = [], [], []
    for p in PAIRS:
        for swapped in (False, True):  # both presentation orders of every pair
            prompts.append(tr.collector.prompt_ids(p, swapped)[0])
            correct.append(two if swapped else one)
            other.append(one if swapped else two)

    def p_verdicts():
        """(P(correct verdict), P("1") + P("2")) per prompt, by teacher forcing."""
        with torch.no_grad():
            pc = response_logprobs(model, pack(prompts, correct, "cpu"))[:, 0].exp()
            po = response_logprobs(model, pack(prompts, other, "cpu"))[:, 0].exp()
        return pc, pc + po

    pc0, mass0 = p_verdicts()
    start, rewards = pc0.mean().item(), []
    for _ in range(STEPS):
        rewards.append(tr.step()["reward_mean"])
    pc1, mass1 = p_verdicts()
    end = pc1.mean().item()
    print(f"\nP('1')+P('2') {mass0.mean():.3f} -> {mass1.mean():.3f}; P(correct) {start:.3f} -> {end:.3f} "
          f"(per prompt {[round(x, 3) for x in pc1.tolist()]}); reward per step {rewards}; "
          f"wall {time.perf_counter() - wall0:.1f} s, cpu {time.process_time() - cpu0:.1f} s")
    assert mass0.mean() > 0.6  # the instruct model follows the forced format without help
    assert 0.35 < start < 0.65  # near chance over both orders: nothing to learn would be no test
    assert end > start + MIN_GAIN, (start, end, rewards)
