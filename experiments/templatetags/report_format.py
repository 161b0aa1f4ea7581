"""Number formats for the report pages (no locale surprises, '–' for no value)."""

from __future__ import annotations

from django import template

register = template.Library()

NO_VALUE = "–"


@register.filter
def intcomma_plain(value) -> str:
    return NO_VALUE if value is None else f"{value:,}"


@register.filter
def percent(value) -> str:
    return NO_VALUE if value is None else f"{value * 100:.2f}%"


@register.filter
def signed_pp(value) -> str:
    """A difference of two rates, in percentage points."""
    return NO_VALUE if value is None else f"{value * 100:+.2f} pp"


@register.filter
def ms(value) -> str:
    return NO_VALUE if value is None else f"{value:,.0f} ms"


@register.filter
def signed_ms(value) -> str:
    return NO_VALUE if value is None else f"{value:+,.0f} ms"


@register.filter
def pvalue(value) -> str:
    if value is None:
        return NO_VALUE
    return f"{value:.2e}" if value < 0.001 else f"{value:.4f}"


@register.filter
def lookup(mapping: dict, key):
    return mapping.get(key, "")
