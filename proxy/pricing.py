"""The model catalog: what each configured model costs and where it goes.

Built once per config, so the hot path does dictionary lookups, not config walks.
"""

from __future__ import annotations

from dataclasses import dataclass

import tiktoken

from . import prompts, tokens
from .config import Config, UpstreamConfig
from .errors import InvalidRequest
from .intake import ClientRequest
from .money import Price

PROMPT_MARGIN_TOKENS = 8


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    upstream_name: str
    upstream: UpstreamConfig
    upstream_model: str
    price: Price
    encoding: tiktoken.Encoding
    max_output_tokens: int  # reserved when the request names no max: the model's cap
    output_cap: int | None  # the model's own limit, if configured
    context_window: int | None  # reserved as the prompt when the upstream holds part of it

    def reserved_output_tokens(self, request: ClientRequest) -> int:
        """Worst-case output for the reservation: the asked max (capped), times n."""
        if request.endpoint == "embeddings":
            return 0
        asked = request.max_tokens or self.max_output_tokens
        if self.output_cap:
            asked = min(asked, self.output_cap)
        return asked * request.choices

    def prompt_tokens(self, request: ClientRequest) -> int:
        """The prompt as counted here: what an estimated charge uses."""
        return prompts.estimate_prompt_tokens(request.endpoint, request.body, self.encoding)

    def reserved_prompt_tokens(self, request: ClientRequest, counted: int) -> int:
        """Worst case for the reservation. Upstreams count a few tokens we cannot see
        (chat templates, tool plumbing): 5% + 8 covers them. A prompt partly stored
        upstream is reserved at the context window when one is configured."""
        stored_upstream = request.body.get("previous_response_id") or request.body.get("conversation")
        if stored_upstream and self.context_window:
            return max(counted, self.context_window)
        return counted + -(-counted // 20) + PROMPT_MARGIN_TOKENS


class Catalog:
    def __init__(self, config: Config) -> None:
        self.routes: dict[str, Route] = {}
        for name, model in config.models.items():
            default_max = config.billing.default_max_output_tokens
            cap = model.max_output_tokens  # without a max, the upstream may write this much
            self.routes[name] = Route(
                model=name,
                upstream_name=model.upstream,
                upstream=config.upstreams[model.upstream],
                upstream_model=config.upstream_model(name),
                price=Price.from_config(
                    model.price.input, model.price.cached_input, model.price.output, config.markup_for(name)
                ),
                encoding=tokens.encoding_for_model(model.upstream_model or name, model.encoding),
                max_output_tokens=cap or default_max,
                output_cap=cap,
                context_window=model.max_input_tokens,
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
