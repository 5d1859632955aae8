"""One `Task` per problem type (`model.task`): head, loss, labels, metrics, thresholds,
serving outputs. See `kcls.tasks.base` for the interface.

    multiclass   SingleLabelTask (kcls.tasks.single_label)
    multilabel   MultiLabelTask  (kcls.tasks.multi_label)

Example:

>>> get_task("multilabel").training_score
'pr_auc'
"""

from __future__ import annotations

from typing import Any

from kcls.config import Task as TaskName
from kcls.config import require_choice
from kcls.tasks.base import CalibrationPlan, Evaluation, LossWeights, Objective, Task
from kcls.tasks.multi_label import MultiLabelTask
from kcls.tasks.rejection import RejectionRule
from kcls.tasks.single_label import SingleLabelTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (SingleLabelTask, MultiLabelTask)}


def get_task(name: str) -> Task:
    """The unfitted task of `model.task=name`.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    require_choice(name, TaskName, "model.task")
    return TASKS[name]()


def task_from_metadata(name: str, metadata: dict[str, Any],
                       tuned_on: str = "the model's validation split (stored in the model)"
                       ) -> Task:
    """The fitted task an export or a run recorded (`Task.metadata`: `temperature`,
    `thresholds`, `rejection`), for the problem type `name` of its recipe."""
    task = get_task(name)
    if isinstance(task, MultiLabelTask) and metadata.get("thresholds") is not None:
        return MultiLabelTask(tuple(float(value) for value in metadata["thresholds"]), tuned_on)
    if isinstance(task, SingleLabelTask):
        temperature = metadata.get("temperature")
        return SingleLabelTask(None if temperature is None else float(temperature),
                               rejection=RejectionRule.from_metadata(metadata.get("rejection")))
    return task


__all__ = ["TASKS", "CalibrationPlan", "Evaluation", "LossWeights", "MultiLabelTask",
           "Objective", "RejectionRule", "SingleLabelTask", "Task", "get_task",
           "task_from_metadata"]
