"""task image_classification: images -> one class each; KD on the class distribution of the very view the
student sees (stored per augmented view), mixed with cross-entropy on the labels.

    spec.py       its workflow sections (data: image/label columns, folder trees, size, resize, normalize;
                  soft_targets: views, augment)
    data.py       Parquet image columns, folder trees, sklearn's digits as PNGs; decoded with Pillow (ImageTable)
    views.py      a view's six stored integers, drawn once; `apply_views`, the one torch path that makes a view
    models.py     cnn, CIFAR-style resnet, user factories; ImageModel (0-255 pixels in, normalization inside)
    teachers.py   teachers from outside kdflow: registered image models, state_dict checkpoints
    targets.py    logits per view as stored; a worker's rows replaying one stored view per image per batch
    serving.py    safetensors + a JSON recipe; the pyfunc (pyfunc.py) takes image bytes

The objective, metrics and report are classification's (this kind extends it): a view's targets are class
logits like any row's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tasks.errors import UserError
from tasks.kinds.base import Share
from tasks.kinds.classification import Classification
from tasks.kinds.image_classification.spec import SPEC

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from tasks.dataset import Dataset
    from tasks.sections import DataSpec, ModelSpec, TeacherSpec
    from tasks.storage import Storage
    from tasks.store.shards import TargetBatch


class ImageClassification(Classification):
    """Pixels [N, C*H*W] (+ V stored views per training row) -> logits [N, C] (per view: [N, V, C] stored)."""

    name = "image_classification"
    spec = SPEC

    def check_workflow(self, workflow: Any) -> None:
        super().check_workflow(workflow)  # a classifier's formats: logits or topk, never sampled
        searched = [k for k in (workflow.search.space if workflow.search else {}) if k.startswith("soft_targets.")]
        if searched:
            raise ValueError(f"search.space.{searched[0]}: a search distils from one store entry; views and augment "
                             "are not search keys yet (the student's depth and width, temperature and alpha are)")
        st = workflow.soft_targets
        if st.mode == "online" and st.views:
            raise ValueError("soft_targets.views: stored views are for mode: stored; an online teacher labels a fresh "
                             "view of each image every time the student sees it (set views: 0)")

    def unknown_param(self, model: str, param: str) -> str | None:
        from tasks.kinds.image_classification.models import unknown_param

        return unknown_param(model, param)

    # ------------------------------------------------ data

    def load_workflow_data(self, workflow: Any, *, storage: Storage | None) -> Dataset:
        from tasks.kinds.image_classification.data import load_images

        st = workflow.soft_targets
        views = st.views if st.mode == "stored" else 0
        return load_images(workflow.data, seed=workflow.seed, views=views, augment=st.augment.model_dump(),
                           augment_spec=st.augment, storage=storage)

    def load_data(self, data: DataSpec, *, seed: int, storage: Storage | None) -> Dataset:
        from tasks.kinds.image_classification.data import load_images

        return load_images(data, seed=seed, storage=storage)

    def describe(self, data: Any) -> str:
        views = f", {data.views} stored views per training image" if data.views else ""
        return f"{data.channels}x{data.height}x{data.width} images, {data.num_classes} classes{views}"

    def manifest_meta(self, data: Any) -> dict[str, Any]:
        return {"num_classes": data.num_classes, "num_features": data.num_features, "channels": data.channels,
                "height": data.height, "width": data.width, "mean": data.mean, "std": data.std,
                "views": data.views, "augment": data.augment, "transfer_rows": 0}

    def dims(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        return {"num_classes": int(meta["num_classes"]), "channels": int(meta["channels"]),
                "height": int(meta["height"]), "width": int(meta["width"]), "mean": [float(v) for v in meta["mean"]],
                "std": [float(v) for v in meta["std"]], "views": int(meta.get("views", 0)),
                "augment": dict(meta.get("augment") or {})}

    # ------------------------------------------------ models

    def check_name(self, name: str) -> None:
        from tasks.kinds.image_classification.models import resolve_factory

        resolve_factory(name)

    def build_model(self, name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> nn.Module:
        from tasks.kinds.image_classification.models import build_model

        return build_model(name, params, dims)

    def external_teacher(self, teacher: TeacherSpec) -> bool:
        t: Any = teacher
        return bool(t.checkpoint) or t.model.startswith("models:/")

    def load_teacher(self, teacher: TeacherSpec, data: Dataset) -> nn.Module:
        from tasks.kinds.image_classification.teachers import load_teacher

        return load_teacher(teacher, self.dims(self.manifest_meta(data)))

    # ------------------------------------------------ targets

    def teacher_in_loop(self, workflow: Any) -> bool:
        return bool(workflow.soft_targets.mode == "online")

    def teacher_recipe(self, teacher: TeacherSpec, model: nn.Module) -> tuple[str, dict[str, Any]]:
        recipe = getattr(model, "kdflow_recipe", None)  # a registered model: its own factory and params
        return recipe if recipe is not None else (teacher.model, dict(teacher.params))

    def with_teacher(self, share: Share, teachers: list[nn.Module], rule: str, dims: Mapping[str, Any]) -> Share:
        from tasks.kinds.image_classification.targets import OnlineShare

        return OnlineShare.around(share, teachers, rule, dims)

    def teacher_outputs(self, teachers: list[nn.Module], x: np.ndarray, rule: str) -> torch.Tensor:
        from tasks.kinds.image_classification.targets import teacher_outputs

        return teacher_outputs(teachers, x, rule)

    def place(self, rows: TargetBatch, dims: Mapping[str, Any], device: torch.device) -> Share:
        from tasks.kinds.image_classification.targets import place_share

        return place_share(rows, dims, device)

    def targets_summary(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        from tasks.kinds.image_classification.report import targets_summary

        return targets_summary(manifest)

    # ------------------------------------------------ serving

    def log_model(self, model: nn.Module, student: ModelSpec, data: Any, manifest: Mapping[str, Any],
                  pip_requirements: list[str]) -> str:
        from tasks.kinds.image_classification.report import example_images
        from tasks.kinds.image_classification.serving import log_student

        recipe = {"factory": student.model, "params": student.params, "dims": self.dims(manifest),
                  "classes": data.classes, "resize": data.size_policy.get("resize", "stretch")}
        return log_student(model, recipe, example_images(data, 2), pip_requirements)

    def lineage(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        return {"kdflow.views": str(manifest.get("views", 0))}

    def load_registered(self, uri: str, manifest: Mapping[str, Any]) -> nn.Module | None:
        """The registered image model (it takes 0-255 pixel rows, as stored) when its image shape is this
        entry's; None otherwise."""
        from tasks.kinds.image_classification.serving import load_registered

        try:
            module, recipe = load_registered(uri)
        except Exception as exc:  # noqa: BLE001 - the registry or the model's code: the user's to fix
            raise UserError(f"cannot load {uri}: {str(exc).splitlines()[0]}") from None
        d = recipe["dims"]
        same = all(int(d[k]) == int(manifest[k]) for k in ("channels", "height", "width", "num_classes"))
        return module if same else None
