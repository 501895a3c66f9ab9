"""How large a webhook a large order makes: a body for ``MAX_BODY_BYTES``.

Builds one order item with every property the published schema gives it
(``OrderItemCalculated`` of ``tests/fixtures/voucherify-openapi/OpenAPIWebhooks.json``:
strings of 24 characters, three metadata keys, product and SKU objects filled in), puts N
of them in the published ``redemption.succeeded`` example (its order, and its
redemption's order snapshot, as Voucherify sends both) and prints the compact body's size.

    .venv/bin/python -m bench.order_size --items 500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests/fixtures/voucherify-openapi/OpenAPIWebhooks.json"
EXAMPLE = ROOT / "tests/fixtures/voucherify/redemption.succeeded.example.json"


def instance(schema: dict[str, Any], spec: dict[str, Any], depth: int = 0) -> Any:
    """A value with every property filled (refs followed, allOf merged, 4 levels at most)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return instance(spec["components"]["schemas"][name], spec, depth)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = instance(part, spec, depth)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return instance(schema[key][0], spec, depth)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        if depth > 3:
            return {}
        props = schema.get("properties") or {}
        if not props:  # metadata: free-form
            return {f"key_{n}": "x" * 24 for n in range(3)}
        return {k: instance(v, spec, depth + 1) for k, v in props.items()}
    if kind == "array":
        return [instance(schema.get("items", {}), spec, depth + 1)]
    if kind in ("integer", "number"):
        return 123456
    if kind == "boolean":
        return True
    if "enum" in schema:
        return schema["enum"][0]
    return "x" * 24


def body_with(items: int) -> bytes:
    spec = json.loads(SPEC.read_text())
    item = instance(spec["components"]["schemas"]["OrderItemCalculated"], spec)
    data = json.loads(EXAMPLE.read_text())  # the event's data, as published
    document = {"id": "whs_1", "type": "redemption.succeeded", "data": data}
    orders = [data.get("order"), (data.get("redemption") or {}).get("order")]
    for order in orders:
        if isinstance(order, dict):
            order["items"] = [item] * items
    return json.dumps(document, separators=(",", ":")).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    args = parser.parse_args()
    per_item = len(body_with(2)) - len(body_with(1))
    size = len(body_with(args.items))
    print(f"one more item: {per_item} bytes (both order copies)")
    print(f"{args.items} items: {size} bytes ({size / 1024:.0f} KiB, {size / 1048576:.2f} MiB)")


if __name__ == "__main__":
    main()
