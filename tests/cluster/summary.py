"""The figures the scenarios measure, and the one line ``make test-cluster`` ends with (README quotes it)."""

from __future__ import annotations

from typing import Any

FIGURES: dict[str, Any] = {}


def _n(count: int, what: str) -> str:
    return f"{count} {what}" if count == 1 else f"{count} {what}s"


def summary_line(figures: dict[str, Any] = FIGURES) -> str:
    """One line with every figure measured so far."""
    parts = [
        f"cluster test: RabbitMQ {figures.get('version', '?')}, "
        f"{figures.get('nodes', '?')} nodes up in {figures.get('cluster_seconds', 0):.0f} s"
    ]
    qq = figures.get("quorum")
    if qq:
        parts.append(
            f"quorum queue: {qq['published']} published, {qq['unique']} processed at least once, "
            f"{_n(qq['duplicates'], 'duplicate')}, leader killed at {qq['killed_at']} processed, "
            f"consumption resumed within {qq['resumed_after']:.2f} s, {qq['ready']}/{qq['daemons']} daemons ready, "
            f"at most {_n(qq['max_consumers'], 'consumer')} per daemon"
        )
    sac = figures.get("single_active")
    if sac:
        parts.append(
            f"single active consumer: {sac['published']} published, active daemon killed at {sac['killed_at']}, "
            f"taken over within {sac['takeover_after']:.2f} s, order kept ({sac['in_order']} in order), "
            f"{_n(sac['duplicates'], 'duplicate')}"
        )
    parts.append(f"{figures.get('total_seconds', 0):.0f} s in all")
    return "; ".join(parts)
