"""The reference rollout engine: KV-cached batched sampling that returns what the trainer needs.

For each prompt it samples ``group_size`` responses from the engine's copy of the policy, μ_θold,
and returns a :class:`RolloutBatch`:

* ``tokens`` ``[n, S]``: prompt + response, right-padded with ``pad_id``;
* ``rollout_logp`` ``[n, S-1]``: log μ_θold of each next token (column ``t`` scores
  ``tokens[:, t+1]``), from the distribution actually sampled from (temperature included);
* ``mask`` ``[n, S-1]``: 1 where column ``t`` scores a response token;
* ``rollout_trace``: the engine's routes, one row per input position ``0 .. n_i-2`` of each
  sequence (:func:`reference_impl.routing.routed_rows`): row ``t`` routed the token whose output
  is scored in column ``t``.

The engine's numerics (``fp32``, ``bf16``, simulated ``fp8_e4m3`` / ``fp8_e5m2``) and the
*simulated* router-noise dial are described in :mod:`reference_impl.numerics`.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .batch import RolloutBatch  # re-exported: its home is reference_impl.batch
from .logprobs import next_token_logprobs, next_token_logprobs_and_entropy  # re-exported
from .model import KVCache
from .numerics import add_router_noise, engine_copy
from .replay import record_routing
from .routing import RoutingTrace

__all__ = ["RolloutEngine", "RolloutBatch", "next_token_logprobs", "next_token_logprobs_and_entropy"]


class RolloutEngine:
    """Samples from an engine copy of the trainer's model in the chosen numerics.

    Args:
        numerics: ``fp32`` | ``bf16`` | ``fp8_e4m3`` | ``fp8_e5m2`` (simulated FP8).
        router_noise_std: SIMULATED mismatch, Gaussian noise on the engine's router logits
            (0 = off). Label results that use it as simulated.
        temperature: sampling temperature; ``rollout_logp`` is taken from the same tempered
            distribution that was sampled.
        seed: seeds sampling and router noise.
    """

    def __init__(self, *, numerics: str = "fp32", router_noise_std: float = 0.0, temperature: float = 1.0, seed: int = 0) -> None:
        if temperature <= 0:
            raise ValueError(f"RolloutEngine: temperature must be > 0, got {temperature}")
        self.numerics, self.router_noise_std, self.temperature = numerics, router_noise_std, temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.noise_generator = torch.Generator().manual_seed(seed + 1)
        self.model = None

    def sync_weights(self, model) -> None:
        """Load the trainer's current weights into the engine (a fresh copy in the engine numerics)."""
        self.model = engine_copy(model, self.numerics)
        add_router_noise(self.model, self.router_noise_std, self.noise_generator)

    @torch.no_grad()
    def generate(
        self,
        prompts: torch.Tensor,
        *,
        group_size: int,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int = 0,
        prompt_lengths: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """Sample ``group_size`` responses per prompt; stop a sequence at ``eos_id`` or ``max_new_tokens``.

        ``prompts`` ``[num_prompts, P]``, right-padded if ``prompt_lengths`` is given.
        """
        if self.model is None:
            raise RuntimeError("RolloutEngine: call sync_weights(model) before generate()")
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError(f"RolloutEngine: group_size and max_new_tokens must be >= 1, got {group_size}, {max_new_tokens}")
        num_prompts, width = prompts.shape
        if prompt_lengths is None:
            prompt_lengths = torch.full((num_prompts,), width)
        if int(prompt_lengths.min()) < 1:
            raise ValueError("RolloutEngine: every prompt needs at least one token")
        group_ids = torch.arange(num_prompts).repeat_interleave(group_size)
        plen = prompt_lengths[group_ids]
        n = num_prompts * group_size
        # Left-pad for batched decoding: every sequence's next token sits in the last column.
        pad = width - plen
        left = torch.full((n, width), pad_id, dtype=torch.long)
        for i in range(n):
            left[i, pad[i] :] = prompts[group_ids[i], : plen[i]]
        attention = (torch.arange(width)[None, :] >= pad[:, None]).long()

        cache = KVCache(self.model.config.num_hidden_layers)
        sampled, logps = [], []
        finished = torch.zeros(n, dtype=torch.bool)
        lengths = torch.zeros(n, dtype=torch.long)
        with record_routing(self.model) as rec:
            out = self.model(left, cache=cache, attention_mask=attention)
            for step in range(max_new_tokens):
                logprobs = F.log_softmax(out.logits[:, -1].float() / self.temperature, dim=-1)
                tok = torch.multinomial(logprobs.exp(), 1, generator=self.generator).squeeze(1)
                tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
                lp = logprobs.gather(1, tok[:, None]).squeeze(1).masked_fill(finished, 0.0)
                sampled.append(tok)
                logps.append(lp)
                lengths += (~finished).long()
                finished = finished | (tok == eos_id)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                attention = torch.cat([attention, (~finished | (tok == eos_id)).long()[:, None]], dim=1)
                out = self.model(tok[:, None], cache=cache, attention_mask=attention)
            routes_left = rec.routes  # [n, width + steps - 1 (+0), L, k] in left-padded columns

        responses = torch.stack(sampled, dim=1)  # [n, R]
        resp_logp = torch.stack(logps, dim=1)
        seq_lengths = plen + lengths
        total = int(seq_lengths.max())
        tokens = torch.full((n, total), pad_id, dtype=torch.long)
        rollout_logp = torch.zeros(n, total - 1)
        mask = torch.zeros(n, total - 1)
        routes = torch.zeros(n, total, *routes_left.shape[2:], dtype=routes_left.dtype)
        for i in range(n):
            p, r, s = int(plen[i]), int(lengths[i]), int(seq_lengths[i])
            tokens[i, :p] = left[i, pad[i] :]
            tokens[i, p:s] = responses[i, :r]
            rollout_logp[i, p - 1 : s - 1] = resp_logp[i, :r]
            mask[i, p - 1 : s - 1] = 1.0
            cols = min(s - 1, routes_left.shape[1] - int(pad[i]))
            routes[i, :cols] = routes_left[i, pad[i] : pad[i] + cols]
        trace = RoutingTrace.from_padded(routes, seq_lengths.tolist(), self.model.config.num_experts)
        return RolloutBatch(tokens, plen, seq_lengths, rollout_logp, mask, trace, group_ids)
