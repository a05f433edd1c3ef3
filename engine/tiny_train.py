"""A tiny model that has learned something, for comparisons that quantization must survive.

A random tiny model's next-token logits are nearly tied: FP8 activation quantization (about 2.5 % per GEMM
input, as DeepSeek-V3 runs) flips its greedy tokens after 0-26 tokens against the dequantized model, which
says nothing about the kernels. A trained model's are not tied. This trains the tiny model for a few dozen
steps (transformers' DeepSeek-V3/V2 on the CPU, float32, ~10 s) on a synthetic Markov chain: each token is a
fixed permutation of the one before, or with probability ``NOISE`` a random one. The model learns the chain
(loss at the noise's entropy after ~20 steps), so greedy decoding follows it with decisive margins and walks
through many distinct tokens. ``engine.tiny_model --train-steps N`` writes it in the checkpoint's format
(FP8 for the ``v3-fp8`` variant).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

NOISE = 0.25  # share of tokens drawn at random: the prompts the tests use are random tokens too
BATCH, SEQ_LEN, LR = 16, 96, 3e-3


def chain_batch(successor: torch.Tensor, gen: torch.Generator, batch: int = BATCH,
                seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``[batch, seq_len]`` token ids: each the successor of the one before, or (p = NOISE) a random one."""
    vocab = successor.numel()
    x = torch.empty(batch, seq_len, dtype=torch.long)
    x[:, 0] = torch.randint(3, vocab, (batch,), generator=gen)
    for t in range(1, seq_len):
        noise = torch.rand(batch, generator=gen) < NOISE
        x[:, t] = torch.where(noise, torch.randint(3, vocab, (batch,), generator=gen), successor[x[:, t - 1]])
    return x


def successor_table(vocab: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of the ordinary ids (3 and up; 0-2 are bos/eos/pad and map into them too): its cycles
    are long, so a greedy walk meets many distinct tokens."""
    perm = torch.randperm(vocab - 3, generator=gen) + 3
    return torch.cat([perm[:3], perm])


def _hf_model(raw: dict[str, Any]) -> torch.nn.Module:
    import transformers

    cfg = {k: v for k, v in raw.items() if k != "quantization_config"}
    cfg.update(torch_dtype="float32", num_nextn_predict_layers=0)
    if raw["model_type"] == "deepseek_v3":
        return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg))
    return transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**cfg))


def checkpoint_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict under the checkpoint's names: newer versions stack the experts
    (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``); checkpoints keep one matrix per
    expert and projection. Rotary buffers are not weights."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if "rotary_emb" in name:
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = tensor[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = tensor[e, inter:].clone()
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e].clone()
        else:
            out[name] = tensor.detach().clone()
    return out


def trained_tensors(raw: dict[str, Any], seed: int, steps: int) -> dict[str, torch.Tensor]:
    """The tiny model of config ``raw`` after ``steps`` AdamW steps on the chain, under checkpoint names. The
    caller's global RNG state is left as it was (transformers initializes from it: seeded here, in a fork)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _train(raw, seed, steps)


def _train(raw: dict[str, Any], seed: int, steps: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    model = _hf_model(raw).train()
    successor = successor_table(raw["vocab_size"], gen)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x = chain_batch(successor, gen)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            log.info("tiny model training: step %d/%d, loss %.3f", step, steps, loss.item())
    log.info("tiny model trained: %d steps, final loss %.3f", steps, loss.item())
    return checkpoint_names(model.state_dict())
