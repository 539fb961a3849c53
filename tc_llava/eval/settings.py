"""The eval app's settings, checked and completed before anything loads.

Every mistake is one line naming the setting (a ``???`` left unset, a value of the wrong type,
an unknown protocol, a checkpoint that is not there), raised before the model's minutes-long
load. Frame count, frame sampling and dtype left null are taken from what the export records
of its training (:func:`from_export`), and ``results.json`` says where each value came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from tc_llava.model.build import check_model_settings
from tc_llava.model.settings import BUDGET_KEY, checkpoint_dtype, read_frame_sampling
from tc_llava.runtime import check_numerics

DEFAULT_FRAMES = 16          # a checkpoint that records no frame count (a llava-hf download, the tiny model)
DEFAULT_SAMPLING = "middle"
# A training draw (one random frame per segment) is evaluated at its deterministic centre, the segment middle.
EVAL_SAMPLING = {"random": "middle", "middle": "middle", "uniform": "uniform"}
JUDGING_STAGES = ("score", "calibrate")  # benchmark.stage values that judge saved predictions: no model
RESOLVED_KEY = "resolved"    # benchmark.resolved: {setting: {"value", "source"}}, recorded in results.json


class EvalSettingsError(ValueError):
    """An eval setting that cannot work, found before anything loads."""


def one_line(e: OmegaConfBaseException) -> str:
    """An OmegaConf error (multi-line, with the object type) as one line naming the key."""
    key = getattr(e, "full_key", None)
    message = str(getattr(e, "msg", None) or e).splitlines()[0]
    return f"{key}: {message}" if key else message


def check_eval_config(cfg: DictConfig, protocols: Iterable[str]) -> None:
    """The settings every benchmark shares: no ``???`` left in ``benchmark``, a known protocol, the seed, and the
    model unless a judging stage needs none."""
    missing = sorted(OmegaConf.missing_keys(cfg.benchmark))
    if missing:
        raise EvalSettingsError(f"{missing[0]} is not set (???): benchmark={cfg.benchmark.name} needs "
                                f"{missing[0]}=... (see tc_llava/configs/benchmark/)")
    if cfg.benchmark.protocol not in protocols:
        raise EvalSettingsError(f"benchmark.protocol={cfg.benchmark.protocol!r}: expected one of {sorted(protocols)}")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvalSettingsError(f"seed={seed!r}: expected an integer")
    try:
        check_numerics(cfg.get("threads"), cfg.get("deterministic", False))
    except ValueError as e:
        raise EvalSettingsError(str(e)) from None
    if cfg.benchmark.get("stage") not in JUDGING_STAGES:
        try:
            check_model_settings(cfg.model)
        except ValueError as e:
            raise EvalSettingsError(str(e)) from None
    for key in ("num_frames", "sampling"):
        if key not in cfg.benchmark:
            raise EvalSettingsError(f"benchmark.{key} is missing from benchmark={cfg.benchmark.name}")
    sampling = cfg.benchmark.sampling
    if sampling is not None and sampling not in set(EVAL_SAMPLING.values()):
        raise EvalSettingsError(f"benchmark.sampling={sampling!r}: expected null (the export's) or one of "
                                f"{sorted(set(EVAL_SAMPLING.values()))}")


def _command_line_keys() -> set[str]:
    """The keys set on the command line (``benchmark.num_frames=8`` -> ``benchmark.num_frames``)."""
    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task if "=" in o}


def _source(key: str, given: set[str]) -> str:
    return "override" if key in given else "config"


def from_export(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Fill ``benchmark.num_frames``, ``benchmark.sampling`` and ``model.dtype`` left null from the export.

    An export records the frames it was trained on (``tc_llava_frames``) and is saved in its
    training dtype. A value given on the command line is an ``override``, one set by a config
    (a benchmark whose protocol fixes its sampling, the tiny model's float32) is ``config``, one
    taken from the checkpoint ``export``, and ``default`` where the checkpoint records nothing.
    Returns ``{setting: {"value", "source"}}``, also stored as ``benchmark.resolved``.
    """
    checkpoint = cfg.model.get("checkpoint")
    config: dict[str, Any] = {}
    recorded: dict[str, Any] = {}
    config_file = Path(checkpoint or "") / "config.json"
    if checkpoint and config_file.is_file():  # checked unless a judging stage loads no model
        try:
            config = json.loads(config_file.read_text())
            recorded = read_frame_sampling(config, config_file) or {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalSettingsError(f"{config_file}: not a JSON checkpoint config ({e})") from None
        except ValueError as e:
            raise EvalSettingsError(str(e)) from None
    given = _command_line_keys()
    bench, chosen = cfg.benchmark, {}
    if bench.num_frames is not None:
        chosen["num_frames"] = {"value": bench.num_frames, "source": _source("benchmark.num_frames", given)}
    elif "num_frames" in recorded:
        chosen["num_frames"] = {"value": recorded["num_frames"], "source": "export"}
    else:
        chosen["num_frames"] = {"value": DEFAULT_FRAMES, "source": "default"}
    if bench.sampling is not None:
        chosen["sampling"] = {"value": bench.sampling, "source": _source("benchmark.sampling", given)}
    elif recorded.get("sampling") in EVAL_SAMPLING:
        chosen["sampling"] = {"value": EVAL_SAMPLING[recorded["sampling"]], "source": "export",
                              "trained_with": recorded["sampling"]}
    else:
        chosen["sampling"] = {"value": DEFAULT_SAMPLING, "source": "default"}
    budget = cfg.model.get("frame_budget")
    if budget is not None or BUDGET_KEY in config:  # a Qwen-VL model: its budget chooses each video's frames
        chosen["frame_budget"] = ({"value": OmegaConf.to_container(budget), "source": _source("model.frame_budget", given)}
                                  if budget is not None else {"value": config[BUDGET_KEY], "source": "export"})
        for key in ("num_frames", "sampling"):
            chosen[key]["used"] = False
    if cfg.model.get("dtype") is not None:
        chosen["dtype"] = {"value": cfg.model.dtype, "source": _source("model.dtype", given)}
    else:
        value, source = checkpoint_dtype(config)
        chosen["dtype"] = {"value": value, "source": source}
    with open_dict(cfg):
        bench.num_frames = chosen["num_frames"]["value"]
        bench.sampling = chosen["sampling"]["value"]
        cfg.model.dtype = chosen["dtype"]["value"]
        bench[RESOLVED_KEY] = chosen
    return chosen
