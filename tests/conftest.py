import os
from pathlib import Path

import pytest

# Tests see only their own cache folders.
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".numba_cache"))

V3_LIKE = {
    "model_type": "deepseek_v3", "num_hidden_layers": 4, "first_k_dense_replace": 2, "n_group": 4,
    "topk_group": 2, "routed_scaling_factor": 2.5, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 256,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}
NO_Q_LORA = {"q_lora_rank": None, "norm_topk_prob": False}
CONFIGS = {"k2": {}, "v3": V3_LIKE, "noqlora": NO_Q_LORA}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy cases, excluded from the default run (-m 'not slow')")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """make(kind, weights) -> folder of a tiny checkpoint, made once per session."""
    from hybrid.models.tiny import make_tiny
    made = {}

    def make(kind: str = "k2", weights: str = "fp8") -> Path:
        key = (kind, weights)
        if key not in made:
            made[key] = make_tiny(tmp_path_factory.mktemp(f"{kind}-{weights}") / "model",
                                  weights=weights, overrides=CONFIGS[kind])
        return made[key]
    return make
