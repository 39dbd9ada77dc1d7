"""SAE Lab core: configuration, SAE architectures, data, training, GPUs, store and launcher.

Nothing here imports Streamlit; the pages are thin views over these functions.
"""

from .config import ConfigError, TrainConfig

__all__ = ["TrainConfig", "ConfigError"]
