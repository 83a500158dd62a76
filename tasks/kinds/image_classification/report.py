"""Image classification's additions to classification's report: what the stored views cost, and example
images for the registered model's signature."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from tasks.kinds.image_classification.views import PARAMS


def targets_summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Views per training image and what one stored view holds before compression: its teacher targets (top-k
    values in the stored dtype, int32 class ids, the float32 leftover log-mass; or dense logits) and its six
    one-byte parameters (views.py)."""
    from tasks.store.formats import TORCH_DTYPES

    views = int(manifest.get("views", 0))
    value = TORCH_DTYPES[manifest["dtype"]].itemsize
    if manifest["format"] == "topk":
        targets = int(manifest["top_k"]) * (value + 4) + 4
    else:
        targets = int(manifest["num_classes"]) * value
    return {"views": views, "bytes_per_view": targets + (PARAMS if views else 0)}


def example_images(data: Any, n: int) -> list[bytes]:
    """The first `n` test images as PNG bytes (the registered model's input example)."""
    import numpy as np
    from PIL import Image

    out = []
    for row in data.x["test"][:n]:
        arr = np.asarray(row[:data.num_features], np.uint8).reshape(data.channels, data.height, data.width)
        img = Image.fromarray(arr[0], mode="L") if data.channels == 1 else Image.fromarray(arr.transpose(1, 2, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
