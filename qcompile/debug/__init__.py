from .compare import CompareReport, NodeError, compare
from .inspect import inspect
from .report import Report, report
from .sensitivity import (
    Plan, SensitivityReport, auto_recipe, average_bits, plan_precision, plan_to_recipe, sensitivity, weight_bits,
)
