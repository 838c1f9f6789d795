"""twist: TWIST self-supervised learning (Wang et al., arXiv 2110.07402) as a library and CLI."""

__version__ = "0.1.0"

from twist.config import TwistConfig  # noqa: E402
from twist.presets import get_preset, PRESETS  # noqa: E402
from twist.loss import TwistLoss, TwistTerms  # noqa: E402

__all__ = ["TwistConfig", "get_preset", "PRESETS", "TwistLoss", "TwistTerms", "__version__"]
