"""The model catalog: what each configured model costs and where it goes, and what a
request reserves (`Route.reservation`).

Built once per config, so the hot path does dictionary lookups, not config walks.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import tiktoken

from . import config as cfg
from . import prompts, tokens
from .config import Config, UpstreamConfig
from .errors import InvalidRequest
from .intake import ENDPOINTS, ClientRequest
from .money import STANDARD, LongContext, Price, Rates, TierPrice, ceil_micro, pico

PROMPT_MARGIN_TOKENS = 8


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one request reserves: a true upper bound on what it can cost."""

    prompt_tokens: int  # the prompt as counted here: what an estimated charge uses
    prompt_exact: bool  # prompt_tokens is tiktoken's exact count (else Route.prompt_tokens_exact)
    reserved_prompt_tokens: int
    reserved_output_tokens: int  # all choices, predicted output included
    prompt_cost: int  # micro-USD, rounded up
    output_cost: int
    output_pico: int  # output price per token in pico-USD, for clamp mode (0: nothing to clamp)
    cap: int | None  # the per-choice output cap to forward (None: the endpoint has no output)
    cap_field: str  # the field that carries it when the client named none


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    upstream_name: str
    upstream: UpstreamConfig
    upstream_model: str
    price: Price
    encoding: tiktoken.Encoding
    max_output_tokens: int  # reserved when the request names no max: the model's cap
    output_limit: int | None  # the model's own limit, if configured
    context_window: int | None  # the most a prompt can be; reserved for what cannot be counted
    chat_cap_field: str  # the chat field that carries a forwarded cap

    def reservation(self, client: ClientRequest) -> Reservation:
        count = prompts.measure_prompt(client.endpoint, client.body, self.encoding)
        reserved_prompt = self._reserved_prompt(count)
        cap = self.output_cap(client)
        per_choice = 0 if cap is None else cap + prompts.prediction_tokens(client.body, self.encoding)
        rates = self.price.worst(client.service_tier, reserved_prompt)
        # every prompt token at the dearest kind it may be; audio only where uncounted parts may hold it
        input_rate = max(rates.input, rates.cached_input, rates.audio_input if count.uncountable else Decimal(0))
        output_rate = max(rates.output, rates.audio_output) if _wants_audio(client) else rates.output
        return Reservation(
            prompt_tokens=min(count.estimate, reserved_prompt),
            prompt_exact=count.exact,
            reserved_prompt_tokens=reserved_prompt,
            reserved_output_tokens=per_choice * client.choices,
            prompt_cost=ceil_micro(reserved_prompt * input_rate),
            output_cost=ceil_micro(per_choice * client.choices * output_rate),
            output_pico=pico(output_rate) if cap is not None else 0,
            cap=cap,
            cap_field=self.cap_field(client),
        )

    def output_cap(self, client: ClientRequest) -> int | None:
        """The per-choice output cap: the largest max asked, else the model's; at most
        the model's limit. None for endpoints without output (embeddings)."""
        if not ENDPOINTS[client.endpoint][2]:
            return None
        asked = client.max_tokens or self.max_output_tokens
        return min(asked, self.output_limit) if self.output_limit else asked

    def cap_field(self, client: ClientRequest) -> str:
        fields = ENDPOINTS[client.endpoint][2]
        return self.chat_cap_field if client.endpoint == "chat" else (fields[0] if fields else "")

    def prompt_tokens_exact(self, client: ClientRequest) -> int:
        """The prompt counted exactly with tiktoken, however long (~1 s of CPU per 5 MB):
        for an estimated charge of a huge prompt, off the event loop (`asyncio.to_thread`)."""
        return prompts.exact_prompt_tokens(client.endpoint, client.body, self.encoding)

    def _reserved_prompt(self, count: prompts.PromptCount) -> int:
        """Upstreams count a few tokens we cannot see (chat templates, tool plumbing):
        5% + 8 covers them. What cannot be counted here is reserved at the context
        window, the most any prompt can be."""
        if count.uncountable:
            if not self.context_window:
                raise InvalidRequest(
                    f"`{count.uncountable}` cannot be counted by this proxy (files, audio, prompts stored upstream "
                    f"and hosted tools are sized only by the upstream): the model `{self.model}` needs "
                    "`max_input_tokens` configured to reserve it.",
                    param=count.uncountable,
                    code="uncountable_input",
                )
            return self.context_window
        bound = count.bound + -(-count.bound // 20) + PROMPT_MARGIN_TOKENS
        return min(bound, self.context_window) if self.context_window else bound


def _wants_audio(client: ClientRequest) -> bool:
    modalities = client.body.get("modalities")
    return isinstance(modalities, list) and "audio" in modalities


def _rates(p: cfg.Price | cfg.TierPrice | cfg.LongContextPrice, base: Rates, factor: Decimal) -> Rates:
    """Configured prices (USD/1M) over `base` (already scaled) for the kinds left out."""

    def rate(value: Decimal | None, inherited: Decimal) -> Decimal:
        return inherited if value is None else value * factor

    return Rates(
        input=rate(p.input, base.input),
        cached_input=rate(p.cached_input, base.cached_input),
        output=rate(p.output, base.output),
        audio_input=rate(p.audio_input, base.audio_input),
        audio_output=rate(p.audio_output, base.audio_output),
    )


def _tier(p: cfg.Price | cfg.TierPrice, base: Rates, factor: Decimal) -> TierPrice:
    rates = _rates(p, base, factor)
    long_context = tuple(LongContext(lc.above_input_tokens, _rates(lc, rates, factor)) for lc in p.long_context)
    return TierPrice(rates, long_context)


def price_of(p: cfg.Price, markup_percent: Decimal) -> Price:
    """A model's configured price as micro-USD rates, markup applied. Defaults: cached
    input at `input`, output free, audio at the text price of its side."""
    factor = 1 + markup_percent / 100
    text_in, text_out = p.input * factor, (p.output or Decimal(0)) * factor
    standard = _tier(p, Rates(text_in, text_in, text_out, text_in, text_out), factor)
    others = ((name, _tier(tier, standard.rates, factor)) for name, tier in p.service_tiers.items())
    return Price(((STANDARD, standard), *others))


class Catalog:
    def __init__(self, config: Config) -> None:
        self.routes: dict[str, Route] = {}
        for name, model in config.models.items():
            default_max = config.billing.default_max_output_tokens
            limit = model.max_output_tokens  # without a max, the upstream may write this much
            self.routes[name] = Route(
                model=name,
                upstream_name=model.upstream,
                upstream=config.upstreams[model.upstream],
                upstream_model=config.upstream_model(name),
                price=price_of(model.price, config.markup_for(name)),
                encoding=tokens.encoding_for_model(model.upstream_model or name, model.encoding),
                max_output_tokens=limit or default_max,
                output_limit=limit,
                context_window=model.max_input_tokens,
                chat_cap_field=model.max_tokens_field,
            )

    def route(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None:
            raise InvalidRequest(
                f"The model `{model[:200]}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return route
