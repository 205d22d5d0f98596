"""Routing for Switchboard: embedders, centroid and MLP routers, complexity features,
the re-routing policy, and routing artifact I/O (the only file-touching module).

Pure torch: no web framework and nothing from `server`, so training and serving share it.
"""

from router_core.artifacts import (
    ArtifactError,
    default_sentence_encoder_path,
    load_centroids,
    load_router,
    load_sentence_encoder,
    save_centroids,
    save_router,
)
from router_core.centroid import CentroidRouter, boost_and_truncate, fit_centroids
from router_core.complexity import (
    FEATURE_NAMES,
    ComplexityAnalyzer,
    ComplexityReport,
    count_syllables,
    load_spacy_pipeline,
)
from router_core.embedders import (
    BaseEmbedder,
    Embedder,
    SentenceEncoder,
    encoder_id,
    encoder_name_from_path,
    pool_hidden,
)
from router_core.mlp import MLPRouter, MLPRouterNet, load_balance_loss
from router_core.policy import ReroutePolicy, RoutingTrace, last_reroute, reroute_due, weights_dict

__all__ = [
    "FEATURE_NAMES",
    "ArtifactError",
    "BaseEmbedder",
    "CentroidRouter",
    "ComplexityAnalyzer",
    "ComplexityReport",
    "Embedder",
    "MLPRouter",
    "MLPRouterNet",
    "ReroutePolicy",
    "RoutingTrace",
    "SentenceEncoder",
    "boost_and_truncate",
    "count_syllables",
    "default_sentence_encoder_path",
    "encoder_id",
    "encoder_name_from_path",
    "fit_centroids",
    "last_reroute",
    "load_balance_loss",
    "load_centroids",
    "load_router",
    "load_sentence_encoder",
    "load_spacy_pipeline",
    "pool_hidden",
    "reroute_due",
    "save_centroids",
    "save_router",
    "weights_dict",
]
