"""The teacher step's settings (``teacher:`` in a config, the options of `kpod teacher generate`).
Kept apart from the pipeline so that building the CLI needs no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kpod.errors import ConfigError


@dataclass(frozen=True)
class TeacherConfig:
    """Where the rationales come from.

    Attributes:
        source: ``dataset`` (the data's own rationales) or ``server`` (generate them with a
            teacher behind an OpenAI-compatible API; kept only when their answer is right).
        base_url: the API root of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.
        model: the teacher model's name on that server.
        api_key_env: the environment variable holding the API key (the key is never logged or
            written anywhere).
        n_samples: samples per question.
        temperature: sampling temperature.
        max_tokens: completion length limit.
        concurrency: requests in flight at once.
    """

    source: Literal["dataset", "server"] = "dataset"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    n_samples: int = 1
    temperature: float = 0.7
    max_tokens: int = 512
    concurrency: int = 8

    def __post_init__(self) -> None:
        if self.source == "server" and not (self.base_url and self.model):
            raise ConfigError("base_url: teacher.source 'server' needs teacher.base_url and teacher.model")
        if self.n_samples < 1 or self.max_tokens < 1 or self.concurrency < 1 or self.temperature < 0:
            raise ConfigError(
                "n_samples, max_tokens and concurrency must be at least 1 and temperature >= 0; got "
                f"{self.n_samples}, {self.max_tokens}, {self.concurrency} and {self.temperature}"
            )
