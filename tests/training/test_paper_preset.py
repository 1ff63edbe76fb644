"""configs/t2po-paper.yaml sets the reference's values (WillDreamer/T2PO-ICML), each checked against the line of
the authors' scripts or code that sets it; the one scale adaptation (turn_score_skip) is derived here."""

from __future__ import annotations

from t2po.config import load_config

# Quoted from the reference (WillDreamer/T2PO-ICML):
# examples/embody_agent_trainer/train_alfworld.sh, train_webshop.sh and train_search.sh:
#     algorithm.TDS.enable=True \
#     algorithm.TDS.max_try=2 \
#     num_think_tokens=450            (alfworld, webshop)
#     algorithm.gamma=0.95 \
#     algorithm.gigpo.step_advantage_w=1.0 \
#     invalid_action_penalty_coef=0.1 \
#     actor_rollout_ref.rollout.val_kwargs.temperature=0.6 / top_p=0.95 / top_k=20
#     data.max_response_length=300    (webshop; 500 for alfworld)
# agent_system/multi_turn_rollout/rollout_loop.py (T2PO_multi_turn_loop):
#     eta_threshold: float = 0.3,
#     idx_to_regenerate = np.where((entropy_change > 0) & (entropy_change < eta_threshold))[0]
# recipe/shop_agent/workers/rollout/vllm_rollout_spmd.py (the TTI logits processor):
#     stagnation_patience: int = 20,
#     stagnation_eps: float = 1e-4,
#     combine_alpha: float = 0.6,
#     record_token_min_length: int = 32,     (the turn score skips the first 32 tokens)
#     max_logprob = logprob.max().item()     (log-prob confidence)
REFERENCE = {
    "tds_max_try": 2, "eta": 0.3, "num_think_tokens": 450, "gamma": 0.95, "step_advantage_w": 1.0,
    "invalid_action_penalty_coef": 0.1, "val_temperature": 0.6, "val_top_p": 0.95, "val_top_k": 20,
    "stagnation_patience": 20, "stagnation_eps": 1e-4, "combine_alpha": 0.6, "record_token_min_length": 32,
    "webshop_max_response_length": 300, "train_temperature": 1.0,
}


def test_paper_preset_sets_the_reference_values():
    cfg = load_config("t2po-paper")
    r = cfg.resolved_rollout()
    assert cfg.algo.name == "t2po" and r.tds.enabled and r.tti.enabled
    assert r.tds.max_try == REFERENCE["tds_max_try"]
    assert r.tds.eta == REFERENCE["eta"] and r.tds.quantile is None  # absolute threshold, no relative one
    assert r.tti.patience == REFERENCE["stagnation_patience"]
    assert r.tti.eps == REFERENCE["stagnation_eps"] and r.tti.eps_floor is None
    assert r.tti.budget == REFERENCE["num_think_tokens"]
    assert r.tti.alpha == REFERENCE["combine_alpha"] and r.tti.confidence == "logprob"
    assert cfg.algo.gamma == REFERENCE["gamma"] and cfg.algo.step_weight == REFERENCE["step_advantage_w"]
    assert r.invalid_action_penalty == REFERENCE["invalid_action_penalty_coef"]
    assert r.sampling.temperature == REFERENCE["train_temperature"]
    assert (r.val_sampling.temperature, r.val_sampling.top_p, r.val_sampling.top_k) == (
        REFERENCE["val_temperature"], REFERENCE["val_top_p"], REFERENCE["val_top_k"])
    # the documented scale adaptation: the reference's 32 skipped tokens of a 300-token WebShop response,
    # as the same share of this preset's response budget
    budget = r.sampling.max_new_tokens
    assert r.tti.turn_score_skip == round(REFERENCE["record_token_min_length"] * budget
                                          / REFERENCE["webshop_max_response_length"])


def test_paper_preset_shares_the_main_jobs_warmup():
    """The ablation's arms of a seed share one warm-up: the paper preset must not change it."""
    paper, default = load_config("t2po-paper"), load_config("default")
    assert paper.warmup == default.warmup and paper.model == default.model and paper.env == default.env
