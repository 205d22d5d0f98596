"""Merge several servers' Prometheus expositions into one, each sample labelled with its server.

Behind Ray Serve's proxy one scrape of `/metrics` reaches one replica; the ingress answers it with
every replica's metrics instead, `replica="<id>"` added to each sample, so dashboards keep summing
over instances and can still tell replicas apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_expositions(texts: Mapping[str, str], label: str = "replica") -> bytes:
    """One exposition holding every family once, with the samples of every source under `label`."""
    merged: dict[str, Metric] = {}
    for source, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            into.samples.extend(s._replace(labels={**s.labels, label: source}) for s in family.samples)
    return generate_latest(_Families(list(merged.values())))  # type: ignore[arg-type]
