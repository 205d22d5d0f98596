"""Generate the configuration and metrics tables of docs/deploy.md from the code.

    python docker/gen_config_table.py            # print the configuration table (Markdown)
    python docker/gen_config_table.py --metrics  # print the metrics table
    python docker/gen_config_table.py --write docs/deploy.md   # refresh both tables in place
    python docker/gen_config_table.py --check docs/deploy.md   # exit 1 if the doc is stale

The configuration table comes from the pydantic-settings classes that `switchboard serve` turns
into flags (`server.settings.Settings.groups()`); the metrics table from `server.metrics.Metrics`. In the doc each
table sits between `<!-- BEGIN <NAME> -->` and `<!-- END <NAME> -->` markers (CONFIG, METRICS).
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENV_PREFIX = "SWITCHBOARD_"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is not None and len(args) == 1:  # Optional[X]
        return _type_name(args[0]) + " (optional)"
    return getattr(annotation, "__name__", str(annotation))


def _default(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def settings_rows() -> list[dict[str, str]]:
    """One row per setting, in the order `switchboard serve --help` lists them."""
    from server.settings import Settings

    rows = []
    for group, cls in Settings.groups().items():
        for name, field in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            if field.annotation is bool:
                flag = f"{flag} / --no-{name.replace('_', '-')}"
            rows.append({"group": group, "name": name, "flag": flag, "env": ENV_PREFIX + name.upper(),
                         "default": _default(field.default), "type": _type_name(field.annotation),
                         "description": field.description or ""})
    return rows


def config_table() -> str:
    lines = ["| group | setting | flag | environment variable | default | type | description |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in settings_rows():
        lines.append(f"| {r['group']} | `{r['name']}` | `{r['flag']}` | `{r['env']}` | {r['default']} | "
                     f"{r['type']} | {_cell(r['description'])} |")
    return "\n".join(lines) + "\n"


SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created"), "summary": ("", "_count", "_sum", "_created")}


def metric_rows() -> list[dict]:
    """name (as queried), type, labels, help, and every sample name it exposes."""
    from prometheus_client.metrics import MetricWrapperBase

    from server.metrics import Metrics

    rows = []
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        base, kind = collector._name, collector._type  # the family name (counters without `_total`)
        samples = [base + s for s in SUFFIXES[kind]]
        rows.append({"name": base + "_total" if kind == "counter" else base, "type": kind,
                     "labels": list(collector._labelnames), "help": collector._documentation,
                     "samples": samples})
    return rows


def metrics_table() -> str:
    lines = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for r in metric_rows():
        labels = ", ".join(f"`{label}`" for label in r["labels"]) or "—"
        lines.append(f"| `{r['name']}` | {r['type']} | {labels} | {_cell(r['help'])} |")
    return "\n".join(lines) + "\n"


TABLES = {"CONFIG": config_table, "METRICS": metrics_table}


def refresh(text: str) -> str:
    """Return `text` with every marked table replaced by a freshly generated one."""
    for marker, build in TABLES.items():
        begin, end = f"<!-- BEGIN {marker} -->", f"<!-- END {marker} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"missing {begin} ... {end} markers")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{build()}{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", action="store_true", help="print the metrics table instead")
    parser.add_argument("--write", type=Path, metavar="DOC", help="refresh the tables in DOC")
    parser.add_argument("--check", type=Path, metavar="DOC", help="exit 1 if DOC's tables are stale")
    args = parser.parse_args(argv)
    if args.write or args.check:
        doc = args.write or args.check
        current = doc.read_text()
        fresh = refresh(current)
        if args.check:
            if fresh != current:
                print(f"{doc} is stale: run python docker/gen_config_table.py --write {doc}", file=sys.stderr)
                return 1
            return 0
        doc.write_text(fresh)
        return 0
    sys.stdout.write(metrics_table() if args.metrics else config_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
