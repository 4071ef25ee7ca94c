"""ppsd-ray: pipeline-parallel self-speculative decoding on Ray actors."""
from .config import GenerationConfig, Mode, PipelineConfig
from .schedule import Decoder, RequestStats

__all__ = ["Decoder", "GenerationConfig", "Mode", "PipelineConfig", "RequestStats"]
