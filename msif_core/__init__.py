"""msif_core: multi-stage influence functions with EK-FAC, in plain PyTorch + transformers.

Data flows corpus → tokens (``data``) → gradients (``gradients``) → factors (``ekfac``) → query iHVPs
(``query``) → scores (``scoring``) → long tables (``tables``). ``checkpoints`` loads and checks
checkpoints, ``models`` finds the analysed blocks, ``stages`` pairs the two checkpoints, ``settings``
defines every setting once, ``methods`` names the scoring methods and turns a name into scores,
``baselines`` and ``metrics`` hold the comparison methods and evaluations, ``exact`` the brute-force
references, ``api`` the one-call entry.
"""

from .api import AttributionSettings, attribute
from .checkpoints import checkpoint_problems, load_model
from .data import Encoded, encode_documents, encode_pairs
from .ekfac import Factors, FitSettings, fit_ekfac
from .methods import ALL_METHODS, GRADIENT_METHODS, METHODS, Method
from .models import Block, ModuleSpec, discover_blocks, discover_modules
from .query import MeasurementGradients, QueryIHVPs, measurement_gradients, query_ihvps
from .scoring import ScoreResult, score_documents
from .settings import FactorSettings, ScoreSettings

__all__ = [
    "ALL_METHODS", "AttributionSettings", "Block", "Encoded", "FactorSettings", "Factors", "FitSettings",
    "GRADIENT_METHODS", "METHODS", "MeasurementGradients", "Method", "ModuleSpec", "QueryIHVPs", "ScoreResult",
    "ScoreSettings", "attribute", "checkpoint_problems", "discover_blocks", "discover_modules", "encode_documents",
    "encode_pairs", "fit_ekfac", "load_model", "measurement_gradients", "query_ihvps", "score_documents",
]
