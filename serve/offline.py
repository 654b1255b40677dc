"""An in-process vLLM engine with the server's masks and policy, for evaluation.

`composer eval` must measure the model that `composer serve` serves: the same plugin (masked
MoE, router bias, the MoE backend chosen the same way), the same per-request mask fields
(serve.experts.engine_fields) and the same policy (serve.policy.permitted for a caller without a
key, as with `--api-keys off`): an opted-out or restricted expert is never used, and asking for
one is an error naming it. Policy is re-read from the registry for every selection, so an
opt-out during a long evaluation binds from the next pass on.

Engines are shared per process (:func:`open_engine`, reference counted): starting one costs
20-40 s on CPU, and callers in one process that evaluate the same checkpoint with the same
settings (the test suite, a notebook) need not pay it twice. The engine holds no policy state,
so sharing it shares nothing a caller could misuse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import ComposerError
from serve.experts import SelectionError, engine_fields, parse_experts_field, select_experts
from serve.policy import expert_names, load_bindings, permitted

# Salt secret of offline requests: no client shares this engine, so a fixed key is enough to
# keep masks apart in the prefix cache.
OFFLINE_SALT_SECRET = b"composer-offline-salt-secret"


class ExpertChoiceError(ComposerError):
    """An expert choice the policy or the model refuses (names the experts)."""


def offline_request(
    names: Sequence[str],
    ids: Sequence[int],
    allowed: Sequence[str] | None,
    secret: bytes = OFFLINE_SALT_SECRET,
    salted: bool = True,
    **sampling: Any,
) -> tuple[Any, Any]:
    """(prompt, sampling params) as the server hands them to the engine: the explicit mask of
    `allowed` (None: every expert of `names`) and, if `salted`, its cache salt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    fields = engine_fields(names, list(names) if allowed is None else list(allowed), secret)
    salt = {"cache_salt": fields["cache_salt"]} if salted else {}
    prompt = TokensPrompt(prompt_token_ids=list(ids), **salt)  # type: ignore[typeddict-item]
    return prompt, SamplingParams(extra_args=fields["vllm_xargs"], **sampling)


@dataclass(frozen=True)
class EngineSettings:
    """What an evaluation engine is started with (part of the sharing key)."""

    dtype: str = "float32"
    max_model_len: int = 512
    kv_cache_bytes: int = 256 << 20
    block_size: int = 32
    seed: int = 0


class OfflineEngine:
    """One checkpoint in an in-process vLLM engine, scored under the registry's policy."""

    def __init__(
        self, model_path: str | Path, registry_url: str | None, settings: EngineSettings
    ) -> None:
        self.model_path = Path(model_path).resolve()
        self.registry_url = registry_url
        self.settings = settings
        self.names = expert_names(self.model_path)
        self.bindings = load_bindings(self.model_path, registry_url)
        self.permitted_now()  # an unreadable registry fails before the engine starts
        self._llm: Any = None  # started on first use: bad choices fail before 20-40 s of start

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._llm = _start_llm(self.model_path, self.settings)
        return self._llm

    def permitted_now(self) -> set[str]:
        """Experts a caller without a key may use now (one bounded registry read)."""
        if self.registry_url is None:
            return set(self.names)
        from registry.db import make_reader_engine
        from registry.policy_snapshot import read_policy_snapshot

        engine = make_reader_engine(self.registry_url)
        try:
            ids = [b.version_id for b in self.bindings if b.version_id is not None]
            snapshot = read_policy_snapshot(engine, ids)
        except Exception as e:
            raise ComposerError(f"cannot read the policy registry: {type(e).__name__}: {e}") from e
        finally:
            engine.dispose()
        return permitted(self.bindings, snapshot, None)

    def select(self, experts: Any) -> tuple[str, ...]:
        """The experts a choice (`{"include": [...]}` / `{"exclude": [...]}` / None) gets,
        in router order, under the current policy; ExpertChoiceError names refused experts."""
        if not self.names:  # a dense model: nothing to choose, nothing to mask
            if experts is not None:
                raise ExpertChoiceError("this model has no experts to choose from")
            return ()
        try:
            return select_experts(self.names, parse_experts_field(experts), self.permitted_now())
        except SelectionError as e:
            raise ExpertChoiceError(str(e)) from None

    def prompt_logprobs(
        self,
        chunks: Sequence[Sequence[int]],
        allowed: Sequence[str],
        on_batch: Callable[[int], None] | None = None,
        batch_size: int = 16,
    ) -> list[list[float]]:
        """Log-probability of every token of every chunk after the first, given what precedes
        it, with only `allowed` experts routed (a result of :meth:`select`)."""
        refused = sorted(set(allowed) - self.permitted_now())
        if refused:  # fail closed: only what select() grants now ever reaches the engine
            raise ExpertChoiceError(f"experts not available to this caller: {', '.join(refused)}")
        out: list[list[float]] = []
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size]
            reqs = [
                offline_request(self.names, ids, allowed, max_tokens=1, prompt_logprobs=0,
                                detokenize=False, temperature=0.0)
                for ids in batch
            ]  # fmt: skip
            results = self.llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
            for ids, res in zip(batch, results, strict=True):
                out.append(_chosen_logprobs(ids, res.prompt_logprobs))
            if on_batch is not None:
                on_batch(len(batch))
        return out

    def close(self) -> None:
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None


def _chosen_logprobs(ids: Sequence[int], prompt_logprobs: Any) -> list[float]:
    """The logprob vLLM gives each prompt token (position 0 has none)."""
    return [float(prompt_logprobs[i][int(t)].logprob) for i, t in enumerate(ids) if i > 0]


def _start_llm(model_path: Path, s: EngineSettings) -> Any:
    """vLLM's offline engine as `composer serve` configures its server: eager (masks are
    per-step data), prefix caching on (masks kept apart by cache_salt), the MoE backend chosen
    by serve.moe_backend. Token ids come from composer/text.py, so no tokenizer is loaded."""
    from serve.moe_backend import BACKEND_ENV, moe_backend

    os.environ[BACKEND_ENV] = moe_backend()[0]  # the engine process builds the model with it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM

    return LLM(
        model=str(model_path), dtype=s.dtype, max_model_len=s.max_model_len, enforce_eager=True,
        block_size=s.block_size, kv_cache_memory_bytes=s.kv_cache_bytes,
        enable_prefix_caching=True, seed=s.seed, skip_tokenizer_init=True,
    )  # fmt: skip


_OPEN: dict[tuple[Path, str | None, EngineSettings], tuple[OfflineEngine, int]] = {}


@contextmanager
def open_engine(
    model_path: str | Path, registry_url: str | None, settings: EngineSettings
) -> Iterator[OfflineEngine]:
    """An engine for `model_path`, shared with other open users in this process; shut down
    when the last one leaves."""
    key = (Path(model_path).resolve(), registry_url, settings)
    if key in _OPEN:
        engine, users = _OPEN[key]
        _OPEN[key] = (engine, users + 1)
    else:
        engine = OfflineEngine(model_path, registry_url, settings)
        _OPEN[key] = (engine, 1)
    try:
        yield engine
    finally:
        engine, users = _OPEN[key]
        if users == 1:
            del _OPEN[key]
            engine.close()
        else:
            _OPEN[key] = (engine, users - 1)
