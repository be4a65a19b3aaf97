"""Small verifiable tasks with binary rewards that a tiny MoE learns on a CPU.

Both tasks share one vocabulary of 16 tokens: ``PAD BOS SEP EOS`` and the digits ``0..9``
(ids 4..13; ids 14, 15 are unused). A prompt is ``BOS d_1 .. d_m SEP``; the answer is ``m`` digits
followed by ``EOS``. The reward is 1 only if the whole response (all ``m + 1`` tokens) is right.

* ``sort``: the digits in ascending order.
* ``reverse``: the digits in reverse order.

:func:`cold_start` trains a few supervised steps on correct answers so that RL begins from a
non-trivial policy (10–60 % success rather than 0 %).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError

__all__ = ["PAD", "BOS", "SEP", "EOS", "VOCAB_SIZE", "DigitTask", "make_task", "TASKS", "cold_start"]

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = 4
VOCAB_SIZE = 16


@dataclass(frozen=True)
class DigitTask:
    """A digit-sequence task: ``prompt = BOS d_1..d_m SEP``, ``answer = f(d) EOS``."""

    name: str
    num_digits: int = 5

    @property
    def prompt_length(self) -> int:
        return self.num_digits + 2

    @property
    def max_new_tokens(self) -> int:
        return self.num_digits + 1

    def answer_digits(self, digits: torch.Tensor) -> torch.Tensor:
        if self.name == "sort":
            return digits.sort(dim=-1).values
        if self.name == "reverse":
            return digits.flip(-1)
        raise ValueError(f"unknown task {self.name!r}; choose from {sorted(TASKS)}")

    def sample_prompts(self, num_prompts: int, generator: torch.Generator) -> torch.Tensor:
        """``[num_prompts, num_digits + 2]`` prompt token ids."""
        digits = torch.randint(0, 10, (num_prompts, self.num_digits), generator=generator)
        bos = torch.full((num_prompts, 1), BOS)
        sep = torch.full((num_prompts, 1), SEP)
        return torch.cat([bos, digits + DIGIT0, sep], dim=1)

    def target(self, prompts: torch.Tensor) -> torch.Tensor:
        """The correct response ``[num_prompts, num_digits + 1]`` (digits then EOS)."""
        digits = prompts[:, 1 : 1 + self.num_digits] - DIGIT0
        ans = self.answer_digits(digits) + DIGIT0
        return torch.cat([ans, torch.full((prompts.shape[0], 1), EOS)], dim=1)

    def rewards(self, prompts: torch.Tensor, responses: torch.Tensor, response_lengths: torch.Tensor) -> torch.Tensor:
        """Binary reward ``[n]``: 1.0 iff the response equals the target (length and every token).

        ``responses`` ``[n, R]`` is right-padded; ``response_lengths`` counts the sampled tokens.
        """
        target = self.target(prompts)
        length_ok = response_lengths == target.shape[1]
        width = min(responses.shape[1], target.shape[1])
        tokens_ok = torch.zeros(prompts.shape[0], dtype=torch.bool)
        if width == target.shape[1]:
            tokens_ok = (responses[:, :width] == target).all(dim=1)
        return (length_ok & tokens_ok).float()


TASKS = {"sort": DigitTask("sort"), "reverse": DigitTask("reverse")}


def make_task(name: str, num_digits: int = 5) -> DigitTask:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return DigitTask(name, num_digits)


def cold_start(model, task: DigitTask, *, steps: int = 60, batch_size: int = 128, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Supervised warm-up on correct answers (cross-entropy on the response tokens). Returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        prompts = task.sample_prompts(batch_size, g)
        seq = torch.cat([prompts, task.target(prompts)], dim=1)
        logits = model(seq[:, :-1]).logits
        targets = seq[:, 1:].clone()
        targets[:, : task.prompt_length - 1] = -100  # only the response is supervised
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses
