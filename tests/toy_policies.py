"""Toy policies with the sampler's protocol, shared by the sampler tests (not a test module)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ToyEmbeds:
    mu: torch.Tensor  # [B] data mean of each row's prompt

    def select(self, index) -> "ToyEmbeds":
        return ToyEmbeds(self.mu[torch.as_tensor(index, dtype=torch.long)])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mu": self.mu}


class GaussianPolicy:
    """Exact velocity of the rectified flow of data x0 ~ N(mu_c, s0² I), prompt c setting mu_c.

    With x_t = (1−t)·x0 + t·eps, (x0, x_t) are jointly Gaussian, Var x_t = (1−t)²s0² + t² =: V,
    E[x0 | x_t] = mu + (1−t)s0²/V·(x_t − (1−t)mu), E[eps | x_t] = t/V·(x_t − (1−t)mu), and the
    velocity is v = E[eps − x0 | x_t]. The ODE maps eps to mu + s0·eps exactly. The velocity of
    a row depends only on that row (batch invariant), so any batching gives bitwise equal results.
    """

    def __init__(self, s0: float = 0.5, shift: float = 3.0):
        self.s0 = s0
        self.shift = shift
        self.calls: list[int] = []  # rows per velocity call

    def encode_prompts(self, prompts, negative_prompt=""):
        return ToyEmbeds(torch.tensor([0.1 * len(p) - 1.0 for p in prompts]))

    def latent_shape(self, height, width):
        return (2, height // 8, width // 8)

    def initial_noise(self, batch, height, width, generator=None):
        return torch.randn((batch, *self.latent_shape(height, width)), generator=generator)

    def sigmas(self, num_steps, height, width):
        t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return (self.shift * t / (1 + (self.shift - 1) * t)).float()

    def velocity(self, x, sigma, embeds, guidance_scale):
        self.calls.append(x.shape[0])
        t = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        mu = embeds.mu.reshape(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s0**2 + t**2
        centred = x - (1 - t) * mu
        return t / var * centred - (mu + (1 - t) * self.s0**2 / var * centred)

    def decode(self, x):
        img = torch.sigmoid(x.mean(1, keepdim=True)).expand(-1, 3, -1, -1)
        return torch.nn.functional.interpolate(img, scale_factor=8, mode="nearest")
