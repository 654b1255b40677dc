"""Router initialisation and training; FlexOlmo expert pairs (torch only)."""

from router_train.domain_embedding import FfnInputMeans
from router_train.pair_ffn import PairFFN, init_router_from_domain_embedding, public_router_row

__all__ = ["FfnInputMeans", "PairFFN", "init_router_from_domain_embedding", "public_router_row"]
