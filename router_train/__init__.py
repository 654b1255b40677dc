"""Router and expert-training maths (torch, plus transformers model patching only): router init,
the router bias file, FlexOlmo expert pairs and their training, router tuning, domain embeddings
and the FFN-input capture. No registry, no CLI, no composer: composer/ drives these."""

from router_train.domain_embedding import FfnInputMeans
from router_train.pair_ffn import PairFFN, init_router_from_domain_embedding, public_router_row

__all__ = ["FfnInputMeans", "PairFFN", "init_router_from_domain_embedding", "public_router_row"]
