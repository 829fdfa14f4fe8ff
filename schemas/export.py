"""Write the JSON copies of the output schemas: `python -m schemas.export [DIR]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas import SCHEMAS, schema_to_json


def render(name: str) -> str:
    return json.dumps(schema_to_json(name), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else Path(__file__).parent
    for name in SCHEMAS:
        (target / f"{name}.json").write_text(render(name))
        print(f"wrote {target / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
