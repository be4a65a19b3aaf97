"""The exchange format every engine hands the trainer: :class:`RolloutBatch`.

Built by the reference engine (:mod:`reference_impl.rollout`), by vLLM
(:func:`reference_impl.integrations.vllm_client.to_rollout_batch`) or by hand from any framework's
output (:mod:`reference_impl.converters`); read by the trainer and by :mod:`reference_impl.compare`.

* ``tokens`` ``[n, S]``: prompt + response, right-padded;
* ``rollout_logp`` ``[n, S-1]``: log μ_θold of each next token (column ``t`` scores ``tokens[:, t+1]``);
* ``mask`` ``[n, S-1]``: 1 where column ``t`` scores a response token;
* ``rollout_trace``: the engine's routes, one row per input position ``0 .. n_i-2`` of each sequence
  (:func:`reference_impl.routing.routed_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from .routing import RoutingTrace, read_safetensors

__all__ = ["RolloutBatch"]

_BATCH_FORMAT = "reference_impl.RolloutBatch"
_BATCH_TENSORS = ("tokens", "prompt_lengths", "seq_lengths", "rollout_logp", "mask", "group_ids")


@dataclass
class RolloutBatch:
    """Sampled sequences and the engine's view of them (``n`` = num_prompts × group_size)."""

    tokens: torch.Tensor  # [n, S] right-padded prompt + response
    prompt_lengths: torch.Tensor  # [n]
    seq_lengths: torch.Tensor  # [n] prompt + response tokens
    rollout_logp: torch.Tensor  # [n, S-1] log μ_θold(tokens[:, t+1] | tokens[:, :t+1])
    mask: torch.Tensor  # [n, S-1] float, 1 on response-token columns
    rollout_trace: RoutingTrace  # rows: positions 0 .. seq_len-2 of each sequence
    group_ids: torch.Tensor  # [n] index of the prompt each response answers

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.seq_lengths - self.prompt_lengths

    def responses(self, width: int) -> torch.Tensor:
        """Response tokens ``[n, width]`` (right-padded; all prompts share one length in the toy tasks)."""
        out = torch.zeros(self.num_sequences, width, dtype=self.tokens.dtype)
        for i in range(self.num_sequences):
            p, s = int(self.prompt_lengths[i]), int(self.seq_lengths[i])
            r = min(s - p, width)
            out[i, :r] = self.tokens[i, p : p + r]
        return out

    def save(self, path) -> None:
        """Write the batch (tokens, log-probs, mask, routes) to one safetensors file, never pickle.

        This is the exchange format of ``python -m reference_impl compare``: build a
        :class:`RolloutBatch` from any engine's output (see :mod:`reference_impl.converters`) and save it.
        """
        tensors, meta = self.rollout_trace.to_tensors(prefix="trace.")
        for name in _BATCH_TENSORS:
            tensors[name] = getattr(self, name).contiguous()
        meta["format"] = _BATCH_FORMAT
        save_file(tensors, str(path), metadata=meta)

    @staticmethod
    def load(path) -> "RolloutBatch":
        """Read a batch written by :meth:`save`; shapes and the alignment rule are checked."""
        tensors, meta = read_safetensors(path, _BATCH_FORMAT)
        missing = [n for n in _BATCH_TENSORS if n not in tensors]
        if missing:
            raise ValueError(f"RolloutBatch.load: file lacks tensors {missing}")
        trace = RoutingTrace.from_tensors(tensors, meta, prefix="trace.")
        batch = RolloutBatch(**{n: tensors[n] for n in _BATCH_TENSORS}, rollout_trace=trace)
        batch.validate()
        return batch

    def validate(self) -> None:
        """Raise unless shapes agree and the trace follows the alignment rule."""
        n, S = self.tokens.shape
        for name, shape in (("rollout_logp", (n, S - 1)), ("mask", (n, S - 1))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"RolloutBatch: {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        for name in ("prompt_lengths", "seq_lengths", "group_ids"):
            if tuple(getattr(self, name).shape) != (n,):
                raise ValueError(f"RolloutBatch: {name} has shape {tuple(getattr(self, name).shape)}, expected ({n},)")
        if int(self.seq_lengths.max()) > S:
            raise ValueError(f"RolloutBatch: a sequence length exceeds the {S} token columns")
        self.rollout_trace.check_alignment(self.seq_lengths.tolist())

    def select(self, index: torch.Tensor | list[int]) -> "RolloutBatch":
        """The sub-batch of the given sequences (e.g. a mini-batch)."""
        index = torch.as_tensor(index, dtype=torch.long)
        parts = self.rollout_trace.split()
        width = int(self.seq_lengths[index].max())
        return RolloutBatch(
            tokens=self.tokens[index, :width],
            prompt_lengths=self.prompt_lengths[index],
            seq_lengths=self.seq_lengths[index],
            rollout_logp=self.rollout_logp[index, : width - 1],
            mask=self.mask[index, : width - 1],
            rollout_trace=RoutingTrace.concatenate(parts[i] for i in index.tolist()),
            group_ids=self.group_ids[index],
        )
