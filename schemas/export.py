"""Write the JSON Schema of every event to ``schemas/json`` (``python -m schemas.export``).

``--check`` exits non-zero when the files on disk differ from the models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from schemas.events import EXPORTED_MODELS, SCHEMA_VERSION

JSON_DIR = Path(__file__).parent / "json"


def rendered() -> dict[str, str]:
    """File name -> JSON Schema text, as it must appear on disk."""
    out = {}
    for name, model in EXPORTED_MODELS.items():
        schema = model.model_json_schema(mode="serialization" if name in {"search_result", "error_reply"} else "validation")
        schema["$id"] = f"urn:clip-search:{name}:v{SCHEMA_VERSION}"
        out[f"{name}.v{SCHEMA_VERSION}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if files drift from the models")
    args = parser.parse_args(argv)
    files = rendered()
    if args.check:
        stale = [n for n, text in files.items() if not (JSON_DIR / n).exists() or (JSON_DIR / n).read_text() != text]
        extra = sorted(p.name for p in JSON_DIR.glob("*.json") if p.name not in files)
        if stale or extra:
            print(f"schema files out of date: {stale + extra}; run python -m schemas.export", file=sys.stderr)
            return 1
        return 0
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in files.items():
        (JSON_DIR / name).write_text(text)
    print(f"wrote {len(files)} schema files to {JSON_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
