"""Fused distillation operators. Each op: ``<op>(…, impl=None)`` and ``<op>_reference``."""
from ._common import available_impls
from .adm_maps import adm_maps, adm_maps_reference
from .adm_pool import adm_attention_reference, adm_pool, adm_pool_reference, weighted_pool_reference
from .adm_region_pool import adm_region_pool, adm_region_pool_reference
from .cosine_similarity_map import cosine_similarity_map, cosine_similarity_map_reference
from .feature_mse import feature_mse, feature_mse_reference
from .raa_attention import raa_attention, raa_attention_reference

__all__ = [
    "adm_pool",
    "adm_pool_reference",
    "adm_attention_reference",
    "weighted_pool_reference",
    "cosine_similarity_map",
    "cosine_similarity_map_reference",
    "feature_mse",
    "feature_mse_reference",
    "raa_attention",
    "raa_attention_reference",
    "adm_maps",
    "adm_maps_reference",
    "adm_region_pool",
    "adm_region_pool_reference",
    "available_impls",
]
