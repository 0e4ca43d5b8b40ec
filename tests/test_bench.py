"""The offline benchmark script runs end to end on a few requests (no timing is asserted)."""

from flashserve import bench


def test_bench_prints_ratios(trace_dir, micro_llama, capsys):
    trace = str(trace_dir / "AzureLLMInferenceTrace_conv.csv")
    assert bench.main(["--model", micro_llama, "--trace", trace, "--num-requests", "4",
                       "--batch-size", "2", "--max-model-len", "128", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "flashserve continuous" in printed
    assert "hf generate() static" in printed
    assert "continuous / static:" in printed
