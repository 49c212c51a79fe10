"""Searches over solver schedules run as jitted JAX programs: DC-Solver ratios (``dc``) and USF / S^3 (``s3``)."""
from dpmjax.search.dc import (fit_cpr, load_ratios, model_targets, oracle_targets, predict_cpr,  # noqa: F401
                              save_ratios, schedule_id, search_dc_ratios)
from dpmjax.search.s3 import SpecEvaluator, load_spec, s3_search, save_spec  # noqa: F401
