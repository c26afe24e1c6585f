"""msif_core: multi-stage influence functions with EK-FAC, in plain PyTorch + transformers.

Data flows corpus → tokens (``data``) → gradients (``gradients``) → factors (``ekfac``) → query iHVPs
(``query``) → scores (``scoring``); ``models`` loads checkpoints and finds the analysed blocks,
``baselines`` and ``metrics`` hold the comparison methods and evaluations, ``api`` the one-call entry.
"""

from .api import AttributionSettings, attribute
from .data import Encoded, encode_documents, encode_pairs
from .ekfac import Factors, FitSettings, fit_ekfac
from .models import Block, ModuleSpec, discover_blocks, discover_modules, load_model
from .query import MeasurementGradients, QueryIHVPs, measurement_gradients, query_ihvps
from .scoring import ScoreResult, score_documents

__all__ = [
    "AttributionSettings", "Block", "Encoded", "Factors", "FitSettings", "MeasurementGradients", "ModuleSpec",
    "QueryIHVPs",
    "ScoreResult", "attribute", "discover_blocks", "discover_modules", "encode_documents", "encode_pairs",
    "fit_ekfac", "load_model", "measurement_gradients", "query_ihvps", "score_documents",
]
