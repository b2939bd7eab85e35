"""The model catalog: what each configured model costs and where it goes, and what a
request reserves (`Route.reservation`).

Built once per config, so the hot path does dictionary lookups, not config walks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

import tiktoken

from . import config as cfg
from . import prompts, tokens
from .config import Config, UpstreamConfig
from .errors import InvalidRequest
from .intake import ENDPOINTS, ClientRequest, Rewrite
from .money import STANDARD, LongContext, Price, Rates, TierPrice, ceil_micro, pico
from .prices import CATALOG

PROMPT_MARGIN_TOKENS = 8
DEFAULT_CHAT_CAP_FIELD = "max_completion_tokens"
REASONING_MODELS = re.compile(r"^(o\d|gpt-5|gpt-oss)")  # bill hidden reasoning as output


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one request reserves: a true upper bound on what it can cost."""

    prompt_tokens: int  # the prompt as counted here: what an estimated charge uses
    prompt_exact: bool  # prompt_tokens is tiktoken's exact count (else Route.prompt_tokens_exact)
    reserved_prompt_tokens: int
    reserved_output_tokens: int  # all choices, predicted output included
    prompt_cost: int  # micro-USD, rounded up: the prompt, and a prediction's tokens (clamp cannot lower them)
    output_cost: int  # the capped output of all choices
    output_pico: int  # output price per token in pico-USD, for clamp mode (0: nothing to clamp)
    rewrite: Rewrite  # what the forwarded body must say so the upstream cannot exceed this

    @property
    def cap(self) -> int | None:
        """The per-choice output cap forwarded (None: the endpoint has no output)."""
        return self.rewrite.cap


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
    images: prompts.ImageTokens  # the most one image costs
    max_tool_calls: int | None  # hosted-tool calls a request may make (None: hosted tools refused)
    reasoning: bool  # bills hidden reasoning as output: an interrupted stream cannot be counted
    price_source: str | None = None  # the price catalog's version for `price: catalog` (None: the YAML's prices)

    def reservation(self, client: ClientRequest) -> Reservation:
        self._check_tier(client)
        count = prompts.measure_prompt(client.endpoint, client.body, self.encoding, images=self.images)
        reserved_prompt = self._reserved_prompt(count, ENDPOINTS[client.endpoint][1])
        cap = self.output_cap(client)
        prediction = prompts.prediction_tokens(client.body, self.encoding) if cap is not None else 0
        rates = self.price.worst(client.service_tier, reserved_prompt)
        # every prompt token at the dearest kind it may be; audio only where uncounted parts may hold it
        input_rate = max(rates.input, rates.cached_input, rates.audio_input if count.uncountable else Decimal(0))
        output_rate = max(rates.output, rates.audio_output) if _wants_audio(client) else rates.output
        fixed = reserved_prompt * input_rate + prediction * client.choices * output_rate
        return Reservation(
            # a prompt we cannot count is charged at its bound when the upstream reports no usage
            prompt_tokens=reserved_prompt if count.uncountable else min(count.estimate, reserved_prompt),
            prompt_exact=count.exact or bool(count.uncountable),
            reserved_prompt_tokens=reserved_prompt,
            reserved_output_tokens=((cap or 0) + prediction) * client.choices,
            prompt_cost=ceil_micro(fixed),
            output_cost=ceil_micro((cap or 0) * client.choices * output_rate),
            output_pico=pico(output_rate) if cap is not None else 0,
            rewrite=self.rewrite(client, cap, count.hosted_tools),
        )

    def rewrite(self, client: ClientRequest, cap: int | None, hosted_tools: bool = False) -> Rewrite:
        """The forwarded body's bounds: the cap (in the model's own field too when its
        provider reads only that one) and, with hosted tools, their calls."""
        always = client.endpoint == "chat" and self.chat_cap_field != DEFAULT_CHAT_CAP_FIELD
        calls = self.max_tool_calls if hosted_tools else None
        return Rewrite(cap, self.cap_field(client), always, calls)

    def _check_tier(self, client: ClientRequest) -> None:
        tier = client.service_tier
        if tier is not None and not self.price.offers(tier):
            raise InvalidRequest(
                f"The service tier `{tier[:50]}` is not offered for the model `{self.model}`.",
                param="service_tier",
                code="invalid_value",
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
        return prompts.exact_prompt_tokens(client.endpoint, client.body, self.encoding, self.images)

    def _reserved_prompt(self, count: prompts.PromptCount, prompt_field: str) -> int:
        """Upstreams count a few tokens we cannot see (chat templates, tool plumbing):
        5% + 8 covers them. What cannot be counted here is reserved at the context
        window, the most any prompt can be; with hosted tools, once per call they may make."""
        window = self.context_window
        if count.exact and window and count.estimate > window:
            raise InvalidRequest(
                f"This model's maximum context length is {window} tokens; the prompt has {count.estimate}.",
                param=prompt_field,
                code="context_length_exceeded",
            )
        if count.uncountable:
            if not window:
                raise InvalidRequest(
                    f"`{count.uncountable}` cannot be counted by this proxy (files, audio, prompts stored upstream "
                    f"and hosted tools are sized only by the upstream): the model `{self.model}` needs "
                    "`max_input_tokens` configured to reserve it.",
                    param=count.uncountable,
                    code="uncountable_input",
                )
            if count.hosted_tools and self.max_tool_calls is None:
                raise InvalidRequest(
                    f"Hosted tools are not enabled for the model `{self.model}` (each call re-reads the context: "
                    "the operator sets `max_tool_calls` to allow them).",
                    param=count.uncountable,
                    code="uncountable_input",
                )
            return window * (1 + (self.max_tool_calls or 0) if count.hosted_tools else 1)
        return count.bound + -(-count.bound // 20) + PROMPT_MARGIN_TOKENS  # never capped: the window may be wrong


def _reasons(model: cfg.ModelConfig, upstream_model: str) -> bool:
    guessed = bool(REASONING_MODELS.match(upstream_model.rsplit("/", 1)[-1].lower()))
    return guessed if model.reasoning is None else model.reasoning


def _images(model: cfg.ModelConfig, upstream_model: str) -> prompts.ImageTokens:
    own = model.image_tokens
    return prompts.ImageTokens(own.low, own.high) if own else prompts.image_tokens_for(upstream_model)


def _wants_audio(client: ClientRequest) -> bool:
    modalities = client.body.get("modalities")
    return isinstance(modalities, list) and "audio" in modalities


def _rates(
    p: cfg.PriceConfig | cfg.TierPriceConfig | cfg.LongContextPriceConfig, base: Rates, factor: Decimal
) -> Rates:
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


def _tier(p: cfg.PriceConfig | cfg.TierPriceConfig, base: Rates, factor: Decimal) -> TierPrice:
    rates = _rates(p, base, factor)
    long_context = tuple(LongContext(lc.above_input_tokens, _rates(lc, rates, factor)) for lc in p.long_context)
    return TierPrice(rates, long_context)


def price_of(p: cfg.PriceConfig, markup_percent: Decimal) -> Price:
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
                images=_images(model, config.upstream_model(name)),
                max_tool_calls=model.max_tool_calls,
                reasoning=_reasons(model, config.upstream_model(name)),
                price_source=CATALOG if model.price.source == "catalog" else None,
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
