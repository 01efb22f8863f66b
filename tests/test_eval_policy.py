"""``editq eval`` applies the deployment's policy: a batch past the health budget is served by the retrieval tier,
and the JSON says where every edit is served from (``weights_share`` / ``tier_share``)."""

from __future__ import annotations

from shared.settings import Settings
from tests.pipeline_helpers import tiny_requests
from workers.evaluation.runner import EvalConfig, run_evaluation


def test_eval_routes_refused_batches_to_the_tier(tiny_model_dir, tmp_path) -> None:
    data = tmp_path / "edits.jsonl"
    requests = [r.model_copy(update={"target_true": "music"}) for r in tiny_requests(4)]
    data.write_text("".join(r.model_dump_json() + "\n" for r in requests))
    settings = Settings(home=tmp_path / "home", model_path=tiny_model_dir, hparams_path=tiny_model_dir / "hparams.json",
                        device="cpu", health_max_kl=1e-9, health_tokens=64)
    cfg = EvalConfig(data=data, limit=4, batch_size=2, algo="alphaedit", general=False)
    out = run_evaluation(cfg, settings)
    assert out["weights_share"] == 0.0 and out["tier_share"] == 1.0
    assert out["policy"]["routed"] == {"health_budget": 4}
    assert out["policy"]["tier_scored"] is False  # no RECIPE checkpoint was trained for the tiny model
    open_budget = run_evaluation(cfg, settings.model_copy(update={"health_budget": False}))
    assert open_budget["weights_share"] + open_budget["tier_share"] == 1.0
    assert open_budget["policy"]["routed"].get("health_budget", 0) == 0
    bare = run_evaluation(EvalConfig(data=data, limit=4, batch_size=2, algo="alphaedit", general=False,
                                     policy=False), settings)
    assert bare["policy"] is None and "weights_share" not in bare
