"""meshlet.proxy.routing: route tables, request matchers, regex engines, header mutation."""

from meshlet.proxy.routing.headers import apply_header_mutation, request_mutations, response_mutations
from meshlet.proxy.routing.regex import RegexEngine, regex_engine
from meshlet.proxy.routing.rewrite import redirect_location, rewrite_path
from meshlet.proxy.routing.table import RouteTable

__all__ = [
    "RegexEngine",
    "RouteTable",
    "apply_header_mutation",
    "redirect_location",
    "regex_engine",
    "request_mutations",
    "response_mutations",
    "rewrite_path",
]
