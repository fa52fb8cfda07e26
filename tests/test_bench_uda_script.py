"""scripts/bench_uda_gpu.py --quick: both rows (batched, one at a time) in one run, the JSON written as it goes."""

import importlib.util
import json
from pathlib import Path


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_uda_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_uda_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_times_batched_and_one_at_a_time(tmp_path):
    out = tmp_path / "uda.json"
    _script().main(["--quick", "--prompts", "2", "--batch", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    many, one = report["rows"]["batched"], report["rows"]["one_at_a_time"]
    assert many["batch_size"] == 2 and one["batch_size"] == 1 and many["prompts"] == one["prompts"] == 2
    # one block: the batched loop checks its two prompts in one call, the other loop once per prompt
    assert many["check_calls"] == 1 and one["check_calls"] == 2 and many["checks"] == one["checks"] == 2
    assert many["optimisation_steps"] == one["optimisation_steps"] == 2 * 2
    assert many["s_per_prompt_iteration"] > 0 and one["s_per_prompt_iteration"] > 0
    assert report["same_prompts"] == 2 and set(report["speedup"]) == {"seconds_per_prompt",
                                                                       "optimisation_without_checks"}
    assert "--quick" in report["command"] and report["device"] == "cpu"
