"""The Hydra configs, shipped inside the package so that an installed ``tc-llava-train`` finds them.

``${config_dir:}`` in a config is this folder's absolute path (files that travel with the
configs, such as the DeepSpeed JSON beside each trainer preset).
"""

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).parent

OmegaConf.register_new_resolver("config_dir", lambda: str(CONFIG_DIR), replace=True)
