"""Tasks: each owns its vocabulary, encoding, data split and readout position.

Importing this package registers the built-in tasks; `make_task(config)` builds one by name.
Tasks sit below `lab.config` (which validates the `[task]` table with the task's `Config`) and
never import it.
"""

from lab.tasks.base import IGNORE_INDEX, TASKS, Split, Task, TaskConfig, make_task, register_task, task_class
from lab.tasks.modular import OPERATORS, ModularConfig, ModularTask
from lab.tasks.a_and_b import AAndBConfig, AAndBTask
from lab.tasks.s5 import S5Config, S5ConjConfig, S5ConjTask, S5Task
from lab.tasks.sequences import RepeatedTokensConfig, RepeatedTokensTask, ReverseConfig, ReverseTask
from lab.tasks.text import TextConfig, TextTask

__all__ = [
    "IGNORE_INDEX", "TASKS", "Split", "Task", "TaskConfig", "make_task", "register_task", "task_class",
    "OPERATORS", "ModularConfig", "ModularTask", "AAndBConfig", "AAndBTask",
    "S5Config", "S5ConjConfig", "S5Task", "S5ConjTask",
    "ReverseConfig", "ReverseTask", "RepeatedTokensConfig", "RepeatedTokensTask", "TextConfig", "TextTask",
]
