"""Video-text manifests: CSV or JSONL rows of a media path and a caption.

Every row comes back as a dict with the canonical keys

    path      absolute path (relative paths resolve against the manifest's folder or `root`;
              URLs, anything containing "://", are kept as they are)
    caption   str
    is_image  True when the path ends in an image extension (a 1-frame video)
    fps, frames, width, height   numbers from optional columns, None when absent or empty

plus every other column of the file, untouched (e.g. Shapes World's `record`).

Public datasets name their columns differently; `columns` maps canonical names to the file's own:

    load_manifest("openvid.csv", columns={"path": "video", "caption": "caption"})
    load_manifest("webvid.csv", columns=COLUMN_PRESETS["webvid"])
"""

from __future__ import annotations

import csv
import json
import os

REQUIRED_COLUMNS = ("path", "caption")
# Optional numeric columns and the type each is parsed to.
OPTIONAL_COLUMNS = {"fps": float, "frames": int, "width": int, "height": int}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

# Column names of common public datasets, as `columns=` mappings (canonical name -> file column).
COLUMN_PRESETS = {
    "webvid": {"path": "contentUrl", "caption": "name"},
    "openvid": {"path": "video", "caption": "caption"},
    "panda70m": {"path": "url", "caption": "caption"},
}


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _read_raw_rows(path: str) -> list[dict]:
    """Rows of a CSV or JSONL file as dicts, in file order."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in MANIFEST_FORMATS:
        raise ValueError(f"manifest {path!r} has extension {ext!r}; expected one of {sorted(MANIFEST_FORMATS)}")
    if not os.path.isfile(path):
        raise ValueError(f"manifest {path!r} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        if MANIFEST_FORMATS[ext] == "csv":
            return list(csv.DictReader(f))
        rows = []
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest {path!r} line {line_number} is not valid JSON: {e}") from e
            if not isinstance(row, dict):
                raise ValueError(f"manifest {path!r} line {line_number} is a {type(row).__name__}, expected an object")
            rows.append(row)
        return rows


def _parse_number(value, kind, column: str, row_number: int, path: str):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"manifest {path!r} row {row_number}: column {column!r} value {value!r} is not a number") from e
    if kind is int:
        if number != int(number):
            raise ValueError(f"manifest {path!r} row {row_number}: column {column!r} value {value!r} is not an integer")
        return int(number)
    return number


def load_manifest(path: str, columns: dict | None = None, root: str | None = None) -> list[dict]:
    """Read a CSV or JSONL manifest into canonical rows (see the module docstring).

    `columns` maps canonical names (path, caption, fps, frames, width, height) to the file's column
    names; unmapped canonical names are looked up under their own name. `root` replaces the manifest's
    folder as the base of relative paths.
    """
    columns = dict(columns or {})
    canonical = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    unknown = sorted(set(columns) - canonical)
    if unknown:
        raise ValueError(f"column mapping keys {unknown} are not canonical names; expected a subset of {sorted(canonical)}")
    base = os.path.abspath(root if root is not None else os.path.dirname(os.path.abspath(path)))

    raw_rows = _read_raw_rows(path)
    if raw_rows:
        present = set().union(*(row.keys() for row in raw_rows))
        for name in REQUIRED_COLUMNS:
            source = columns.get(name, name)
            if source not in present:
                raise ValueError(
                    f"manifest {path!r} has no column {source!r} (for {name!r}); its columns are {sorted(present)}"
                )
        for name in OPTIONAL_COLUMNS:
            if name in columns and columns[name] not in present:
                raise ValueError(f"manifest {path!r} has no column {columns[name]!r} (mapped to {name!r})")

    mapped_sources = set(columns.values())
    rows = []
    for row_number, raw in enumerate(raw_rows, start=1):
        # 1. rename the mapped columns, keep the rest as they are
        row = {key: value for key, value in raw.items() if key not in mapped_sources}
        for name, source in columns.items():
            row[name] = raw.get(source)

        # 2. required columns
        media, caption = row.get("path"), row.get("caption")
        if media is None or not str(media).strip():
            raise ValueError(f"manifest {path!r} row {row_number}: column {columns.get('path', 'path')!r} is empty")
        if caption is None:
            raise ValueError(f"manifest {path!r} row {row_number}: column {columns.get('caption', 'caption')!r} is null")
        media = str(media).strip()
        if "://" not in media and not os.path.isabs(media):
            media = os.path.normpath(os.path.join(base, media))
        row["path"] = media
        row["caption"] = str(caption)
        row["is_image"] = is_image_path(media)

        # 3. optional numeric columns
        for name, kind in OPTIONAL_COLUMNS.items():
            row[name] = _parse_number(row.get(name), kind, columns.get(name, name), row_number, path)
        rows.append(row)
    return rows
