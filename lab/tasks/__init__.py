"""Tasks: each owns its vocabulary, encoding, data split and readout position.

Importing this package registers the built-in tasks; `make_task(config)` builds one by name.
"""

from lab.tasks.base import TASKS, Split, Task, make_task, register_task, task_class
from lab.tasks.modular import OPERATORS, ModularConfig, ModularTask
from lab.tasks.a_and_b import AAndBConfig, AAndBTask

__all__ = [
    "TASKS", "Split", "Task", "make_task", "register_task", "task_class",
    "OPERATORS", "ModularConfig", "ModularTask", "AAndBConfig", "AAndBTask",
]
