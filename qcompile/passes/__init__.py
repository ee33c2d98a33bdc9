"""Graph passes, one per file, and the manager that runs them."""
from .annotate import Annotate
from .base import Pass, PassManager, PassRecord, PassResult, op_counts, verify_graph
from .convert_qdq import ConvertToQDQ
from .fold_bn import FoldBatchNorm
from .insert_observers import InsertObservers
from .share_qparams import ShareQParams
