"""How many Ray Serve replicas `composer serve --replicas N` runs and what each reserves.

Kept apart from serve/ray_app.py so that the CLI checks the options without importing Ray; the
fields map one to one to Ray Serve's deployment options (`deployment_options`) and HTTP proxy
options (`http_options`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEPLOYMENT = "ComposerReplica"


class ReplicaPlan(BaseModel):
    """How many replicas, and what each gets; maps one to one to Ray Serve's options."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(ge=1)
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    cpus_per_replica: float = Field(default=1.0, ge=0)
    gpus_per_replica: float = Field(default=0.0, ge=0)
    # vLLM batches what it is given: Serve's default of 5 in flight per replica would starve it.
    max_ongoing_requests: int = Field(default=64, ge=1)
    # Serve's proxy answers 408 to a request still unanswered after this long, whatever held it
    # (a replica that died under it, a queue behind a restarting one): no request hangs forever.
    # Serve's own default is no limit. Clients cannot lift it (serve.request_fields.PROXY_HEADERS).
    request_timeout_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> ReplicaPlan:
        if not self.lowest <= self.replicas <= self.highest:
            raise ValueError(
                f"--replicas {self.replicas} must lie within --min-replicas {self.lowest} and "
                f"--max-replicas {self.highest}"
            )
        return self

    @property
    def lowest(self) -> int:
        return self.replicas if self.min_replicas is None else self.min_replicas

    @property
    def highest(self) -> int:
        return self.replicas if self.max_replicas is None else self.max_replicas

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def http_options(self, host: str, port: int) -> dict[str, Any]:
        """Serve's HTTP proxy options (`serve.start`)."""
        return {"host": host, "port": port, "request_timeout_s": self.request_timeout_s}

    def deployment_options(self) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica}
        if self.gpus_per_replica:
            actor["num_gpus"] = self.gpus_per_replica
        options: dict[str, Any] = {
            "name": DEPLOYMENT,
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            # A replica that fails to start fails the same way again: give up early.
            "max_constructor_retry_count": 2 * self.replicas,
            "health_check_period_s": 5.0,
            "health_check_timeout_s": 60.0,  # an engine step on a busy CPU can take seconds
            "graceful_shutdown_timeout_s": 30.0,
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.lowest,
                "max_replicas": self.highest,
                "initial_replicas": self.replicas,
            }
        else:
            options["num_replicas"] = self.replicas
        return options
