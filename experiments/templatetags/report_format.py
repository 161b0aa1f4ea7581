"""Number formats for the report pages (no locale surprises, '–' for no value)."""

from __future__ import annotations

import math

from django import template

from experiments.quality import ERROR_CATEGORY_LABELS, FINISH_REASON_LABELS

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
    if value < 1e-300:
        return "< 1e-300"  # overwhelming evidence underflows to 0 in floating point
    return f"{value:.2e}" if value < 0.001 else f"{value:.4f}"


@register.filter
def lookup(mapping: dict, key):
    return mapping.get(key, "")


def _finite_or_open(value, signed: bool, unit: str) -> str:
    if value is None:
        return NO_VALUE
    if math.isinf(value):
        return "+∞" if value > 0 else "−∞"
    sign = "+" if signed else ""
    if unit == "rate":
        return f"{value * 100:{sign}.2f} {'pp' if signed else '%'}".replace(" %", "%")
    if unit == "ms":
        return f"{value:{sign},.0f} ms"
    return f"{value:{sign},.1f} {unit}"


@register.filter
def metric_value(value, unit: str) -> str:
    """A checkpoint's figure of a comparison metric: a share in %, else in its unit."""
    return _finite_or_open(value, False, unit)


@register.filter
def metric_difference(value, unit: str) -> str:
    """candidate − control of a comparison metric: a share in pp, else in its unit."""
    return _finite_or_open(value, True, unit)


@register.filter
def confidence(alpha) -> str:
    """The confidence level of an interval drawn at ``alpha``: 0.0125 -> '98.75%'."""
    if alpha is None:
        return NO_VALUE
    return f"{(1 - alpha) * 100:.4g}%"


@register.filter
def error_category(value) -> str:
    """An error category as the Stats page names it ("rate limit")."""
    return ERROR_CATEGORY_LABELS.get(value, str(value))


@register.filter
def finish_reason(value) -> str:
    """A normalised finish reason as the Stats page names it ("tool calls")."""
    return FINISH_REASON_LABELS.get(value, str(value))
