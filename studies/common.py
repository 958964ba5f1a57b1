"""What the table scripts of studies/ share: a committed run's rows, filtered."""
import json
from pathlib import Path

import hybrid as H


def image_names(spec: str | None) -> set[str] | None:
    """The CIFAR-10 test images an --images spec such as 0-4 names; None (all) without one."""
    return None if spec is None else {f"cifar10-test:{i}" for i in H.parse_image_indices([spec])}


def read_rows(path: str, images: set[str] | None = None, models: list[str] | None = None) -> list[dict]:
    """The rows of a run's results.json (report.py's), only `images` and `models` where given."""
    results = json.loads(Path(path).read_text())
    return [r for r in H.rows_in(results)
            if (images is None or r["image"] in images) and (models is None or r["model"] in models)]
