"""One typed config tree for every stage: the sections, :class:`RunConfig` and :func:`load_config`.

Precedence, written down once: dataclass defaults < YAML file < CLI ``--set a.b=v`` < Tune sample.

The package, by module (each imports only those listed before it, and none imports this face):

- ``yaml_reader``: strict YAML reading (text stays text, ``1e-4`` is a number, a repeated key is an error).
- ``build``: strict typed build of dataclasses from YAML or ``--set`` values; ``parse_overrides``, ``set_dotted``.
- ``tree``: the sections (one frozen dataclass per concern, each field documented), :class:`RunConfig` and
  :func:`flatten`.
- ``metrics``: metric names and their better direction (``metric_mode``, ``VAL_METRICS``, ``LOSS_METRICS``,
  ``EVAL_METRICS``), and the metrics a downstream task may be scored by (``TASK_METRICS``).
- ``tasks``: what each ``evaluate.tasks`` entry names (``parse``, ``parse_all``, :class:`~pipeline.config.tasks.TaskSpec`).
- ``sweep_checks``: each ``sweep.space`` entry's checks, ``probe_values``, ``probe_samples``,
  ``SWEEPABLE_SECTIONS``, ``MAX_SWEEP_COMBINATIONS``.
- ``checks``: semantic checks, ``validate()`` (one ``ValueError`` listing every problem), ``problems()``,
  ``sweep_problems()``, ``sweep_stage_problems()`` (what only a run of the sweep stage meets).
- ``load``: :func:`load_config` (a YAML file and ``--set`` overrides to a validated RunConfig) and
  ``resolve_paths``.

What needs files or a model (the teacher's vocabulary, a writable run folder) is checked by pipeline/preflight.py.
The section ``eval`` (:class:`ValidationSection`) is the held-out validation during training; ``evaluate``
(:class:`EvaluateSection`) is the downstream evaluate stage.
"""

# No module of the package takes a name defined here: each imports the submodules it needs (tree, build, …), so
# these imports never meet a half-initialised package, whatever their order; load imports the rest itself.
from pipeline.config.load import load_config
from pipeline.config.tree import (
    CheckpointSection,
    ComputeSection,
    DataSection,
    DeepSpeedSection,
    FAMILY_NAMES,
    EvaluateSection,
    ExportSection,
    FaultsSection,
    LossSection,
    MaskingSection,
    OptimSection,
    RunConfig,
    RunSection,
    ScalingSection,
    StudentSection,
    SweepSection,
    TaskDistillSection,
    TeacherSection,
    TrackingSection,
    ValidationSection,
    flatten,
)

__all__ = [
    "CheckpointSection", "ComputeSection", "DataSection", "DeepSpeedSection", "EvaluateSection", "ExportSection", "FAMILY_NAMES",
    "FaultsSection",
    "LossSection", "MaskingSection", "OptimSection", "RunConfig", "RunSection", "ScalingSection", "StudentSection",
    "SweepSection", "TaskDistillSection", "TeacherSection", "TrackingSection", "ValidationSection", "flatten", "load_config",
]
